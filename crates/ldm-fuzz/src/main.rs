//! `ldm-fuzz`: the fuzzing harness's command (see the crate docs and `scripts/fuzz.sh`).
//!
//! ```text
//! ldm-fuzz list
//! ldm-fuzz run TARGET SECONDS [--seed N] [--crashes DIR]   # supervised; exit 1 if crashes
//! ldm-fuzz replay TARGET FILE...                           # run inputs, report panics
//! ldm-fuzz worker TARGET                                   # internal: the child process
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use ldm_fuzz::targets::{target, TARGETS};

fn usage() -> ExitCode {
    let names: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
    eprintln!(
        "usage: ldm-fuzz run TARGET SECONDS [--seed N] [--crashes DIR] | replay TARGET FILE... | list\n\
         targets: {}",
        names.join(", ")
    );
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else { return usage() };
    if cmd == "list" {
        for t in TARGETS {
            println!("{}", t.name);
        }
        return ExitCode::SUCCESS;
    }
    let Some(t) = args.get(1).and_then(|n| target(n)) else { return usage() };
    match cmd.as_str() {
        "worker" => match ldm_fuzz::worker(t) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        },
        "replay" => {
            ldm_fuzz::quiet_panics();
            let mut failed = 0;
            for f in &args[2..] {
                let bytes = match std::fs::read(f) {
                    Ok(b) => b,
                    Err(e) => {
                        eprintln!("{f}: {e}");
                        failed += 1;
                        continue;
                    }
                };
                match ldm_fuzz::run_one(t, &bytes) {
                    Ok(feature) => println!("{f}: ok ({feature})"),
                    Err(p) => {
                        println!("{f}: PANIC {p}");
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        "run" => {
            let Some(seconds) = args.get(2).and_then(|s| s.parse::<f64>().ok()) else { return usage() };
            let mut seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
            let mut crashes = ldm_fuzz::crate_dir().join("crashes").join(t.name);
            let mut rest = args[3..].iter();
            while let Some(a) = rest.next() {
                match (a.as_str(), rest.next()) {
                    ("--seed", Some(v)) => match v.parse() {
                        Ok(v) => seed = v,
                        Err(_) => return usage(),
                    },
                    ("--crashes", Some(v)) => crashes = PathBuf::from(v),
                    _ => return usage(),
                }
            }
            eprintln!("ldm-fuzz {}: seed {seed}, {seconds} s, crashes to {}", t.name, crashes.display());
            match ldm_fuzz::fuzz_supervised(t, seconds, seed, &crashes) {
                Ok(report) => {
                    println!("{report}");
                    if report.crashes.is_empty() {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }
                Err(e) => {
                    eprintln!("ldm-fuzz: {e}");
                    ExitCode::from(3)
                }
            }
        }
        _ => usage(),
    }
}
