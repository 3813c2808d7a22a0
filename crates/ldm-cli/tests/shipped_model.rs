//! The shipped "shapes" models through the `ldm` binary, with no `--model` (the default), scored
//! with the same measures as `ldm-core/tests/shipped_model.rs`: the named colours and shapes are
//! drawn, guidance raises prompt-following, and super-resolution beats bicubic upscaling.
//!
//! Run with `--nocapture` to see the scores.

#[path = "../../ldm-core/tests/shipped/measure.rs"]
mod measure;

use std::path::Path;
use std::process::{Command, Output};

use measure::*;

/// The prompt-following rates required at guidance 4 (the targets).
const COLOUR_FLOOR: f32 = 0.9;
const SHAPE_FLOOR: f32 = 0.8;

fn ldm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args(args)
        .env_remove("LDM_MODEL")
        .env_remove("LDM_SUPERRES_MODEL")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("the ldm binary runs")
}

fn ok(out: &Output) {
    assert!(out.status.success(), "ldm failed: {}", String::from_utf8_lossy(&out.stderr));
}

fn read_png(path: &Path) -> Rgb {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (px, w, h) = ldm_core::image::decode_image(&bytes, &path.display().to_string()).unwrap();
    Rgb { px, w: w as usize, h: h as usize }
}

/// One `ldm txt2img` run of the whole grid (a batch of 24 prompts), scored.
fn grid_run(dir: &Path, guidance: &str) -> Tally {
    let grid = grid(1);
    let prompts: Vec<String> = grid.iter().map(|e| e.prompt()).collect();
    let out = dir.join(format!("g{guidance}.png"));
    let mut args = vec!["txt2img", "--steps", "20", "--seed", "3", "--guidance", guidance, "--quiet"];
    for p in &prompts {
        args.extend(["--prompt", p.as_str()]);
    }
    let out_s = out.display().to_string();
    args.extend(["--output", &out_s]);
    ok(&ldm(&args));
    let mut t = Tally::default();
    for (i, e) in grid.iter().enumerate() {
        let img = read_png(&dir.join(format!("g{guidance}-{i}.png")));
        assert_eq!((img.w, img.h), (64, 64));
        let a = analyse(&img.px, img.w, img.h);
        t.add(e, &a, &score(&a, e), &format!("guidance {guidance}"));
    }
    t
}

#[test]
fn the_default_model_draws_the_prompts_and_guidance_helps() {
    let dir = tempfile::tempdir().unwrap();
    let guided = grid_run(dir.path(), "4");
    let plain = grid_run(dir.path(), "1");
    println!("ldm txt2img, guidance 4: {}", guided.summary());
    println!("ldm txt2img, guidance 1: {}", plain.summary());
    for f in &guided.failures {
        println!("  miss: {f}");
    }
    // The targets: the named colours right in at least 90% of the images, the shape in 80%.
    assert!(guided.colour_rate() >= COLOUR_FLOOR, "colour right in {:.1}% < {:.0}%", 100.0 * guided.colour_rate(), 100.0 * COLOUR_FLOOR);
    assert!(guided.shape_rate() >= SHAPE_FLOOR, "shape right in {:.1}% < {:.0}%", 100.0 * guided.shape_rate(), 100.0 * SHAPE_FLOOR);
    assert!(guided.follow_mean() > plain.follow_mean(), "{} vs {}", guided.summary(), plain.summary());
}

/// The README's first command, as written there (default model, default 50 steps, guidance 1):
/// a red circle on some other colour.
#[test]
fn the_readme_command_draws_a_red_circle() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    ok(&ldm(&["txt2img", "--prompt", "a red circle", "--output", out.to_str().unwrap()]));
    let img = read_png(&out);
    let e = Expect { colour: colour_index("red"), shape: "circle", background: None };
    let a = analyse(&img.px, img.w, img.h);
    let s = score(&a, &e);
    println!("README command: {s:?}");
    assert!(s.colour_ok && s.shape_ok, "saw {:?} {:?} on {}", a.foreground, a.shape, PALETTE[a.background].0);
    // the PNG names the model it came from: the shipped folder
    let text = String::from_utf8_lossy(&std::fs::read(&out).unwrap()).into_owned();
    assert!(text.contains("models/ldm-shapes"), "the PNG metadata does not name the shipped model");
}

#[test]
fn the_default_superres_model_beats_bicubic() {
    let dir = tempfile::tempdir().unwrap();
    let samples: Vec<Rgb> = sample_paths().iter().map(|p| read_png(p)).collect();
    let original = mosaic(&samples[..4]);
    let small = box_down(&original, 4);
    let input = dir.path().join("small.png");
    std::fs::write(&input, ldm_core::image::encode_png(&small.px, small.w as u32, small.h as u32, &[]).unwrap()).unwrap();
    let out = dir.path().join("big.png");
    ok(&ldm(&["superres", "--image", input.to_str().unwrap(), "--steps", "50", "--quiet", "--output", out.to_str().unwrap()]));
    let up = read_png(&out);
    let (m, b) = (psnr(&up, &original), psnr(&bicubic_up(&small, 4), &original));
    println!("ldm superres: PSNR {m:.2} dB, bicubic {b:.2} dB");
    assert!(m > b, "super-resolution {m:.2} dB is not above bicubic {b:.2} dB");
}

#[test]
fn ldm_model_overrides_the_default() {
    let out = Command::new(env!("CARGO_BIN_EXE_ldm"))
        .args(["txt2img", "--prompt", "a red circle", "--output", "never.png"])
        .env("LDM_MODEL", "/no/such/model-folder")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/no/such/model-folder"), "{err}");
    assert!(!Path::new("never.png").exists());
}
