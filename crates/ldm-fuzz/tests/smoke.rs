//! A short fuzzing run of every target (a couple of seconds each) and a replay of every input
//! that once crashed (`regressions/<target>/`): none may panic. The long runs are
//! `scripts/fuzz.sh TARGET SECONDS`.

use ldm_fuzz::targets::TARGETS;

fn seconds() -> f64 {
    std::env::var("LDM_FUZZ_SMOKE_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0)
}

#[test]
fn every_target_survives_a_short_run() {
    let mut failures = Vec::new();
    for t in TARGETS {
        let report = ldm_fuzz::fuzz_in_process(t, seconds(), 0x5eed ^ t.name.len() as u64);
        eprintln!("{report}");
        assert!(report.seeds > 1, "{}: no seed corpus under corpus/{}", t.name, t.name);
        assert!(report.execs > 0, "{}", t.name);
        for (what, input) in report.crashes {
            let path = ldm_fuzz::save_crash(&ldm_fuzz::crate_dir().join("crashes").join(t.name), &what, &input).ok();
            failures.push(format!("{}: {what} (input saved as {path:?})", t.name));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_seed_and_regression_input_runs_cleanly() {
    ldm_fuzz::quiet_panics();
    for t in TARGETS {
        for dir in [ldm_fuzz::corpus_dir(t.name), ldm_fuzz::regressions_dir(t.name)] {
            for (path, bytes) in ldm_fuzz::read_inputs(&dir) {
                if let Err(p) = ldm_fuzz::run_one(t, &bytes) {
                    panic!("{}: {} panics: {p}", t.name, path.display());
                }
            }
        }
    }
}
