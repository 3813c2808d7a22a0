//! Mutation fuzzing of ldm-core's readers on stable Rust.
//!
//! `cargo fuzz` needs a nightly toolchain; this harness needs none. Each target
//! ([`targets::TARGETS`]) feeds bytes to one reader: safetensors, the PyTorch pickle (raw and in
//! its zip), configs (every model and scheduler), the tokenizer (prompts and tokenizer files),
//! images and `.npy` latents. Inputs are mutations of a committed seed corpus
//! (`corpus/<target>/`), steered by the outcomes they produce: an input whose outcome was not
//! seen before joins the working corpus.
//!
//! [`fuzz_supervised`] runs the target in a child process with a memory limit, so that panics,
//! aborts (a huge allocation, a stack overflow) and hangs are all caught and the input that
//! caused them is saved under `crashes/<target>/`. [`fuzz_in_process`] is the quick variant the
//! test suite runs for a few seconds per target (panics only). Inputs under
//! `regressions/<target>/` are crashes found and fixed; they are replayed by the tests.

pub mod mutate;
pub mod targets;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mutate::Rng;
use targets::Target;

/// The crate folder (corpora and regressions live under it).
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn corpus_dir(target: &str) -> PathBuf {
    crate_dir().join("corpus").join(target)
}

pub fn regressions_dir(target: &str) -> PathBuf {
    crate_dir().join("regressions").join(target)
}

/// The files of a folder (none if it does not exist), sorted by name.
pub fn read_inputs(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect(),
        Err(_) => Vec::new(),
    };
    paths.sort();
    paths.into_iter().filter_map(|p| std::fs::read(&p).ok().map(|b| (p, b))).collect()
}

static LAST_PANIC: Mutex<Option<String>> = Mutex::new(None);

/// Replaces the panic hook by one that records the message instead of printing it.
pub fn quiet_panics() {
    std::panic::set_hook(Box::new(|info| {
        if let Ok(mut p) = LAST_PANIC.lock() {
            *p = Some(info.to_string());
        }
    }));
}

/// Runs one input; `Err` holds the panic message.
pub fn run_one(target: &Target, input: &[u8]) -> Result<String, String> {
    let run = target.run;
    std::panic::catch_unwind(|| run(input)).map_err(|_| {
        LAST_PANIC.lock().ok().and_then(|mut p| p.take()).unwrap_or_else(|| "panic".into())
    })
}

/// What a fuzzing run did.
#[derive(Debug, Default)]
pub struct Report {
    pub target: String,
    pub execs: u64,
    pub seconds: f64,
    pub seeds: usize,
    pub corpus: usize,
    pub features: usize,
    /// `(what happened, input)` for every crash, hang or abort.
    pub crashes: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ldm-fuzz {}: {} execs in {:.0} s ({:.0}/s), corpus {} -> {}, {} distinct outcomes, {} crashes",
            self.target,
            self.execs,
            self.seconds,
            self.execs as f64 / self.seconds.max(1e-9),
            self.seeds,
            self.corpus,
            self.features,
            self.crashes.len()
        )
    }
}

/// The seeds of a target: its corpus and its regression inputs (at least one empty input).
pub fn seeds(target: &Target) -> Vec<Vec<u8>> {
    let mut s: Vec<Vec<u8>> = read_inputs(&corpus_dir(target.name)).into_iter().map(|(_, b)| b).collect();
    s.extend(read_inputs(&regressions_dir(target.name)).into_iter().map(|(_, b)| b));
    if s.is_empty() {
        s.push(Vec::new());
    }
    s
}

/// The working corpus and the outcomes seen.
struct Pool {
    inputs: Vec<Vec<u8>>,
    /// Hashes of the outcomes seen (hashes keep a long run's memory flat).
    seen: HashSet<u64>,
}

impl Pool {
    const MAX: usize = 4096;

