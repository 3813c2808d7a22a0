//! The BERT tokenizer of the LDM text encoder.
//!
//! diffusers' `LDMTextToImagePipeline` tokenizes with transformers' `BertTokenizer` and
//! `padding="max_length", max_length=77, truncation=True`. The published
//! `CompVis/ldm-text2im-large-256` ships only `vocab.txt` + `tokenizer_config.json`, so besides
//! loading a `tokenizer.json` we assemble the same tokenizer that transformers builds from those
//! two files: BertNormalizer, BertPreTokenizer, WordPiece ("##", 100 chars per word) and
//! `[CLS] ... [SEP]`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::models::wordpiece::WordPiece;
use tokenizers::normalizers::BertNormalizer;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::processors::bert::BertProcessing;
use tokenizers::utils::padding::{PaddingDirection, PaddingParams, PaddingStrategy};
use tokenizers::utils::truncation::{TruncationDirection, TruncationParams, TruncationStrategy};
use tokenizers::{AddedToken, Tokenizer};

use crate::{Error, Result};

/// Length of every encoded prompt: the context length of the LDMBert text encoder.
pub const MAX_LENGTH: usize = 77;

/// The tokenizer of the LDM text-to-image pipeline, producing exactly the ids diffusers feeds to
/// LDMBert: `[CLS] tokens... [SEP]`, truncated to [`MAX_LENGTH`] and padded with `[PAD]`.
#[derive(Clone)]
pub struct BertTokenizer {
    inner: Tokenizer,
    pad_id: u32,
    /// The file the tokenizer was built from, named by encoding errors.
    source: PathBuf,
}

impl std::fmt::Debug for BertTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BertTokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .field("pad_id", &self.pad_id)
            .finish()
    }
}

/// The keys of a transformers `tokenizer_config.json` that shape a BERT tokenizer.
struct BertConfig {
    do_lower_case: bool,
    /// `None`: strip accents exactly when lower-casing (transformers' default).
    strip_accents: Option<bool>,
    tokenize_chinese_chars: bool,
    unk: String,
    cls: String,
    sep: String,
    pad: String,
    mask: String,
}

impl BertConfig {
    /// Reads `path` if it exists; a missing file means transformers' defaults.
    fn read(path: &Path) -> Result<Self> {
        let json = if crate::vfs::is_file(path) {
            let text = crate::vfs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            serde_json::from_str(&text)
                .map_err(|e| tok_err(path, format!("not valid JSON: {e}")))?
        } else {
            Value::Object(Default::default())
        };
        let flag = |key: &str, default: bool| match json.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(tok_err(
                path,
                format!("`{key}` is {v}, expected true or false"),
            )),
        };
        let token = |key: &str, default: &str| match json.get(key) {
            None => Ok(default.to_string()),
            // Older transformers wrote special tokens as serialized `AddedToken` objects.
            Some(Value::String(s)) => Ok(s.clone()),
            Some(Value::Object(o)) if o.get("content").is_some_and(Value::is_string) => {
                Ok(o["content"].as_str().unwrap_or(default).to_string())
            }
            Some(v) => Err(tok_err(
                path,
                format!("`{key}` is {v}, expected a token string"),
            )),
        };
        let strip_accents = match json.get("strip_accents") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(v) => {
                return Err(tok_err(
                    path,
                    format!("`strip_accents` is {v}, expected true, false or null"),
                ))
            }
        };
        Ok(Self {
            do_lower_case: flag("do_lower_case", true)?,
            strip_accents,
            tokenize_chinese_chars: flag("tokenize_chinese_chars", true)?,
            unk: token("unk_token", "[UNK]")?,
            cls: token("cls_token", "[CLS]")?,
            sep: token("sep_token", "[SEP]")?,
            pad: token("pad_token", "[PAD]")?,
            mask: token("mask_token", "[MASK]")?,
        })
    }
}

fn tok_err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Tokenizer {
        path: path.to_path_buf(),
        msg: msg.into(),
    }
}

