//! Forwarding the agent's stderr line by line, and keeping the last lines for error messages.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::watch;

/// Receives each stderr line of a remote agent: `(host, line)`.
pub type StderrSink = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// The default sink: writes `[host] line` to this process's stderr.
///
/// A stderr that cannot be written (closed, or a pipe whose reader is gone)
/// loses the line; it never panics, as `eprintln!` would.
pub fn print_to_stderr() -> StderrSink {
    Arc::new(|host, line| {
        use std::io::Write;
        let _ = writeln!(std::io::stderr().lock(), "[{host}] {line}");
    })
}

/// A sink that drops lines (they still become `tracing` events and error context).
pub fn discard() -> StderrSink {
    Arc::new(|_, _| {})
}

const TAIL_LINES: usize = 20;
const MAX_LINE_LEN: usize = 4096;

/// The last lines the agent wrote to stderr, and whether its stderr has closed.
#[derive(Debug)]
pub(crate) struct StderrTail {
    /// The kept lines, each with its number among all lines ever written.
    lines: Mutex<VecDeque<(u64, String)>>,
    /// How many lines have been written.
    written: AtomicU64,
    /// How many had been written when a request last completed; lines
    /// before that belong to calls that are over.
    settled: AtomicU64,
    closed: watch::Sender<bool>,
}

impl StderrTail {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(StderrTail {
            lines: Mutex::new(VecDeque::with_capacity(TAIL_LINES)),
            written: AtomicU64::new(0),
            settled: AtomicU64::new(0),
            closed: watch::channel(false).0,
        })
    }

    fn push(&self, line: String) {
        let mut lines = self
            .lines
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        if lines.len() == TAIL_LINES {
            lines.pop_front();
        }
        let number = self.written.fetch_add(1, Ordering::Relaxed);
        lines.push_back((number, line));
    }

    /// A request completed: the lines so far belong to finished work and are
    /// left out of later explanations.
    pub(crate) fn settle(&self) {
        self.settled
            .store(self.written.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// A copy of the kept lines written since a request last completed, oldest first.
    pub(crate) fn snapshot(&self) -> Vec<String> {
        let settled = self.settled.load(Ordering::Relaxed);
        let lines = self
            .lines
            .lock()
            .unwrap_or_else(|poison| poison.into_inner());
        lines
            .iter()
            .filter(|(number, _)| *number >= settled)
            .map(|(_, line)| line.clone())
            .collect()
    }

    /// Waits until stderr has closed, at most `bound`.
    pub(crate) async fn wait_closed(&self, bound: std::time::Duration) {
        let mut closed = self.closed.subscribe();
        let _ = tokio::time::timeout(bound, closed.wait_for(|closed| *closed)).await;
    }

    pub(crate) fn mark_closed(&self) {
        self.closed.send_replace(true);
    }
}

/// Reads `pipe` until it closes, handing each line to `sink` and to `tracing`.
/// Lines longer than 4 KiB are cut; invalid UTF-8 is replaced.
pub(crate) async fn forward(
    mut pipe: Box<dyn AsyncRead + Send + Unpin>,
    host: Arc<str>,
    tail: Arc<StderrTail>,
    sink: StderrSink,
) {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let emit = |bytes: &[u8]| {
        let bytes = &bytes[..bytes.len().min(MAX_LINE_LEN)];
        let line = String::from_utf8_lossy(bytes);
        let line = line.strip_suffix('\r').unwrap_or(&line);
        tracing::info!(target: "chopsticks::stderr", host = &*host, "{line}");
        sink(&host, line);
        tail.push(line.to_string());
    };
    loop {
        let read = match pipe.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        let mut rest = &chunk[..read];
        while let Some(newline) = rest.iter().position(|&byte| byte == b'\n') {
            if buffer.is_empty() {
                emit(&rest[..newline]);
            } else {
                buffer.extend_from_slice(&rest[..newline]);
                emit(&buffer);
                buffer.clear();
            }
            rest = &rest[newline + 1..];
        }
        if buffer.len() < MAX_LINE_LEN {
            buffer.extend_from_slice(rest);
        }
    }
    if !buffer.is_empty() {
        emit(&buffer);
    }
    tail.mark_closed();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn lines_are_split_prefixed_and_kept() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink_seen = seen.clone();
        let sink: StderrSink = Arc::new(move |host, line| {
            sink_seen
                .lock()
                .expect("lock")
                .push(format!("[{host}] {line}"));
        });
        let tail = StderrTail::new();
        let input: &[u8] = b"one\ntwo\r\nthree";
        forward(Box::new(input), "h".into(), tail.clone(), sink).await;
        assert_eq!(
            *seen.lock().expect("lock"),
            ["[h] one", "[h] two", "[h] three"]
        );
        assert_eq!(tail.snapshot(), ["one", "two", "three"]);
    }
}
