//! The BERT tokenizer against ids recorded from transformers (tests/reference/make_fixtures.py).

use std::path::Path;

use ldm_core::tokenizer::{BertTokenizer, MAX_LENGTH};
use ldm_core::Error;

const VOCAB_DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/txt2img-tiny/tokenizer"
);
const JSON_DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/tokenizer-json"
);
const TOKENS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/reference/tokens.json"
);

// Ids of the fixture vocabulary (special tokens deliberately not at bert-base-uncased's ids).
const PAD: u32 = 0;
const UNK: u32 = 6;
const CLS: u32 = 7;
const SEP: u32 = 8;
const MASK: u32 = 9;

fn load(dir: &str) -> BertTokenizer {
    BertTokenizer::from_folder(Path::new(dir)).unwrap_or_else(|e| panic!("loading {dir}: {e}"))
}

fn reference() -> Vec<(String, Vec<u32>)> {
    let text = std::fs::read_to_string(TOKENS).expect("tokens.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("tokens.json is JSON");
    let prompts: Vec<String> = serde_json::from_value(json["prompts"].clone()).expect("prompts");
    let ids: Vec<Vec<u32>> = serde_json::from_value(json["input_ids"].clone()).expect("input_ids");
    assert_eq!(prompts.len(), ids.len());
    assert!(!prompts.is_empty());
    prompts.into_iter().zip(ids).collect()
}

#[test]
fn matches_transformers_from_vocab_txt() {
    assert!(
        !Path::new(VOCAB_DIR).join("tokenizer.json").exists(),
        "fixture must be the vocab.txt layout"
    );
    let tok = load(VOCAB_DIR);
    for (prompt, expected) in reference() {
        assert_eq!(tok.encode(&prompt).unwrap(), expected, "prompt {prompt:?}");
    }
}

#[test]
fn matches_transformers_from_tokenizer_json() {
    let tok = load(JSON_DIR);
    for (prompt, expected) in reference() {
        assert_eq!(tok.encode(&prompt).unwrap(), expected, "prompt {prompt:?}");
    }
}

#[test]
fn folder_kinds_agree() {
    let (a, b) = (load(VOCAB_DIR), load(JSON_DIR));
    assert_eq!(a.vocab_size(), 720);
    assert_eq!(a.vocab_size(), b.vocab_size());
    assert_eq!((a.pad_id(), b.pad_id()), (PAD, PAD));
    let extra = [
        "a [MASK] dog [SEP] [mask]",
        "ΟΔΟΣ İstanbul ﬁne Ｆｕｌｌ　ｗｉｄｔｈ",
        "e\u{301}te\u{301} \u{2028} tab\u{b}\u{c}\u{85} zero\u{200b}width \u{fffd}",
        "豈 (U+F900) 中文字 ##ing ing### ...",
        &"x".repeat(101),
        &"ab".repeat(100),
    ];
    for (p, _) in reference().iter() {
        assert_eq!(a.encode(p).unwrap(), b.encode(p).unwrap(), "prompt {p:?}");
    }
    for p in extra {
        assert_eq!(a.encode(p).unwrap(), b.encode(p).unwrap(), "prompt {p:?}");
    }
    let batch = a.encode_batch(&["a cat", "", "a dog"]).unwrap();
    assert_eq!(
        batch,
        vec![
            a.encode("a cat").unwrap(),
            a.encode("").unwrap(),
            a.encode("a dog").unwrap()
        ]
    );
}

#[test]
fn special_tokens_and_long_words() {
    let tok = load(VOCAB_DIR);
    let ids = tok.encode("[MASK] x").unwrap();
    assert_eq!(ids[..3], [CLS, MASK, tok.encode("x").unwrap()[1]]);
    // WordPiece gives up on words of more than 100 characters.
    assert_eq!(tok.encode(&"a".repeat(101)).unwrap()[..3], [CLS, UNK, SEP]);
    assert_ne!(tok.encode(&"a".repeat(100)).unwrap()[1], UNK);
}

#[test]
fn hostile_prompts_give_77_ids() {
    for tok in [load(VOCAB_DIR), load(JSON_DIR)] {
        let long = "a red fox, ".repeat(10_000); // 110,000 characters
        let nul = "a\0red\0\0fox\u{1}\u{7f}\0";
        let huge_word = "z".repeat(100_000);
        for p in [long.as_str(), nul, huge_word.as_str(), "", "\0", "   \t\n"] {
            let ids = tok.encode(p).unwrap();
            assert_eq!(ids.len(), MAX_LENGTH, "prompt of {} chars", p.len());
            assert_eq!(ids[0], CLS);
            let end = ids.iter().rposition(|&i| i != PAD).unwrap();
            assert_eq!(ids[end], SEP);
            assert!(ids[end + 1..].iter().all(|&i| i == PAD));
        }
        // Truncation keeps [SEP] at the very end.
        assert_eq!(tok.encode(&long).unwrap()[MAX_LENGTH - 1], SEP);
        // BERT's clean_text deletes the NUL bytes: "a\0red" is one word "ared".
        assert_eq!(tok.encode(nul).unwrap(), tok.encode("aredfox").unwrap());
    }
}

#[test]
fn missing_folder_names_both_files() {
    let dir = tempfile::tempdir().unwrap();
    let err = BertTokenizer::from_folder(&dir.path().join("nope")).unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("tokenizer.json") && msg.contains("vocab.txt"),
        "{msg}"
    );
}

