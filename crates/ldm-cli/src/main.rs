//! `ldm`: Latent Diffusion from the terminal. Each subcommand lives in its own module; this file
//! only parses arguments and turns errors into one `error: ...` line and an exit status that
//! tells the class of the error (see [`exit_status`]).

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod generate;
mod info;
mod interrupt;
mod output;

/// Latent Diffusion (a Rust port of diffusers' LDM pipelines).
#[derive(Parser, Debug)]
#[command(name = "ldm", version, about, propagate_version = true)]
#[command(after_help = "\
Models are given as a local folder (a diffusers pipeline folder with model_index.json, or a single \
model folder with config.json) or as a hub id ORG/NAME[@REVISION], looked up in the Hugging Face cache.

Environment:
  HF_HUB_CACHE    the Hugging Face cache folder (default: $HF_HOME/hub, else ~/.cache/huggingface/hub)
  HF_HOME         the Hugging Face home folder
  HF_HUB_OFFLINE  set to 1 to never download; models must then be in the cache
  HF_ENDPOINT     the hub address (default: https://huggingface.co)
  HF_TOKEN        an access token for gated or private models

Exit status of txt2img and superres (ldm info exits with 1 on any error):
  0  success
  1  internal error (a bug, or an I/O failure such as a full disk)
  2  invalid argument or usage: a bad option value, image, latents file or output path
  3  not found: the model folder, a component, a weight file or an input file is missing
  4  bad model: a config, weight file or tokenizer is damaged or inconsistent
  5  unsupported: a model class, option or tensor dtype this program does not implement
  6  out of memory: the run's estimated memory exceeds what is available (refused before starting)
  7  cancelled: interrupted by Ctrl-C or SIGTERM (no output file is left behind)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate images from text prompts with a text-to-image model.
    Txt2img(generate::Txt2ImgArgs),
    /// Upscale an image 4x with a super-resolution model.
    Superres(generate::SuperResArgs),
    /// Show a model's components: classes, key settings, weight files and parameter counts.
    Info(info::InfoArgs),
    /// Time a model call or a whole run on a model folder, printing JSON (see bench/README.md).
    Bench(bench::BenchArgs),
}

fn run(cli: Cli) -> ldm_core::Result<()> {
    match cli.command {
        Command::Txt2img(args) => generate::txt2img(&args),
        Command::Superres(args) => generate::superres(&args),
        Command::Info(args) => info::run(&args),
        Command::Bench(args) => bench::run(&args),
    }
}

/// Resolves `--model` (a folder or a hub id) with the environment's hub settings, showing
/// download progress when stderr is a terminal.
pub(crate) fn resolve_model(spec: &str) -> ldm_core::Result<std::path::PathBuf> {
    use std::io::IsTerminal;
    let options = ldm_core::loading::HubOptions {
        progress: std::io::stderr().is_terminal(),
        ..ldm_core::loading::HubOptions::from_env()
    };
    ldm_core::loading::resolve_model_with(spec, &options)
}

/// Writes a command's report to stdout. A closed pipe (`ldm info ... | head`) is not an error
/// worth reporting, so write errors are ignored.
pub(crate) fn print_stdout(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush());
}

/// The exit status of each class of error, as documented in `ldm --help`.
pub(crate) fn exit_status(kind: ldm_core::ErrorKind) -> u8 {
    use ldm_core::ErrorKind as K;
    match kind {
        K::Internal => 1,
        K::InvalidArgument => 2,
        K::NotFound => 3,
        K::BadModel => 4,
        K::Unsupported => 5,
        K::OutOfMemory => 6,
        K::Cancelled => 7,
    }
}

/// Keeps freed memory in glibc's heap for the next allocation instead of handing large blocks
/// back to the kernel and faulting fresh zeroed pages in on every model operation (each layer's
/// output and scratch buffers are megabytes): 10-13% faster decoders and super-resolution UNet
/// on the benchmark, with the same peak resident memory (the blocks are reused, not added to).
///
/// All threads share one heap (glibc gives each thread its own arena by default): the model
/// runs on the pool's threads, and a block freed in one thread's arena could not be reused by
/// the next allocation of another, so the peak grew towards the sum of the arenas (measured
/// peak resident memory, 2 threads: VQ decode 457-486 -> 381 MB, super-resolution UNet step
/// 608-644 -> 531-535 MB, times within noise). The allocations are a few per layer, so one
/// arena's lock is not contended.
///
/// A library cannot decide this for its host process, so only the command does it.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before any other thread
    // exists. A refusal (return 0) leaves glibc's defaults, which are only slower.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    // A panic is a bug, but it still must reach the user as one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("error: internal error: {msg}{at}");
    }));
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help, --version, and `ldm` alone (the help, on stderr, status 2).
        Err(e) if !e.use_stderr() || e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => e.exit(),
        Err(e) => {
            // clap's own message spans lines (usage, hints); the contract is one line.
            let text = e.to_string();
            let text = text.split("\n\nUsage:").next().unwrap_or("");
            let text = text.split("\n\nFor more information").next().unwrap_or("");
            let text = one_line(text);
            eprintln!("error: {} (see ldm --help)", text.strip_prefix("error: ").unwrap_or(&text));
            return ExitCode::from(exit_status(ldm_core::ErrorKind::InvalidArgument));
        }
    };
    // `ldm info` reports any error with status 1 (its documented contract); the generating
    // commands tell the error's class.
    let classify = !matches!(cli.command, Command::Info(_));
    interrupt::install();
    match std::panic::catch_unwind(|| run(cli)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            // An interrupt may surface as any error of the step it stopped; it is still an interrupt.
            let kind = if interrupt::requested() { ldm_core::ErrorKind::Cancelled } else { e.kind() };
            let msg = match e {
                ldm_core::Error::Cancelled if interrupt::requested() => "interrupted; no output was written".to_string(),
                e => one_line(&e.to_string()),
            };
            eprintln!("error: {msg}");
            ExitCode::from(if classify { exit_status(kind) } else { 1 })
        }
        Err(_) => ExitCode::FAILURE,
    }
}

/// Error messages may quote multi-line text (JSON errors); the contract is one line.
fn one_line(msg: &str) -> String {
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}
