//! What a command gives back: [`Output`], [`ExitStatus`], the [`Line`]s of
//! live output, and the bounded capture that keeps a head and a tail.

use std::collections::VecDeque;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Which of a command's outputs a piece came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OutputKind {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl OutputKind {
    pub(crate) fn index(self) -> usize {
        match self {
            OutputKind::Stdout => 0,
            OutputKind::Stderr => 1,
        }
    }
}

impl fmt::Display for OutputKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OutputKind::Stdout => "stdout",
            OutputKind::Stderr => "stderr",
        })
    }
}

/// How a command ended: an exit code, or the signal that killed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    pub(crate) code: Option<i32>,
    pub(crate) signal: Option<i32>,
}

impl ExitStatus {
    /// The exit code, when the command exited by itself.
    pub fn code(&self) -> Option<i32> {
        self.code
    }

    /// The signal that killed it, when one did.
    pub fn signal(&self) -> Option<i32> {
        self.signal
    }

    /// Whether it exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exit status {code}"),
            (None, Some(signal)) => write!(f, "killed by signal {signal}"),
            (None, None) => f.write_str("an unknown status"),
        }
    }
}

/// A finished command: its status and what it printed (bounded; see
/// [`Cmd::capture_limit`](crate::Cmd::capture_limit)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// How it ended. A non-zero status is not an error unless the command
    /// was [`check`](crate::Cmd::check)ed.
    pub status: ExitStatus,
    /// Its standard output, or the head and tail of it around a marker line.
    pub stdout: Vec<u8>,
    /// Its standard error, likewise.
    pub stderr: Vec<u8>,
    pub(crate) dropped: [u64; 2],
}

impl Output {
    /// How many bytes of `kind` were dropped between the kept head and tail.
    pub fn dropped(&self, kind: OutputKind) -> u64 {
        self.dropped[kind.index()]
    }

    /// Standard output as text (invalid UTF-8 replaced).
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// Standard error as text (invalid UTF-8 replaced).
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// The last lines of standard error, for error messages.
    pub(crate) fn stderr_tail(&self) -> String {
        let text = self.stderr_text();
        let lines: Vec<&str> = text.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" / ")
    }
}

/// One line of a command's live output, lent to the callback (copy what
/// you keep: a command may print millions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line<'a> {
    /// The host it ran on.
    pub host: &'a str,
    /// Which output it came from.
    pub kind: OutputKind,
    /// The line, without its newline.
    pub text: &'a [u8],
    /// Whether a newline ended it. A line longer than the bound
    /// ([`Cmd::max_line`](crate::Cmd::max_line)) comes in pieces, each but
    /// the last incomplete, and so does a last line without a newline.
    pub complete: bool,
}

impl Line<'_> {
    /// The line as text (invalid UTF-8 replaced).
    pub fn text_lossy(&self) -> std::borrow::Cow<'_, str> {
        String::from_utf8_lossy(self.text)
    }
}

/// Keeps the first and the last half of `limit` bytes of an output, and
/// counts what fell between.
#[derive(Debug)]
pub(crate) struct Capture {
    limit: usize,
    head: Vec<u8>,
    tail: VecDeque<u8>,
    dropped: u64,
}

/// A capture's parts, as they cross from the agent.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct Captured {
    #[serde(with = "serde_bytes")]
    pub(crate) head: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub(crate) tail: Vec<u8>,
    pub(crate) dropped: u64,
    pub(crate) limit: u64,
}

impl Capture {
    pub(crate) fn new(limit: usize) -> Capture {
        Capture {
            limit,
            head: Vec::new(),
            tail: VecDeque::new(),
            dropped: 0,
        }
    }

    pub(crate) fn push(&mut self, mut bytes: &[u8]) {
        let head_room = (self.limit - self.limit / 2).saturating_sub(self.head.len());
        let into_head = head_room.min(bytes.len());
        self.head.extend_from_slice(&bytes[..into_head]);
        bytes = &bytes[into_head..];
        let tail_limit = self.limit / 2;
        if bytes.len() >= tail_limit {
            self.dropped += (self.tail.len() + bytes.len() - tail_limit) as u64;
            self.tail.clear();
            self.tail.extend(&bytes[bytes.len() - tail_limit..]);
            return;
        }
        let overflow = (self.tail.len() + bytes.len()).saturating_sub(tail_limit);
        self.tail.drain(..overflow);
        self.dropped += overflow as u64;
        self.tail.extend(bytes);
    }

