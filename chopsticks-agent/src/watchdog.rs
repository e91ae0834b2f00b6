//! The watchdog: a periodic `timerfd` that ticks while calls are active.
//!
//! A thread blocks in `read(2)` on the timer and, on each tick, asks the pool
//! whether the reader has been running one call since the previous tick; if
//! so, the reader role is handed to another pool thread, so that further
//! calls, cancels and shutdowns keep being read. The timer starts when the
//! reader first runs a call and stops after [`IDLE_TICKS`] ticks without one,
//! so an idle agent is never woken. (Arming a timer per call was measured: on
//! a virtual machine each `timerfd_settime` costs several microseconds, more
//! than the call itself.)

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// The tick period: a call runs on the reader for one to two periods before reading moves on.
pub(crate) const TICK: Duration = Duration::from_millis(1);
/// Ticks without any call before the timer stops.
pub(crate) const IDLE_TICKS: u32 = 100;

/// The timer, shared by the pool (start, stop) and the watchdog thread (wait).
pub(crate) struct Watchdog {
    timer: OwnedFd,
}

impl Watchdog {
    pub(crate) fn new() -> io::Result<Watchdog> {
        // SAFETY: timerfd_create has no memory-safety preconditions.
        let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let timer = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Watchdog { timer })
    }

    fn set(&self, period: Duration) {
        let time = libc::timespec {
            tv_sec: period.as_secs() as libc::time_t,
            tv_nsec: period.subsec_nanos() as libc::c_long,
        };
        let spec = libc::itimerspec {
            it_interval: time,
            it_value: time,
        };
        // SAFETY: `spec` is a valid itimerspec; a null old-value pointer is allowed.
        unsafe { libc::timerfd_settime(self.timer.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
    }

    /// Starts ticking every [`TICK`].
    pub(crate) fn start(&self) {
        self.set(TICK);
    }

    /// Stops ticking.
    pub(crate) fn stop(&self) {
        self.set(Duration::ZERO);
    }

    /// Blocks until the next tick. Errors only if the timer is unusable.
    pub(crate) fn wait(&self) -> io::Result<()> {
        loop {
            let mut count = [0u8; 8];
            // SAFETY: reading 8 bytes into an 8-byte buffer from an open timerfd.
            let read = unsafe { libc::read(self.timer.as_raw_fd(), count.as_mut_ptr().cast(), 8) };
            if read == 8 {
                return Ok(());
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
    }
}
