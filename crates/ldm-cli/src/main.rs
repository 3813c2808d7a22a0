//! `ldm`: Latent Diffusion from the terminal. Each subcommand lives in its own module; this file
//! only parses arguments and turns errors into one `error: ...` line and exit status 1.

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod generate;
mod info;
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
  HF_TOKEN        an access token for gated or private models")]
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
}

fn run(cli: Cli) -> ldm_core::Result<()> {
    match cli.command {
        Command::Txt2img(args) => generate::txt2img(&args),
        Command::Superres(args) => generate::superres(&args),
        Command::Info(args) => info::run(&args),
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

fn main() -> ExitCode {
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
    let cli = Cli::parse();
    match std::panic::catch_unwind(|| run(cli)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {}", one_line(&e.to_string()));
            ExitCode::FAILURE
        }
        Err(_) => ExitCode::FAILURE,
    }
}

/// Error messages may quote multi-line text (JSON errors); the contract is one line.
fn one_line(msg: &str) -> String {
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}
