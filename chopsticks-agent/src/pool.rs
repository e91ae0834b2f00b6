//! The pool that runs blocking calls.
//!
//! `tokio::task::spawn_blocking` wakes one sleeping thread per task, which
//! costs a futex wake and a context switch per call. This pool wakes a
//! worker only when no awake worker is looking for work ("searching"). A
//! worker that takes a job while more are queued wakes the next one first,
//! so long calls still overlap (16 calls that sleep 400 ms finish together),
//! while a burst of short calls is drained by one or two awake workers.
//! Workers that sleep for [`IDLE_RETIRE`] without work exit.
//!
//! The pool also owns the *reader role* (leader/follower): one worker reads
//! the protocol input. It may run the last call of what it read itself and
//! then go on reading; if that call outlasts the watchdog's grace period, the
//! role is made vacant and the next searching worker takes it.
//!
//! A searching worker answers for one thing only: the vacant reader role or
//! one queued job. A worker that takes one while the other is still waiting
//! wakes another worker, so a job submitted while the role falls vacant
//! never waits for a long call to finish.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::watchdog::{IDLE_TICKS, Watchdog};

/// How long an idle worker waits for work before it exits.
const IDLE_RETIRE: Duration = Duration::from_secs(10);
/// At most this many workers; further jobs wait for one to finish.
const MAX_WORKERS: usize = 512;

type Job = Box<dyn FnOnce() + Send + 'static>;
type Lead = Arc<dyn Fn() + Send + Sync + 'static>;

/// Who reads the protocol input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum ReaderRole {
    /// A worker reads, or nobody does yet (before `start_reading`, or after the input ended).
    #[default]
    Held,
    /// The reading worker runs a call itself; the role may be handed on.
    LeaderBusy,
    /// The next searching worker must take the role.
    Vacant,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Job>,
    /// Workers awake and not running a job.
    searching: usize,
    /// Workers waiting on the condition variable.
    sleeping: usize,
    /// Wake-ups handed out and not yet taken by a sleeping worker.
    permits: usize,
    /// Worker threads alive.
    workers: usize,
    /// Who reads the protocol input.
    reader: ReaderRole,
    /// What a worker runs when it takes the reader role.
    lead: Option<Lead>,
    /// Watches the reader while it runs calls.
    watchdog: Option<Arc<Watchdog>>,
    /// Whether the watchdog ticks.
    ticking: bool,
    /// Calls the reader has started running itself.
    reader_calls: u64,
    /// `reader_calls` as of the previous tick.
    reader_calls_seen: u64,
    /// Ticks in a row without a call on the reader.
    idle_ticks: u32,
    /// Counts hand-overs of the reader role, so a former reader can tell.
    reader_generation: u64,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

/// A pool of threads for blocking calls. Cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct CallPool {
    shared: Arc<Shared>,
}

impl CallPool {
    /// Queues `job`; it runs on a pool thread.
    pub(crate) fn submit(&self, job: impl FnOnce() + Send + 'static) {
        let mut state = self.shared.lock();
        state.queue.push_back(Box::new(job));
        if state.searching == 0 && !self.wake_one(&mut state) && state.workers == 0 {
            // No thread could be started and none exists to take the job later:
            // run it here rather than strand it.
            let job = state.queue.pop_back();
            drop(state);
            if let Some(job) = job {
                job();
            }
        }
    }

    /// Makes one more worker searching: a sleeper if there is one, else a new
    /// thread. Returns false if no worker could be had; at the worker limit the
    /// job simply waits for a busy worker to finish, which counts as success.
    fn wake_one(&self, state: &mut State) -> bool {
        if state.sleeping > 0 {
            state.searching += 1;
            state.sleeping -= 1;
            state.permits += 1;
            self.shared.wake.notify_one();
            return true;
        }
        if state.workers >= MAX_WORKERS {
            return true;
        }
        let pool = self.clone();
        let spawned = std::thread::Builder::new()
            .name("chopsticks-call".into())
            .spawn(move || pool.work());
        if spawned.is_err() {
            return false;
        }
        state.searching += 1;
        state.workers += 1;
        true
    }

