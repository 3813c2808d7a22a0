//! `ldm bench`: times one workload of `ldm_core::bench` on a model folder and prints the times
//! as one JSON object (what `bench/run.py` reads to put ldm beside diffusers).

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use ldm_core::bench::{prepare, Workload};
use ldm_core::backend::cpu::Cpu;
use ldm_core::pipelines::Precision;
use ldm_core::Result;

/// `ldm bench`: time a model call or a whole run.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The pipeline folder: a text-to-image one for bert, unet, vae-decode and txt2img, a
    /// super-resolution one for sr-unet, vq-decode and superres (bench/make_models.py builds
    /// both at the published sizes).
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// What to time: bert, unet, vae-decode, sr-unet, vq-decode, txt2img or superres.
    #[arg(long, value_name = "WORKLOAD")]
    pub workload: String,
    /// Timed runs; the median is reported.
    #[arg(long, value_name = "N", default_value_t = 5)]
    pub repeat: usize,
    /// Untimed runs before the timed ones.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub warmup: usize,
    /// CPU threads; 0 (the default) uses every core.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub threads: usize,
    /// Weights: f32 or bf16 (as `ldm txt2img --precision`).
    #[arg(long, value_name = "P", default_value = "f32")]
    pub precision: String,
}

/// The peak resident memory of this process so far (`VmHWM`), where the system tells it.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
    Some(kib * 1024)
}

pub fn run(a: &BenchArgs) -> Result<()> {
    let workload = Workload::parse(&a.workload)?;
    if a.repeat == 0 {
        return Err(ldm_core::Error::InvalidArgument("--repeat must be at least 1".into()));
    }
    let threads = ldm_core::threads::Threads::new(a.threads)?;
    let t = Instant::now();
    let backend = match Precision::parse(&a.precision)? {
        Precision::F32 => Cpu::new(),
        Precision::Bf16 => Cpu::with_bf16_weights(),
    };
    let job = threads.run(|| prepare(workload, &a.model, &backend))?;
    let load_s = t.elapsed().as_secs_f64();
    let mut times = Vec::with_capacity(a.repeat);
    for i in 0..a.warmup + a.repeat {
        if crate::interrupt::requested() {
            return Err(ldm_core::Error::Cancelled);
        }
        let t = Instant::now();
        threads.run(&job)?;
        if i >= a.warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let report = serde_json::json!({
        "workload": workload.name(),
        "threads": if a.threads == 0 { rayon_threads() } else { a.threads },
        "precision": a.precision,
        "load_s": load_s,
        "times_s": times,
        "median_s": sorted[sorted.len() / 2],
        "peak_rss_bytes": peak_rss(),
    });
    crate::print_stdout(&format!("{report}\n"));
    Ok(())
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
