//! Terminal progress bars with `indicatif`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::{Progress, ProgressEvent};

/// Draws one bar counting finished hosts, and one bar per running transfer.
///
/// ```
/// use chopsticks_core::progress::{Bars, Progress, ProgressEvent};
///
/// let bars = Bars::hidden();
/// bars.report(&ProgressEvent::Started { host: "a", task: "put app.tar", total: None });
/// bars.report(&ProgressEvent::Advanced { host: "a", done: 10, total: Some(20) });
/// bars.report(&ProgressEvent::Finished { host: "a", ok: true });
/// assert_eq!(bars.finished(), (1, 0));
/// ```
pub struct Bars {
    multi: MultiProgress,
    hosts: ProgressBar,
    transfers: Mutex<HashMap<String, ProgressBar>>,
    failed: AtomicU64,
}

impl std::fmt::Debug for Bars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bars")
            .field("finished", &self.finished())
            .finish_non_exhaustive()
    }
}

impl Default for Bars {
    fn default() -> Self {
        Bars::new()
    }
}

impl Bars {
    /// Bars drawn on stderr (nothing is drawn when stderr is not a terminal).
    pub fn new() -> Bars {
        Bars::with_target(ProgressDrawTarget::stderr())
    }

    /// Bars that keep count but draw nothing.
    pub fn hidden() -> Bars {
        Bars::with_target(ProgressDrawTarget::hidden())
    }

    fn with_target(target: ProgressDrawTarget) -> Bars {
        let multi = MultiProgress::with_draw_target(target);
        let hosts = multi.add(ProgressBar::new(0));
        if let Ok(style) =
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} hosts {msg}")
        {
            hosts.set_style(style.progress_chars("=> "));
        }
        hosts.set_prefix("chopsticks");
        Bars {
            multi,
            hosts,
            transfers: Mutex::new(HashMap::new()),
            failed: AtomicU64::new(0),
        }
    }

    /// How many host operations finished: `(succeeded, failed)`.
    pub fn finished(&self) -> (u64, u64) {
        let failed = self.failed.load(Ordering::Relaxed);
        (self.hosts.position().saturating_sub(failed), failed)
    }

    fn transfers(&self) -> std::sync::MutexGuard<'_, HashMap<String, ProgressBar>> {
        self.transfers
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn transfer_bar(&self, host: &str, total: Option<u64>) -> ProgressBar {
        let bar = self.multi.add(ProgressBar::new(total.unwrap_or(0)));
        if let Ok(style) = ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_prefix(host.to_string());
        bar
    }
}

impl Progress for Bars {
    fn report(&self, event: &ProgressEvent<'_>) {
        match *event {
            ProgressEvent::Started { task, .. } => {
                self.hosts.inc_length(1);
                self.hosts.set_message(task.to_string());
            }
            ProgressEvent::Advanced { host, done, total } => {
                let mut transfers = self.transfers();
                let bar = transfers
                    .entry(host.to_string())
                    .or_insert_with(|| self.transfer_bar(host, total));
                if let Some(total) = total {
                    bar.set_length(total);
                }
                bar.set_position(done);
            }
            ProgressEvent::Finished { host, ok } => {
                if let Some(bar) = self.transfers().remove(host) {
                    bar.finish_and_clear();
                    self.multi.remove(&bar);
                }
                if !ok {
                    self.failed.fetch_add(1, Ordering::Relaxed);
                }
                self.hosts.inc(1);
            }
        }
    }
}
