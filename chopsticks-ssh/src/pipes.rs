//! Larger pipes between the controller and its `ssh` children (and
//! `NativeSsh`'s pump threads), within a budget.
//!
//! `ssh` moves data in pieces of 16–32 KiB; with the kernel's 64 KiB pipes it
//! stalls on a full pipe far more often than the tunnel takes its data, and a
//! 1 GiB fetch ran at about two thirds of a plain `ssh host cat`. With 1 MiB
//! pipes it keeps up. The kernel charges pipe capacity to the user, and an
//! unprivileged user past `fs.pipe-user-pages-soft` (64 MiB by default) gets
//! one-page pipes everywhere, so one controller enlarges at most
//! [`BUDGET_BYTES`] worth of pipes at a time; tunnels past it keep the default.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The size asked for each enlarged pipe.
pub(crate) const PIPE_BYTES: usize = 1 << 20;
/// The most pipe capacity one controller enlarges at a time (a quarter of
/// the default soft limit).
pub(crate) const BUDGET_BYTES: usize = 16 << 20;

static ENLARGED: AtomicUsize = AtomicUsize::new(0);

/// Serialises the unit tests that count the budget.
#[cfg(test)]
pub(crate) static BUDGET_TESTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The budget enlarged pipes hold now.
#[cfg(test)]
pub(crate) fn enlarged_bytes() -> usize {
    ENLARGED.load(Ordering::Relaxed)
}

/// A share of the budget, given back when the pipe end it belongs to is dropped.
pub(crate) struct Share(usize);

impl Drop for Share {
    fn drop(&mut self) {
        ENLARGED.fetch_sub(self.0, Ordering::Relaxed);
    }
}

/// Enlarges the pipe behind `fd` if the budget allows; the share must live
/// as long as the pipe end ([`Holding`]).
pub(crate) fn enlarge(fd: &impl AsRawFd) -> Option<Share> {
    let taken = ENLARGED.fetch_add(PIPE_BYTES, Ordering::Relaxed);
    let share = Share(PIPE_BYTES);
    if taken + PIPE_BYTES > BUDGET_BYTES {
        return None;
    }
    // SAFETY: F_SETPIPE_SZ on an open pipe descriptor has no memory-safety preconditions.
    let granted = unsafe {
        libc::fcntl(
            fd.as_raw_fd(),
            libc::F_SETPIPE_SZ,
            PIPE_BYTES as libc::c_int,
        )
    };
    (granted >= 0).then_some(share)
}

/// A pipe end that holds its share of the budget.
pub(crate) struct Holding<P> {
    pipe: P,
    _share: Option<Share>,
}

impl<P> Holding<P> {
    pub(crate) fn new(pipe: P, share: Option<Share>) -> Holding<P> {
        Holding {
            pipe,
            _share: share,
        }
    }
}

impl<P: AsyncRead + Unpin> AsyncRead for Holding<P> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.pipe).poll_read(cx, buffer)
    }
}

impl<P: AsyncWrite + Unpin> AsyncWrite for Holding<P> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.pipe).poll_write(cx, bytes)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.pipe).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.pipe).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buffers: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.pipe).poll_write_vectored(cx, buffers)
    }

    fn is_write_vectored(&self) -> bool {
        self.pipe.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The read end of a new pipe (the write end is closed at once).
    fn pipe_reader() -> std::os::fd::OwnedFd {
        use std::os::fd::FromRawFd;
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        // SAFETY: both descriptors were just created and are owned by nothing else.
        let (reader, _writer) = unsafe {
            (
                std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                std::os::fd::OwnedFd::from_raw_fd(fds[1]),
            )
        };
        reader
    }

    #[test]
    fn the_budget_is_given_back_and_never_exceeded() {
        let _serial = BUDGET_TESTS.lock();
        let pipes: Vec<_> = (0..(BUDGET_BYTES / PIPE_BYTES) + 4)
            .map(|_| {
                let reader = pipe_reader();
                enlarge(&reader).map(|share| (reader, share))
            })
            .collect();
        let granted = pipes.iter().filter(|pipe| pipe.is_some()).count();
        assert!(
            granted <= BUDGET_BYTES / PIPE_BYTES,
            "{granted} pipes enlarged"
        );
        drop(pipes);
        assert_eq!(enlarged_bytes(), 0);
    }
}