    /// Makes a worker run `lead` as the reader, now and whenever the role falls vacant.
    /// The watchdog's ticks go to [`tick`](Self::tick).
    pub(crate) fn start_reading(
        &self,
        lead: impl Fn() + Send + Sync + 'static,
        watchdog: Arc<Watchdog>,
    ) {
        let mut state = self.shared.lock();
        state.lead = Some(Arc::new(lead));
        state.watchdog = Some(watchdog);
        self.vacate(&mut state);
    }

    /// The reader is about to run a call itself. Returns the role's
    /// generation, for [`leader_done`](Self::leader_done).
    pub(crate) fn leader_busy(&self) -> u64 {
        let mut state = self.shared.lock();
        state.reader = ReaderRole::LeaderBusy;
        state.reader_calls += 1;
        if !state.ticking {
            state.ticking = true;
            state.idle_ticks = 0;
            if let Some(watchdog) = &state.watchdog {
                watchdog.start();
            }
        }
        state.reader_generation
    }

    /// A watchdog tick: hands the reader role on if the reader has been
    /// running the same call since the previous tick; stops the ticks when
    /// calls have stopped.
    pub(crate) fn tick(&self) {
        let mut state = self.shared.lock();
        let calls = state.reader_calls;
        let same_call = calls == state.reader_calls_seen;
        state.reader_calls_seen = calls;
        if state.reader == ReaderRole::LeaderBusy {
            state.idle_ticks = 0;
            if same_call {
                self.vacate(&mut state);
            }
            return;
        }
        state.idle_ticks = if same_call { state.idle_ticks + 1 } else { 0 };
        if state.idle_ticks >= IDLE_TICKS && state.ticking {
            state.ticking = false;
            if let Some(watchdog) = &state.watchdog {
                watchdog.stop();
            }
        }
    }

    /// The reader that got `generation` from [`leader_busy`](Self::leader_busy)
    /// finished its call. Returns true if it still holds the role, false if the
    /// role was handed on meanwhile (even if the new reader is busy too).
    pub(crate) fn leader_done(&self, generation: u64) -> bool {
        let mut state = self.shared.lock();
        if state.reader == ReaderRole::LeaderBusy && state.reader_generation == generation {
            state.reader = ReaderRole::Held;
            return true;
        }
        false
    }

    fn vacate(&self, state: &mut State) {
        state.reader = ReaderRole::Vacant;
        state.reader_generation += 1;
        if state.searching == 0 && !self.wake_one(state) && state.workers == 0 {
            // No thread could be started: the role stays vacant for the next worker.
            crate::warn(format_args!(
                "no thread could be started to read the protocol input"
            ));
        }
    }

    /// Whether no job is waiting for a worker.
    pub(crate) fn queue_is_empty(&self) -> bool {
        self.shared.lock().queue.is_empty()
    }

