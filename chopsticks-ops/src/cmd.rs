//! [`Cmd`]: a command to run on a host, as argv (or `sh -c`, by choice).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use serde::{Deserialize, Serialize};

use crate::output::Line;

/// The default capture bound, per output: 4 MiB (a head and a tail of 2 MiB).
pub const DEFAULT_CAPTURE_LIMIT: usize = 4 << 20;
/// The default bound on one line of live output: 64 KiB.
pub const DEFAULT_MAX_LINE: usize = 64 << 10;

/// A command for [`TunnelOps::run`](crate::TunnelOps::run) and
/// [`GroupOps::run`](crate::GroupOps::run).
///
/// [`Cmd::new`] runs a program with an argv: no shell sees its words, so
/// `$(...)`, `;` and quotes stay plain characters. [`Cmd::shell`] runs a
/// script through `sh -c`, by explicit choice. By default the command's
/// outputs are captured quietly (bounded: a head and a tail past
/// [`capture_limit`](Self::capture_limit)), its stdin is empty, and it runs
/// as long as it likes, as the agent's user, in the agent's directory.
///
/// ```
/// use std::time::Duration;
/// use chopsticks_ops::Cmd;
///
/// let restart = Cmd::new("systemctl").args(["restart", "nginx"]).check();
/// let logs = Cmd::shell("journalctl -u app | tail -n 50")
///     .timeout(Duration::from_secs(30))
///     .echo(true);
/// assert_eq!(restart.to_string(), "systemctl restart nginx");
/// assert_eq!(logs.to_string(), "sh -c 'journalctl -u app | tail -n 50'");
/// ```
pub struct Cmd {
    pub(crate) spec: CmdSpec,
    pub(crate) stdin_stream: Option<StdinStream>,
    pub(crate) echo: bool,
    pub(crate) on_line: Option<Arc<LineCallback>>,
    pub(crate) check: bool,
    pub(crate) max_line: usize,
}

/// Called with each line of live output.
pub(crate) type LineCallback = dyn Fn(&Line<'_>) + Send + Sync;

/// A stream that feeds a command's stdin while it runs.
pub(crate) type StdinStream = Pin<Box<dyn Stream<Item = Bytes> + Send>>;

/// The part of a [`Cmd`] that travels to the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CmdSpec {
    pub(crate) program: String,
    pub(crate) args: Vec<String>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) env_clear: bool,
    pub(crate) current_dir: Option<String>,
    #[serde(with = "serde_bytes")]
    pub(crate) stdin: Vec<u8>,
    /// Whether stdin is fed (bytes or a stream) rather than empty.
    pub(crate) stdin_fed: bool,
    pub(crate) timeout_ms: Option<u64>,
    pub(crate) user: Option<String>,
    pub(crate) capture_limit: u64,
    /// Whether every piece of output crosses as it comes (for lines), or
    /// only the capture at the end.
    pub(crate) live: bool,
}

impl Cmd {
    /// Runs `program` (looked up on the agent's `PATH`) with no arguments yet.
    pub fn new(program: impl Into<String>) -> Cmd {
        Cmd {
            spec: CmdSpec {
                program: program.into(),
                args: Vec::new(),
                env: Vec::new(),
                env_clear: false,
                current_dir: None,
                stdin: Vec::new(),
                stdin_fed: false,
                timeout_ms: None,
                user: None,
                capture_limit: DEFAULT_CAPTURE_LIMIT as u64,
                live: false,
            },
            stdin_stream: None,
            echo: false,
            on_line: None,
            check: false,
            max_line: DEFAULT_MAX_LINE,
        }
    }

    /// Runs `script` through `sh -c`: pipes, globs and variables work, and
    /// so does everything else a shell does with text, so never build the
    /// script from untrusted words.
    pub fn shell(script: impl Into<String>) -> Cmd {
        Cmd::new("sh").arg("-c").arg(script)
    }

    /// Appends one argument, passed as it is.
    pub fn arg(mut self, arg: impl Into<String>) -> Cmd {
        self.spec.args.push(arg.into());
        self
    }

    /// Appends arguments, each passed as it is.
    pub fn args<I, S>(mut self, args: I) -> Cmd
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.spec.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets an environment variable for the command.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Cmd {
        self.spec.env.push((key.into(), value.into()));
        self
    }

