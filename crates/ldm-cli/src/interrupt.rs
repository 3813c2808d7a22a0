//! Ctrl-C and SIGTERM: the first one asks the running pipeline to stop at its next step (the
//! progress callback returns `false`), and the command then exits with status 7 having written
//! nothing; a second one ends the process at once, as the default action would.
//!
//! Outputs are only created after generation has finished, through a temporary file that is
//! renamed into place ([`crate::output`]); a signal arriving while they are written is honoured
//! after the temporary file is removed, never leaving a partial image.

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Whether an interrupt has been received.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

#[cfg(unix)]
extern "C" fn on_signal(sig: libc::c_int) {
    REQUESTED.store(true, Ordering::SeqCst);
    // SAFETY: `signal` is async-signal-safe; restoring the default action makes a second
    // signal end the process immediately.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
    }
}

/// Installs the handlers (Unix only; elsewhere the default actions stay).
pub fn install() {
    #[cfg(unix)]
    // SAFETY: the handler only stores to an atomic and calls `signal`, both async-signal-safe.
    unsafe {
        let handler = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::signal(libc::SIGINT, handler);
        libc::signal(libc::SIGTERM, handler);
    }
}