    fn work(&self) {
        let mut state = self.shared.lock();
        loop {
            if state.reader == ReaderRole::Vacant
                && let Some(lead) = state.lead.clone()
            {
                state.reader = ReaderRole::Held;
                state.searching -= 1;
                // A submitter may have counted on this worker for a queued job.
                if !state.queue.is_empty() && state.searching == 0 {
                    self.wake_one(&mut state);
                }
                drop(state);
                lead();
                state = self.shared.lock();
                state.searching += 1;
                continue;
            }
            if let Some(job) = state.queue.pop_front() {
                state.searching -= 1;
                // Each searching worker answers for one thing: the vacant reader
                // role or one queued job. Whatever is left needs another worker.
                let unattended = !state.queue.is_empty() || state.reader == ReaderRole::Vacant;
                if unattended && state.searching == 0 {
                    self.wake_one(&mut state);
                }
                drop(state);
                job();
                state = self.shared.lock();
                state.searching += 1;
                continue;
            }
            state.searching -= 1;
            state.sleeping += 1;
            loop {
                let (woken, timeout) = self
                    .shared
                    .wake
                    .wait_timeout(state, IDLE_RETIRE)
                    .unwrap_or_else(|poison| poison.into_inner());
                state = woken;
                if state.permits > 0 {
                    // The waker already moved this worker from sleeping to searching.
                    state.permits -= 1;
                    break;
                }
                if timeout.timed_out() {
                    state.sleeping -= 1;
                    state.workers -= 1;
                    return;
                }
            }
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Instant;

    #[test]
    fn long_jobs_overlap() {
        let pool = CallPool::default();
        let (done, finished) = mpsc::channel();
        let started = Instant::now();
        for _ in 0..16 {
            let done = done.clone();
            pool.submit(move || {
                std::thread::sleep(Duration::from_millis(200));
                let _ = done.send(());
            });
        }
        for _ in 0..16 {
            finished
                .recv_timeout(Duration::from_secs(5))
                .expect("job finished");
        }
        assert!(
            started.elapsed() < Duration::from_millis(1000),
            "{:?}",
            started.elapsed()
        );
    }

    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A pool whose readers block on input that never comes, counting the
    /// workers that took the reader role. Dropping it lets them go.
    struct BlockedReaders {
        pool: CallPool,
        stop: Arc<AtomicBool>,
        leaders: Arc<AtomicUsize>,
    }

    impl BlockedReaders {
        fn start() -> BlockedReaders {
            let readers = BlockedReaders {
                pool: CallPool::default(),
                stop: Arc::new(AtomicBool::new(false)),
                leaders: Arc::new(AtomicUsize::new(0)),
            };
            let (stop, leaders) = (readers.stop.clone(), readers.leaders.clone());
            let lead = move || {
                leaders.fetch_add(1, Ordering::SeqCst);
                while !stop.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            };
            let watchdog = Arc::new(Watchdog::new().expect("timerfd"));
            readers.pool.start_reading(lead, watchdog);
            assert!(readers.wait_for(1) >= 1, "no worker took the reader role");
            readers
        }

        /// Waits up to 5 s for `count` workers to have taken the role; returns how many did.
        fn wait_for(&self, count: usize) -> usize {
            let deadline = Instant::now() + Duration::from_secs(5);
            while self.leaders.load(Ordering::SeqCst) < count && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            self.leaders.load(Ordering::SeqCst)
        }

        /// The watchdog's hand-over: the role falls vacant and a worker is woken for it.
        fn vacate(&self) -> MutexGuard<'_, State> {
            let mut state = self.pool.shared.lock();
            self.pool.vacate(&mut state);
            state
        }
    }

    impl Drop for BlockedReaders {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
        }
    }

    /// A worker woken for the vacant reader role must not strand a job that
    /// was queued while it was on its way (nobody else was woken for it).
    #[test]
    fn a_job_queued_while_the_reader_role_falls_vacant_still_runs() {
        let readers = BlockedReaders::start();
        let (done, finished) = mpsc::channel();
        {
            // The reader runs a long call: the role falls vacant and one worker
            // is woken for it; a job arrives before that worker runs. `submit`
            // sees a searching worker and wakes nobody else.
            let mut state = readers.vacate();
            assert_eq!(state.searching, 1);
            state.queue.push_back(Box::new(move || {
                let _ = done.send(());
            }));
        }
        let outcome = finished.recv_timeout(Duration::from_secs(5));
        // The woken worker took the role (it may start leading after the job ran).
        let leaders = readers.wait_for(2);
        outcome.expect("the queued job ran while another worker took the reader role");
        assert_eq!(leaders, 2);
    }

    /// A reader whose call outlasted its role must not take the role back
    /// while the next reader runs a call of its own.
    #[test]
    fn a_former_reader_does_not_take_back_a_busy_role() {
        let readers = BlockedReaders::start();
        // The reader runs a call; the watchdog hands the role on meanwhile.
        let first = readers.pool.leader_busy();
        drop(readers.vacate());
        assert!(readers.wait_for(2) >= 2, "no worker took the reader role");
        // The new reader runs a call of its own when the first call ends.
        let second = readers.pool.leader_busy();
        let former_keeps_role = readers.pool.leader_done(first);
        let current_keeps_role = readers.pool.leader_done(second);
        assert!(!former_keeps_role, "the former reader gave the role up");
        assert!(current_keeps_role, "the current reader keeps it");
    }

    #[test]
    fn many_short_jobs_all_run() {
        let pool = CallPool::default();
        let (done, finished) = mpsc::channel();
        for round in 0..10_000u32 {
            let done = done.clone();
            pool.submit(move || {
                let _ = done.send(round);
            });
        }
        let mut total = 0u64;
        for _ in 0..10_000 {
            total += u64::from(finished.recv_timeout(Duration::from_secs(5)).expect("job"));
        }
        assert_eq!(total, (0..10_000u64).sum());
    }
}