impl BertTokenizer {
    /// Loads the tokenizer of a diffusers `tokenizer/` folder: `tokenizer.json` when present,
    /// otherwise `vocab.txt` with the optional `tokenizer_config.json` (the published layout).
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let json_path = dir.join("tokenizer.json");
        let vocab_path = dir.join("vocab.txt");
        let config = BertConfig::read(&dir.join("tokenizer_config.json"))?;
        let (inner, source) = if crate::vfs::is_file(&json_path) {
            let bytes = crate::vfs::read(&json_path).map_err(|e| Error::io(&json_path, e))?;
            let tok = Tokenizer::from_bytes(&bytes).map_err(|e| tok_err(&json_path, e.to_string()))?;
            (tok, json_path)
        } else if crate::vfs::is_file(&vocab_path) {
            (from_vocab(&vocab_path, &config)?, vocab_path)
        } else {
            return Err(Error::NotFound {
                path: dir.join("vocab.txt"),
                what: "a BERT tokenizer folder needs tokenizer.json or vocab.txt".into(),
            });
        };
        Self::finish(inner, source, &config.pad)
    }

    /// Fixes truncation and padding to what the pipeline asks of transformers, whatever a
    /// `tokenizer.json` says about them.
    fn finish(mut inner: Tokenizer, source: PathBuf, pad: &str) -> Result<Self> {
        let pad_id = inner.token_to_id(pad).ok_or_else(|| {
            tok_err(
                &source,
                format!("pad token `{pad}` is not in the vocabulary"),
            )
        })?;
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: MAX_LENGTH,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| {
                tok_err(
                    &source,
                    format!("cannot truncate to {MAX_LENGTH} tokens: {e}"),
                )
            })?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(MAX_LENGTH),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token: pad.to_string(),
        }));
        Ok(Self {
            inner,
            pad_id,
            source,
        })
    }

    /// Token ids of one prompt: `[CLS] ... [SEP]`, truncated and padded to exactly
    /// [`MAX_LENGTH`] ids. Any string is accepted; control characters and NUL bytes are dropped
    /// by BERT's text cleaning.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(prompt, true)
            .map_err(|e| tok_err(&self.source, format!("cannot encode the prompt: {e}")))?;
        let ids = encoding.get_ids();
        if ids.len() != MAX_LENGTH {
            return Err(tok_err(
                &self.source,
                format!(
                    "encoded the prompt to {} ids instead of {MAX_LENGTH}",
                    ids.len()
                ),
            ));
        }
        Ok(ids.to_vec())
    }

    /// [`encode`](Self::encode) for each prompt, in order.
    pub fn encode_batch(&self, prompts: &[&str]) -> Result<Vec<Vec<u32>>> {
        // A plain loop: the batches are tiny (prompt + negative prompt) and it stays
        // single-threaded on wasm32.
        prompts.iter().map(|p| self.encode(p)).collect()
    }

    /// Number of distinct tokens, added special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of the padding token.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
}

/// Builds the tokenizer transformers' `BertTokenizer` makes of `vocab.txt`.
fn from_vocab(path: &Path, config: &BertConfig) -> Result<Tokenizer> {
    let bytes = crate::vfs::read(path).map_err(|e| Error::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        tok_err(
            path,
            format!("not UTF-8 (byte {})", e.utf8_error().valid_up_to()),
        )
    })?;
    // One token per line, id = line number; a repeated token keeps its last line, as in
    // transformers' `load_vocab`.
    let vocab: HashMap<&str, u32> = text.lines().zip(0u32..).collect();
    if vocab.is_empty() {
        return Err(tok_err(path, "has no tokens"));
    }
    for (key, token) in [
        ("unk_token", &config.unk),
        ("cls_token", &config.cls),
        ("sep_token", &config.sep),
    ] {
        if !vocab.contains_key(token.as_str()) {
            return Err(tok_err(
                path,
                format!("{key} `{token}` is not in the vocabulary"),
            ));
        }
    }
    // WordPiece's builder wants an `ahash` map; `bpe::Vocab` is tokenizers' public name for it.
    let wp_vocab: tokenizers::models::bpe::Vocab =
        vocab.iter().map(|(t, &i)| (t.to_string(), i)).collect();
    let model = WordPiece::builder()
        .vocab(wp_vocab)
        .unk_token(config.unk.clone())
        .continuing_subword_prefix("##".into())
        .max_input_chars_per_word(100)
        .build()
        .map_err(|e| tok_err(path, e.to_string()))?;

    let mut tok = Tokenizer::new(model);
    let normalizer = BertNormalizer::new(
        true, // clean_text: BERT always drops control characters and maps whitespace to ' '
        config.tokenize_chinese_chars,
        config.strip_accents,
        config.do_lower_case,
    );
    tok.with_normalizer(Some(normalizer))
        .map_err(|e| tok_err(path, e.to_string()))?;
    tok.with_pre_tokenizer(Some(BertPreTokenizer));
    let id = |t: &String| (t.clone(), vocab[t.as_str()]);
    tok.with_post_processor(Some(BertProcessing::new(id(&config.sep), id(&config.cls))));
    // Special tokens typed in a prompt are matched verbatim, before normalization, as
    // transformers does; a special token missing from vocab.txt would get an id past the
    // embedding table, so it is left out.
    let specials = [
        &config.pad,
        &config.unk,
        &config.cls,
        &config.sep,
        &config.mask,
    ]
    .into_iter()
    .filter(|t| vocab.contains_key(t.as_str()))
    .map(|t| AddedToken::from(t.clone(), true));
    tok.add_special_tokens(specials)
        .map_err(|e| tok_err(path, e.to_string()))?;
    Ok(tok)
}