fn write_folder(vocab: &[&str], config: Option<&str>) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let text: String = vocab.iter().map(|t| format!("{t}\n")).collect();
    std::fs::write(dir.path().join("vocab.txt"), text).unwrap();
    if let Some(c) = config {
        std::fs::write(dir.path().join("tokenizer_config.json"), c).unwrap();
    }
    dir
}

const SMALL: &[&str] = &[
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "cafe", "café", "Cafe", "##s", "!",
];

#[test]
fn config_keys_are_honoured() {
    // No tokenizer_config.json: lower-case and strip accents.
    let dir = write_folder(SMALL, None);
    let tok = BertTokenizer::from_folder(dir.path()).unwrap();
    assert_eq!(tok.encode("CAFÉS!").unwrap()[..5], [2, 5, 8, 9, 3]);
    assert_eq!(tok.pad_id(), 0);

    // Cased, accents kept.
    let dir = write_folder(
        SMALL,
        Some(r#"{"do_lower_case": false, "tokenize_chinese_chars": true}"#),
    );
    let tok = BertTokenizer::from_folder(dir.path()).unwrap();
    assert_eq!(tok.encode("Cafe café cafe").unwrap()[..5], [2, 7, 6, 5, 3]);

    // Lower-cased but accents kept.
    let dir = write_folder(SMALL, Some(r#"{"strip_accents": false}"#));
    let tok = BertTokenizer::from_folder(dir.path()).unwrap();
    assert_eq!(tok.encode("CAFÉ").unwrap()[..3], [2, 6, 3]);

    // Special tokens renamed, in the old AddedToken object form.
    let vocab = ["<pad>", "<unk>", "<s>", "</s>", "x"];
    let cfg = r#"{"pad_token": "<pad>", "unk_token": {"content": "<unk>", "__type": "AddedToken"},
                  "cls_token": "<s>", "sep_token": "</s>"}"#;
    let dir = write_folder(&vocab, Some(cfg));
    let tok = BertTokenizer::from_folder(dir.path()).unwrap();
    assert_eq!(tok.encode("x y").unwrap()[..5], [2, 4, 1, 3, 0]);
}

#[test]
fn bad_files_are_tokenizer_errors() {
    let cases: [(&[&str], Option<&str>, &str); 4] = [
        (SMALL, Some("{not json"), "tokenizer_config.json"),
        (SMALL, Some(r#"{"do_lower_case": "yes"}"#), "do_lower_case"),
        (&["[UNK]", "[CLS]", "[SEP]"], None, "[PAD]"),
        (&[], None, "vocab.txt"),
    ];
    for (vocab, config, needle) in cases {
        let dir = write_folder(vocab, config);
        let err = BertTokenizer::from_folder(dir.path()).unwrap_err();
        assert!(matches!(err, Error::Tokenizer { .. }), "{err:?}");
        assert!(
            err.to_string().contains(needle),
            "{err} should name {needle}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
    let err = BertTokenizer::from_folder(dir.path()).unwrap_err();
    assert!(
        matches!(err, Error::Tokenizer { .. }) && err.to_string().contains("tokenizer.json"),
        "{err}"
    );
}
