//! The protocol pipes' kernel buffers: one chunk large while bulk data
//! moves, the default when it stops.
//!
//! A pipe of one chunk ([`CHUNK_LEN`], 256 KiB) lets bulk data (chunks of
//! puts, fetches and large values) move in whole chunks instead of 64 KiB
//! steps. Larger is worse: a small frame queued behind bulk data waits for
//! everything already in the pipe, and with 1 MiB pipes small calls beside
//! a 100 MB value waited up to 30–45 ms (against 6–8 ms with 256 KiB
//! pipes) for 2–7% more transfer throughput (`benches/latency.rs`,
//! `benches/transfer.rs`).
//!
//! The kernel charges pipe pages to the user, and once an unprivileged user
//! passes `fs.pipe-user-pages-soft` (64 MiB by default) every new pipe of
//! that user, in any program, gets two pages. So an agent enlarges its
//! pipes when bulk data first flows ([`bulk`]) and gives the pages back once
//! it has stopped for a tick of the idle task ([`shrink_if_quiet`]).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use chopsticks_core::__private::wire::CHUNK_LEN;

/// The size asked for while bulk data flows: one chunk.
const LARGE: libc::c_int = CHUNK_LEN as libc::c_int;

/// A copy of a protocol pipe's descriptor, for resizing only, and the size
/// the pipe had when the agent started, which it goes back to.
struct Pipe {
    fd: OwnedFd,
    original: libc::c_int,
}

static PIPES: OnceLock<Vec<Pipe>> = OnceLock::new();
/// The pipes were asked to be large and not yet given back.
static ENLARGED: AtomicBool = AtomicBool::new(false);
/// Bulk data moved since the idle task last looked.
static RECENT: AtomicBool = AtomicBool::new(false);

/// Remembers the protocol pipes among `fds` (other kinds are left alone),
/// and their sizes now.
pub(crate) fn remember(fds: &[&OwnedFd]) {
    let pipes = fds
        .iter()
        .filter_map(|fd| {
            // SAFETY: F_GETPIPE_SZ only reads; it fails on anything but a pipe.
            let original = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETPIPE_SZ) };
            if original <= 0 || original >= LARGE {
                return None;
            }
            let fd = fd.try_clone().ok()?;
            Some(Pipe { fd, original })
        })
        .collect();
    let _ = PIPES.set(pipes);
}

/// Resizes every remembered pipe; true if all took the new size.
fn resize(size: impl Fn(&Pipe) -> libc::c_int) -> bool {
    let pipes = PIPES.get().map(Vec::as_slice).unwrap_or_default();
    pipes.iter().fold(true, |all, pipe| {
        // SAFETY: F_SETPIPE_SZ on an open pipe descriptor has no memory-safety preconditions.
        let done = unsafe { libc::fcntl(pipe.fd.as_raw_fd(), libc::F_SETPIPE_SZ, size(pipe)) } >= 0;
        all && done
    })
}

/// Bulk data is moving: enlarges the pipes if they are not already.
/// Failure is harmless (past the user's limit, say): they keep their size.
pub(crate) fn bulk() {
    RECENT.store(true, Ordering::Relaxed);
    if !ENLARGED.swap(true, Ordering::Relaxed) {
        resize(|_| LARGE);
    }
}

/// Called by the idle task on each tick: gives the pages back (each pipe
/// returns to its original size) when no bulk data moved since the last
/// tick. A pipe that still holds more than that refuses (`EBUSY`), and the
/// next tick tries again.
pub(crate) fn shrink_if_quiet() {
    if RECENT.swap(false, Ordering::Relaxed) || !ENLARGED.load(Ordering::Relaxed) {
        return;
    }
    if resize(|pipe| pipe.original) {
        ENLARGED.store(false, Ordering::Relaxed);
    }
}