    pub(crate) fn into_parts(self) -> Captured {
        Captured {
            head: self.head,
            tail: self.tail.into(),
            dropped: self.dropped,
            limit: self.limit as u64,
        }
    }
}

impl Captured {
    /// The kept bytes, with a marker line where some were dropped.
    pub(crate) fn into_bytes(self) -> (Vec<u8>, u64) {
        let mut bytes = self.head;
        if self.dropped > 0 {
            bytes.extend_from_slice(
                format!(
                    "\n[chopsticks: {} bytes dropped here, past the capture limit of {} bytes]\n",
                    self.dropped, self.limit
                )
                .as_bytes(),
            );
        }
        bytes.extend_from_slice(&self.tail);
        (bytes, self.dropped)
    }
}

/// Cuts an output into [`Line`]s: at newlines, and at `max` bytes.
#[derive(Debug)]
pub(crate) struct LineCutter {
    partial: Vec<u8>,
    max: usize,
}

impl LineCutter {
    pub(crate) fn new(max: usize) -> LineCutter {
        LineCutter {
            partial: Vec::new(),
            max: max.max(1),
        }
    }

    /// Calls `line(text, complete)` for each line `bytes` completes.
    pub(crate) fn feed(&mut self, mut bytes: &[u8], line: &mut impl FnMut(&[u8], bool)) {
        while !bytes.is_empty() {
            let room = self.max - self.partial.len();
            // A newline just past a full line still ends it.
            let window = (room + 1).min(bytes.len());
            match memchr::memchr(b'\n', &bytes[..window]) {
                // Whole in this piece: handed on without a copy.
                Some(at) if self.partial.is_empty() => {
                    line(&bytes[..at], true);
                    bytes = &bytes[at + 1..];
                }
                Some(at) => {
                    self.partial.extend_from_slice(&bytes[..at]);
                    line(&self.partial, true);
                    self.partial.clear();
                    bytes = &bytes[at + 1..];
                }
                None if bytes.len() > room && self.partial.is_empty() => {
                    line(&bytes[..room], false);
                    bytes = &bytes[room..];
                }
                None if bytes.len() > room => {
                    self.partial.extend_from_slice(&bytes[..room]);
                    line(&self.partial, false);
                    self.partial.clear();
                    bytes = &bytes[room..];
                }
                None => {
                    self.partial.extend_from_slice(bytes);
                    bytes = &[];
                }
            }
        }
    }

    /// The last line, when the output did not end with a newline.
    pub(crate) fn finish(&mut self, line: &mut impl FnMut(&[u8], bool)) {
        if !self.partial.is_empty() {
            line(&self.partial, false);
            self.partial.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_capture_keeps_head_and_tail_and_counts_the_rest() {
        let mut capture = Capture::new(10);
        capture.push(b"0123");
        capture.push(b"456789abcdef");
        capture.push(b"ghij");
        let parts = capture.into_parts();
        assert_eq!(parts.head, b"01234");
        assert_eq!(parts.tail, b"fghij");
        assert_eq!(parts.dropped, 10);
        let (bytes, dropped) = parts.into_bytes();
        assert_eq!(dropped, 10);
        let text = String::from_utf8(bytes).expect("text");
        assert!(
            text.starts_with("01234\n[chopsticks: 10 bytes dropped"),
            "{text}"
        );
        assert!(text.ends_with("]\nfghij"), "{text}");
    }

    #[test]
    fn a_small_output_is_kept_whole() {
        let mut capture = Capture::new(100);
        for piece in [&b"hello "[..], b"wide ", b"world"] {
            capture.push(piece);
        }
        assert_eq!(
            capture.into_parts().into_bytes(),
            (b"hello wide world".to_vec(), 0)
        );
    }

    #[test]
    fn lines_are_cut_at_newlines_and_at_the_bound() {
        let mut cutter = LineCutter::new(4);
        let mut lines = Vec::new();
        let mut line = |text: &[u8], complete: bool| lines.push((text.to_vec(), complete));
        cutter.feed(b"ab\ncdefgh", &mut line);
        cutter.feed(b"ij\nk", &mut line);
        cutter.finish(&mut line);
        assert_eq!(
            lines,
            [
                (b"ab".to_vec(), true),
                (b"cdef".to_vec(), false),
                (b"ghij".to_vec(), true),
                (b"k".to_vec(), false),
            ]
        );
    }
}
