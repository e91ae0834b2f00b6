//! Heartbeats: how each end learns that the other is gone when no byte says so.
//!
//! A controller that is SIGKILLed closes its pipes, and its agent sees the
//! end of its input at once. A network partition closes nothing: an agent
//! behind it would wait for input forever, holding its pending calls and
//! staged files, and only TCP keep-alives (two hours by default) would end
//! it. So both ends send a [`Message::Heartbeat`](crate::protocol::Message::Heartbeat)
//! every quarter of the heartbeat timeout, and each gives the other up after
//! hearing nothing for the whole timeout: the agent exits (dropping what it
//! staged), the controller fails what is pending with `Disconnected` and
//! kills its end of the transport.
//!
//! Silence counts only while the reader waits for input. A reader that is
//! held up by its own side (a disk that is slow to take a put's chunks, a
//! fetch whose local writer is behind) is not hearing nothing.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use chopsticks_core::__private::heartbeat::{InputWatch, SilenceClock};
//!
//! let watch = InputWatch::default();
//! let start = Instant::now();
//! let mut clock = SilenceClock::new(start);
//! watch.waiting();
//! assert_eq!(clock.tick(&watch, start), Duration::ZERO);
//! assert_eq!(clock.tick(&watch, start + Duration::from_secs(5)), Duration::from_secs(5));
//! watch.received();
//! assert_eq!(clock.tick(&watch, start + Duration::from_secs(6)), Duration::ZERO);
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How long either end waits without hearing from the other, unless the
/// tunnel sets another bound.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(60);
/// The shortest heartbeat timeout: shorter ones would mistake a busy
/// machine for a dead peer.
pub const MIN_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(1);
/// The longest heartbeat timeout (a year): longer ones overflow clocks.
pub const MAX_HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(365 * 24 * 3600);

/// `timeout` within [`MIN_HEARTBEAT_TIMEOUT`] and [`MAX_HEARTBEAT_TIMEOUT`].
pub fn clamp(timeout: Duration) -> Duration {
    timeout.clamp(MIN_HEARTBEAT_TIMEOUT, MAX_HEARTBEAT_TIMEOUT)
}

/// How often each end sends a heartbeat and looks for silence.
pub fn interval(timeout: Duration) -> Duration {
    timeout / 4
}

/// What the reader of one end reports: it waits for input, or input came.
/// Written by the reader only, read by the end's heartbeat.
#[derive(Debug)]
pub struct InputWatch {
    received: AtomicU64,
    waiting: AtomicBool,
}

impl InputWatch {
    /// A watch that has seen nothing yet.
    pub const fn new() -> InputWatch {
        InputWatch {
            received: AtomicU64::new(0),
            waiting: AtomicBool::new(false),
        }
    }

    /// The reader is about to wait for input.
    pub fn waiting(&self) {
        self.waiting.store(true, Ordering::Relaxed);
    }

    /// The reader received input (or the end of it) and is busy with it.
    pub fn received(&self) {
        self.waiting.store(false, Ordering::Relaxed);
        // One writer: a load and a store, no locked instruction.
        let received = self.received.load(Ordering::Relaxed);
        self.received
            .store(received.wrapping_add(1), Ordering::Relaxed);
    }
}

impl Default for InputWatch {
    fn default() -> InputWatch {
        InputWatch::new()
    }
}

/// Measures, tick by tick, how long an [`InputWatch`]'s reader has waited
/// without receiving anything.
#[derive(Debug)]
pub struct SilenceClock {
    received: u64,
    since: Instant,
}

impl SilenceClock {
    /// A clock whose silence starts at `now`.
    pub fn new(now: Instant) -> SilenceClock {
        SilenceClock {
            received: 0,
            since: now,
        }
    }

    /// How long the reader has been waiting with nothing received, as of
    /// `now`. Input, or a reader busy with its own side, restarts the count.
    pub fn tick(&mut self, watch: &InputWatch, now: Instant) -> Duration {
        let received = watch.received.load(Ordering::Relaxed);
        if received != self.received || !watch.waiting.load(Ordering::Relaxed) {
            self.received = received;
            self.since = now;
        }
        now.saturating_duration_since(self.since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_reader_is_not_silent() {
        let watch = InputWatch::default();
        let start = Instant::now();
        let mut clock = SilenceClock::new(start);
        watch.waiting();
        watch.received();
        // Busy with what it received (a slow disk, say): no silence however long.
        assert_eq!(
            clock.tick(&watch, start + Duration::from_secs(100)),
            Duration::ZERO
        );
        assert_eq!(
            clock.tick(&watch, start + Duration::from_secs(200)),
            Duration::ZERO
        );
        watch.waiting();
        assert_eq!(
            clock.tick(&watch, start + Duration::from_secs(230)),
            Duration::from_secs(30)
        );
    }

    #[test]
    fn timeouts_are_clamped() {
        assert_eq!(clamp(Duration::ZERO), MIN_HEARTBEAT_TIMEOUT);
        assert_eq!(clamp(Duration::MAX), MAX_HEARTBEAT_TIMEOUT);
        assert_eq!(interval(Duration::from_secs(60)), Duration::from_secs(15));
    }
}