    fn offer(&mut self, rng: &mut Rng, input: &[u8], feature: String) {
        if self.seen.insert(hash(feature.as_bytes())) {
            if self.inputs.len() < Self::MAX {
                self.inputs.push(input.to_vec());
            } else {
                let i = rng.below(self.inputs.len());
                self.inputs[i] = input.to_vec();
            }
        }
    }

    fn next(&self, rng: &mut Rng, target: &Target) -> Vec<u8> {
        let base = &self.inputs[rng.below(self.inputs.len())];
        mutate::mutate(rng, base, &self.inputs, target.dict, target.max_len)
    }
}

/// Fuzzes `target` in this process for `seconds`, catching panics only (aborts and hangs end
/// the process; use [`fuzz_supervised`] for those).
pub fn fuzz_in_process(target: &Target, seconds: f64, seed: u64) -> Report {
    quiet_panics();
    let seeds = seeds(target);
    let mut rng = Rng::new(seed);
    let mut pool = Pool { inputs: Vec::new(), seen: HashSet::new() };
    let mut report = Report { target: target.name.into(), seeds: seeds.len(), ..Default::default() };
    for s in &seeds {
        match run_one(target, s) {
            Ok(f) => pool.offer(&mut rng, s, f),
            Err(p) => report.crashes.push((format!("panic: {p}"), s.clone())),
        }
        pool.inputs.push(s.clone());
    }
    let start = Instant::now();
    while start.elapsed().as_secs_f64() < seconds {
        let input = pool.next(&mut rng, target);
        match run_one(target, &input) {
            Ok(f) => pool.offer(&mut rng, &input, f),
            Err(p) => report.crashes.push((format!("panic: {p}"), input)),
        }
        report.execs += 1;
    }
    report.seconds = start.elapsed().as_secs_f64();
    report.corpus = pool.inputs.len();
    report.features = pool.seen.len();
    report
}

// ------------------------------------------------------------------------------------------------
// Supervised: a worker child process per target
// ------------------------------------------------------------------------------------------------

/// How long one input may run before it counts as a hang.
pub const HANG_SECONDS: u64 = 20;

struct Worker {
    child: Child,
    stdin: ChildStdin,
    replies: mpsc::Receiver<(u8, String)>,
}

impl Worker {
    fn spawn(target: &str) -> std::io::Result<Self> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(["worker", target])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let stdin = child.stdin.take().ok_or_else(|| std::io::Error::other("no stdin"))?;
        let mut stdout = child.stdout.take().ok_or_else(|| std::io::Error::other("no stdout"))?;
        let (tx, replies) = mpsc::channel();
        std::thread::spawn(move || loop {
            let mut head = [0u8; 5];
            if stdout.read_exact(&mut head).is_err() {
                return;
            }
            let n = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
            let mut msg = vec![0u8; n.min(1 << 20)];
            if stdout.read_exact(&mut msg).is_err() {
                return;
            }
            if tx.send((head[0], String::from_utf8_lossy(&msg).into_owned())).is_err() {
                return;
            }
        });
        Ok(Self { child, stdin, replies })
    }

    fn kill(mut self) -> String {
        let _ = self.child.kill();
        match self.child.wait() {
            Ok(status) => status.to_string(),
            Err(e) => e.to_string(),
        }
    }
}

/// The child's side: reads length-prefixed inputs on stdin, answers `status, length, message`
/// on stdout (status 0: the target returned, 1: it panicked). Runs under a memory limit
/// (`LDM_FUZZ_MEM_MB`, default 4096) so that a huge allocation aborts instead of swapping.
pub fn worker(target: &Target) -> std::io::Result<()> {
    limit_memory();
    quiet_panics();
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    loop {
        let mut len = [0u8; 4];
        if stdin.read_exact(&mut len).is_err() {
            return Ok(());
        }
        let mut input = vec![0u8; u32::from_le_bytes(len) as usize];
        stdin.read_exact(&mut input)?;
        let (status, msg) = match run_one(target, &input) {
            Ok(f) => (0u8, f),
            Err(p) => (1u8, p),
        };
        let msg = msg.into_bytes();
        stdout.write_all(&[status])?;
        stdout.write_all(&(msg.len() as u32).to_le_bytes())?;
        stdout.write_all(&msg)?;
        stdout.flush()?;
    }
}

