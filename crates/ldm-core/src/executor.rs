//! Running the asynchronous forms of the pipelines to completion where blocking is allowed.
//!
//! The pipelines are written once, as `async` functions that await each read-back of a tensor
//! ([`crate::backend::Backend::download_async`]): in the browser those reads resolve through the
//! event loop, so the wasm front end awaits them. Natively (and for the CPU backend anywhere)
//! [`block_on`] runs the same futures on the calling thread.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use crate::{Error, Result};

/// Runs `f` to completion on this thread. Natively a pending future parks the thread until it is
/// woken (or a millisecond passes: the GPU's futures resolve when the device is polled, which
/// their own code does). On wasm32 the thread cannot wait: a future still pending after its first
/// poll (a GPU read-back) is an error telling the caller to use the asynchronous form.
pub fn block_on<T>(f: impl Future<Output = Result<T>>) -> Result<T> {
    struct ThreadWaker(std::thread::Thread);
    impl std::task::Wake for ThreadWaker {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker: Waker = Arc::new(ThreadWaker(std::thread::current())).into();
    let mut cx = Context::from_waker(&waker);
    let mut f = std::pin::pin!(f);
    loop {
        match f.as_mut().poll(&mut cx) {
            Poll::Ready(v) => return v,
            Poll::Pending if cfg!(target_arch = "wasm32") => {
                return Err(Error::Backend(
                    "this operation waits for the GPU; in the browser call its asynchronous form".into(),
                ))
            }
            Poll::Pending => std::thread::park_timeout(std::time::Duration::from_millis(1)),
        }
    }
}
