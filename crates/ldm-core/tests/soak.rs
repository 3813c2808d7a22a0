//! Load and concurrency (issue 6): many consecutive generations on one pipeline and concurrent
//! ones on separate pipelines keep memory flat (RSS growth under 5% after warm-up) and give
//! exactly the images of single runs; cancellation takes effect within one step.
//!
//! The default sizes keep this under a minute on two cores; `LDM_SOAK_RUNS` raises the number
//! of consecutive runs, and the `#[ignore]`d variant runs the long soak
//! (`cargo test -p ldm-core --test soak -- --ignored`).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ldm_core::backend::cpu::Cpu;
use ldm_core::pipelines::{Images, Pipeline, Progress, Stage, SuperResParams, Txt2ImgParams};
use ldm_core::Error;

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

/// The soak tests measure this process's memory: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn load(name: &str) -> Pipeline<Cpu> {
    Pipeline::load_folder(&Path::new(FIXTURES).join(name), &Cpu).unwrap()
}

/// Resident set size of this process in KiB (`VmRSS` of `/proc/self/status`).
fn rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim().parse().ok()
}

fn t2i_params(seed: u64) -> Txt2ImgParams {
    Txt2ImgParams { prompts: vec![format!("a red circle number {seed}")], steps: 2, seed, guidance: 2.0, ..Default::default() }
}

fn sr_params(seed: u64) -> SuperResParams {
    let rgb: Vec<u8> = (0..32 * 32 * 3).map(|i| ((i * 7 + seed as usize * 13) % 256) as u8).collect();
    SuperResParams { rgb, width: 32, height: 32, steps: 2, seed, ..Default::default() }
}

fn growth(before: u64, after: u64) -> f64 {
    (after as f64 - before as f64) / before as f64
}

fn consecutive(runs: usize) {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pipeline = load("txt2img-tiny");
    let seeds = 4u64;
    let references: Vec<Images> = (0..seeds).map(|s| pipeline.txt2img(&t2i_params(s), None).unwrap()).collect();
    let warmup = (runs / 10).max(10);
    let mut baseline = None;
    let start = Instant::now();
    for i in 0..runs {
        let seed = i as u64 % seeds;
        let out = pipeline.txt2img(&t2i_params(seed), None).unwrap();
        assert!(out == references[seed as usize], "run {i} (seed {seed}) differs from the single run");
        if i + 1 == warmup {
            baseline = rss_kib();
        }
    }
    let elapsed = start.elapsed();
    if let (Some(before), Some(after)) = (baseline, rss_kib()) {
        let g = growth(before, after);
        eprintln!(
            "{runs} consecutive runs in {elapsed:.1?} ({:.0} ms each); RSS {before} KiB after {warmup} -> {after} KiB ({:+.2}%)",
            elapsed.as_secs_f64() * 1000.0 / runs as f64,
            100.0 * g
        );
        assert!(g < 0.05, "RSS grew {:.1}% over {runs} runs ({before} -> {after} KiB)", 100.0 * g);
    }
}