fn limit_memory() {
    #[cfg(unix)]
    {
        let mb: u64 = std::env::var("LDM_FUZZ_MEM_MB").ok().and_then(|v| v.parse().ok()).unwrap_or(4096);
        let bytes = mb.saturating_mul(1 << 20) as libc::rlim_t;
        let lim = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
        // SAFETY: plain system call on a valid struct.
        unsafe {
            libc::setrlimit(libc::RLIMIT_AS, &lim);
        }
    }
}

fn hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// Saves a crashing input as `DIR/<kind>-<hash>.bin` with the message beside it (`.txt`).
pub fn save_crash(dir: &Path, what: &str, input: &[u8]) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let kind = what.split(':').next().unwrap_or("crash").replace(' ', "-");
    let path = dir.join(format!("{kind}-{:016x}.bin", hash(input)));
    std::fs::write(&path, input)?;
    std::fs::write(path.with_extension("txt"), what)?;
    Ok(path)
}

/// Fuzzes `target` for `seconds` in a worker child process; crashes (panics, aborts, hangs)
/// are saved under `crashes` and the worker restarted. Progress goes to stderr every 30 s.
pub fn fuzz_supervised(target: &Target, seconds: f64, seed: u64, crashes: &Path) -> std::io::Result<Report> {
    let seeds = seeds(target);
    let mut rng = Rng::new(seed);
    let mut pool = Pool { inputs: seeds.clone(), seen: HashSet::new() };
    let mut report = Report { target: target.name.into(), seeds: seeds.len(), ..Default::default() };
    let mut worker = Worker::spawn(target.name)?;
    let start = Instant::now();
    let mut last_status = Instant::now();
    let mut queue: Vec<Vec<u8>> = seeds;
    while start.elapsed().as_secs_f64() < seconds {
        let input = queue.pop().unwrap_or_else(|| pool.next(&mut rng, target));
        worker.stdin.write_all(&(input.len() as u32).to_le_bytes())?;
        worker.stdin.write_all(&input)?;
        let _ = worker.stdin.flush();
        let outcome = worker.replies.recv_timeout(Duration::from_secs(HANG_SECONDS));
        report.execs += 1;
        match outcome {
            Ok((0, feature)) => pool.offer(&mut rng, &input, feature),
            Ok((_, panic)) => {
                let what = format!("panic: {panic}");
                let path = save_crash(crashes, &what, &input)?;
                eprintln!("ldm-fuzz {}: {what}\n  input saved as {}", target.name, path.display());
                report.crashes.push((what, input));
            }
            Err(e) => {
                let hung = matches!(e, mpsc::RecvTimeoutError::Timeout);
                let status = worker.kill();
                let what = if hung {
                    format!("hang: no answer within {HANG_SECONDS} s")
                } else {
                    format!("abort: the worker died ({status})")
                };
                let path = save_crash(crashes, &what, &input)?;
                eprintln!("ldm-fuzz {}: {what}\n  input saved as {}", target.name, path.display());
                report.crashes.push((what, input));
                worker = Worker::spawn(target.name)?;
            }
        }
        if last_status.elapsed() >= Duration::from_secs(30) {
            last_status = Instant::now();
            report.seconds = start.elapsed().as_secs_f64();
            report.corpus = pool.inputs.len();
            report.features = pool.seen.len();
            eprintln!("{report}");
        }
    }
    drop(worker.stdin);
    let _ = worker.child.wait();
    report.seconds = start.elapsed().as_secs_f64();
    report.corpus = pool.inputs.len();
    report.features = pool.seen.len();
    Ok(report)
}