    /// Starts the command with no environment but what [`env`](Self::env) sets.
    pub fn env_clear(mut self) -> Cmd {
        self.spec.env_clear = true;
        self
    }

    /// Runs the command in `dir` on the host.
    pub fn current_dir(mut self, dir: impl Into<String>) -> Cmd {
        self.spec.current_dir = Some(dir.into());
        self
    }

    /// Feeds `bytes` to the command's stdin, then closes it.
    pub fn stdin(mut self, bytes: impl Into<Bytes>) -> Cmd {
        self.spec.stdin = bytes.into().to_vec();
        self.spec.stdin_fed = true;
        self.stdin_stream = None;
        self
    }

    /// Feeds the command's stdin from `stream` while it runs (flow
    /// controlled: a command that reads slowly holds the stream back), then
    /// closes it. One host only: [`GroupOps::run`](crate::GroupOps::run) takes bytes.
    pub fn stdin_stream(mut self, stream: impl Stream<Item = Bytes> + Send + 'static) -> Cmd {
        self.spec.stdin = Vec::new();
        self.spec.stdin_fed = true;
        self.stdin_stream = Some(Box::pin(stream));
        self
    }

    /// Kills the command's whole process group on the host once it has run
    /// for `after`; the run fails with
    /// [`CmdError::TimedOut`](crate::CmdError::TimedOut), which keeps what
    /// it printed.
    pub fn timeout(mut self, after: Duration) -> Cmd {
        self.spec.timeout_ms = Some(u64::try_from(after.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// Runs the command as `user` (its uid, gid, groups, `HOME`, `USER`
    /// and `LOGNAME`). The agent must be root to switch, as under
    /// `Become::sudo`.
    pub fn user(mut self, user: impl Into<String>) -> Cmd {
        self.spec.user = Some(user.into());
        self
    }

    /// Keeps at most `bytes` of each output: the first half and the last
    /// half, with a marker line saying how much fell between
    /// ([`Output::dropped`](crate::Output::dropped)). The default is
    /// [`DEFAULT_CAPTURE_LIMIT`]; 0 keeps nothing.
    pub fn capture_limit(mut self, bytes: usize) -> Cmd {
        self.spec.capture_limit = bytes as u64;
        self
    }

    /// Prints each line as it comes to the tunnel's stderr sink (by
    /// default this process's stderr), as `[host] out: line` or
    /// `[host] err: line`.
    pub fn echo(mut self, echo: bool) -> Cmd {
        self.echo = echo;
        self.spec.live = self.echo || self.on_line.is_some();
        self
    }

    /// Calls `each` with every line as it comes, tagged with its host and
    /// output. A line longer than [`max_line`](Self::max_line) comes in
    /// pieces, and a last line without a newline comes at the end.
    pub fn on_line(mut self, each: impl Fn(&Line<'_>) + Send + Sync + 'static) -> Cmd {
        self.on_line = Some(Arc::new(each));
        self.spec.live = true;
        self
    }

    /// Cuts live lines longer than `bytes` into pieces (default
    /// [`DEFAULT_MAX_LINE`]), so no line is ever held whole.
    pub fn max_line(mut self, bytes: usize) -> Cmd {
        self.max_line = bytes.max(1);
        self
    }

    /// Makes a non-zero status (or a signal) an error,
    /// [`CmdError::Failed`](crate::CmdError::Failed), which names the
    /// host, the command, the status and the tail of stderr.
    pub fn check(mut self) -> Cmd {
        self.check = true;
        self
    }

    /// The words of the command, for messages.
    pub(crate) fn words(&self) -> String {
        words(&self.spec)
    }
}

pub(crate) fn words(spec: &CmdSpec) -> String {
    std::iter::once(&spec.program)
        .chain(&spec.args)
        .map(|word| quoted(word))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A word as a shell would need it, quoted only where it must be.
fn quoted(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "-_./=:,+@%".contains(ch));
    if plain {
        word.to_string()
    } else {
        chopsticks_core::shell_quote(word)
    }
}

impl std::fmt::Display for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.words())
    }
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cmd")
            .field("command", &self.words())
            .field("env", &self.spec.env)
            .field("current_dir", &self.spec.current_dir)
            .field("timeout_ms", &self.spec.timeout_ms)
            .field("user", &self.spec.user)
            .field("echo", &self.echo)
            .field("check", &self.check)
            .finish_non_exhaustive()
    }
}