#[test]
fn consecutive_generations_on_one_pipeline() {
    let runs = std::env::var("LDM_SOAK_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    consecutive(runs);
}

#[test]
#[ignore = "the long soak: 2000 consecutive runs (about 10 minutes on two cores)"]
fn long_soak() {
    consecutive(2000);
}

#[test]
fn concurrent_generations_on_separate_pipelines() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Four text-to-image and four super-resolution pipelines, each its own object on its own
    // thread, each running rounds of seeds whose single-run results are known.
    let rounds = 6;
    let t2i_ref: Vec<Images> = {
        let p = load("txt2img-tiny");
        (0..4).map(|s| p.txt2img(&t2i_params(100 + s), None).unwrap()).collect()
    };
    let sr_ref: Vec<Images> = {
        let p = load("superres-tiny");
        (0..4).map(|s| p.superres(&sr_params(200 + s), None).unwrap()).collect()
    };
    let run_round = |pipelines: &Vec<Arc<Pipeline<Cpu>>>| {
        std::thread::scope(|scope| {
            let handles: Vec<_> = pipelines
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    let p = p.clone();
                    scope.spawn(move || {
                        if i < 4 {
                            p.txt2img(&t2i_params(100 + i as u64), None).unwrap()
                        } else {
                            p.superres(&sr_params(200 + (i - 4) as u64), None).unwrap()
                        }
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("a generation thread panicked")).collect::<Vec<Images>>()
        })
    };
    let pipelines: Vec<Arc<Pipeline<Cpu>>> =
        (0..8).map(|i| Arc::new(load(if i < 4 { "txt2img-tiny" } else { "superres-tiny" }))).collect();
    let start = Instant::now();
    let mut baseline = None;
    for round in 0..rounds {
        let outs = run_round(&pipelines);
        for (i, out) in outs.iter().enumerate() {
            let expected = if i < 4 { &t2i_ref[i] } else { &sr_ref[i - 4] };
            assert!(out == expected, "round {round}: pipeline {i} differs from its single run");
        }
        // Warm-up: the first rounds grow the allocator's per-thread arenas.
        if round == 1 {
            baseline = rss_kib();
        }
    }
    let elapsed = start.elapsed();
    if let (Some(before), Some(after)) = (baseline, rss_kib()) {
        let g = growth(before, after);
        eprintln!("8 concurrent pipelines x {rounds} rounds in {elapsed:.1?}; RSS {before} -> {after} KiB ({:+.2}%)", 100.0 * g);
        assert!(g < 0.05, "RSS grew {:.1}% ({before} -> {after} KiB)", 100.0 * g);
    }
}

#[test]
fn cancellation_takes_effect_within_one_step() {
    let _guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pipeline = load("txt2img-tiny");
    // From the callback itself: returning false at step 3 means no further model call.
    let mut seen = Vec::new();
    let params = Txt2ImgParams { steps: 10, ..t2i_params(1) };
    let r = pipeline.txt2img(&params, Some(&mut |p: Progress| {
        seen.push(p);
        !(p.stage == Stage::Denoise && p.step == 3)
    }));
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    let last = seen.last().unwrap();
    assert_eq!((last.stage, last.step), (Stage::Denoise, 3), "{seen:?}");

    // From another thread (a UI's cancel button): the run stops before the next step.
    let cancel = Arc::new(AtomicBool::new(false));
    let step_times = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let requested = Arc::new(Mutex::new(None::<Instant>));
    let (c2, t2, r2) = (cancel.clone(), step_times.clone(), requested.clone());
    let watcher = std::thread::spawn(move || {
        // Cancel once the run is well into its denoising loop.
        loop {
            if t2.lock().unwrap().len() >= 4 {
                *r2.lock().unwrap() = Some(Instant::now());
                c2.store(true, Ordering::SeqCst);
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    let params = Txt2ImgParams { steps: 50, ..t2i_params(2) };
    let r = pipeline.txt2img(&params, Some(&mut |p: Progress| {
        if p.stage == Stage::Denoise {
            step_times.lock().unwrap().push(Instant::now());
        }
        !cancel.load(Ordering::SeqCst)
    }));
    let returned = Instant::now();
    watcher.join().unwrap();
    assert!(matches!(r, Err(Error::Cancelled)), "{r:?}");
    let times = step_times.lock().unwrap();
    let steps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    let longest = steps.iter().max().copied().unwrap_or_default();
    let latency = returned - requested.lock().unwrap().unwrap();
    eprintln!("cancelled after {} of 50 steps; latency {latency:.1?}, longest step {longest:.1?}", times.len());
    assert!(times.len() < 50);
    assert!(times.len() <= 6, "{} steps ran after the cancel was asked at step 4", times.len() - 4);
    assert!(latency <= longest * 2 + Duration::from_millis(50), "latency {latency:?} vs step {longest:?}");

    // And the pipeline is usable afterwards.
    let again = pipeline.txt2img(&t2i_params(1), None).unwrap();
    assert_eq!(again, pipeline.txt2img(&t2i_params(1), None).unwrap());
}
