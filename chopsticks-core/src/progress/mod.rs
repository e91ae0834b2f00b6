//! Progress reporting for transfers and group operations.
//!
//! A [`Progress`] receives [`ProgressEvent`]s: one `Started` and one
//! `Finished` per host and operation, and `Advanced` as a transfer's bytes
//! move. Any `Fn(&ProgressEvent)` is a `Progress`; with the `indicatif`
//! feature, `Bars` draws terminal progress bars.
//!
//! ```
//! use std::sync::atomic::{AtomicU64, Ordering};
//! use std::sync::Arc;
//! use chopsticks_core::progress::{Progress, ProgressEvent};
//!
//! let moved = Arc::new(AtomicU64::new(0));
//! let seen = moved.clone();
//! let progress = move |event: &ProgressEvent<'_>| {
//!     if let ProgressEvent::Advanced { done, .. } = event {
//!         seen.store(*done, Ordering::Relaxed);
//!     }
//! };
//! progress.report(&ProgressEvent::Advanced { host: "web1", done: 4096, total: Some(8192) });
//! assert_eq!(moved.load(Ordering::Relaxed), 4096);
//! ```

use std::sync::Arc;

/// One step of an operation on one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProgressEvent<'a> {
    /// Work on `host` started. `total` is the byte count of a transfer.
    Started {
        /// The host.
        host: &'a str,
        /// What is being done, e.g. `put app.tar`.
        task: &'a str,
        /// How many bytes will move, when known.
        total: Option<u64>,
    },
    /// `done` bytes of a transfer have moved.
    Advanced {
        /// The host.
        host: &'a str,
        /// Bytes moved so far.
        done: u64,
        /// Bytes in all, when known.
        total: Option<u64>,
    },
    /// Work on `host` ended, successfully or not.
    Finished {
        /// The host.
        host: &'a str,
        /// Whether it succeeded.
        ok: bool,
    },
}

/// Receives progress events. Called from the threads doing the work, so keep it quick.
pub trait Progress: Send + Sync {
    /// Takes one event.
    fn report(&self, event: &ProgressEvent<'_>);
}

impl<F> Progress for F
where
    F: Fn(&ProgressEvent<'_>) + Send + Sync,
{
    fn report(&self, event: &ProgressEvent<'_>) {
        self(event)
    }
}

/// A shared progress reporter.
pub type SharedProgress = Arc<dyn Progress>;

#[cfg(feature = "indicatif")]
mod bars;
#[cfg(feature = "indicatif")]
pub use bars::Bars;
