//! A bound on the CPU threads that one pipeline's runs use.
//!
//! candle spreads matrix products and convolutions over the rayon pool of the thread that calls
//! it. [`Threads::run`] runs a closure inside a pool of its own, so a front end can give each
//! pipeline a number of threads (the C ABI's `LdmLoadOptions.threads`). candle's element-wise
//! operations use one process-wide pool instead, sized once by `CANDLE_NUM_THREADS` or
//! `RAYON_NUM_THREADS` (default: the physical cores); that pool serialises its callers, and
//! `Threads` does not resize it. The results do not depend on the number of threads.

use crate::{Error, Result};

/// The most threads [`Threads::new`] accepts.
pub const MAX_THREADS: usize = 1024;

/// Where a pipeline's computations run: on the caller's thread with candle's default pools, or
/// in a pool of a fixed number of threads.
pub struct Threads {
    pool: Option<rayon::ThreadPool>,
}

impl Threads {
    /// `0`: the default pools (every core); `n` > 0: a pool of `n` threads of its own.
    pub fn new(threads: usize) -> Result<Self> {
        if threads == 0 {
            return Ok(Self { pool: None });
        }
        if threads > MAX_THREADS {
            return Err(Error::InvalidArgument(format!(
                "threads {threads} is more than the {MAX_THREADS} supported (0 means every core)"
            )));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("ldm-{i}"))
            .build()
            .map_err(|e| Error::Backend(format!("could not start a pool of {threads} threads: {e}")))?;
        Ok(Self { pool: Some(pool) })
    }

    /// The size of the pool of its own, or 0 for the default pools.
    pub fn count(&self) -> usize {
        self.pool.as_ref().map_or(0, |p| p.current_num_threads())
    }

    /// Runs `f` in this pool (on one of its threads, the caller waiting), or directly on the
    /// calling thread for the default pools. A panic in `f` resumes on the calling thread.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match &self.pool {
            Some(pool) => pool.install(f),
            None => f(),
        }
    }
}

impl std::fmt::Debug for Threads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Threads").field("count", &self.count()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_of_its_own_runs_on_its_threads() {
        let t = Threads::new(2).unwrap();
        assert_eq!(t.count(), 2);
        assert_eq!(t.run(rayon::current_num_threads), 2);
        let name = t.run(|| std::thread::current().name().map(String::from));
        assert!(name.unwrap().starts_with("ldm-"));
        assert_eq!(Threads::new(0).unwrap().count(), 0);
        let e = Threads::new(MAX_THREADS + 1).unwrap_err();
        assert!(e.to_string().contains("1025"), "{e}");
    }
}
