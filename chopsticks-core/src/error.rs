//! The one error type of chopsticks, with variants named by the phase that failed.

use std::fmt;
use std::time::Duration;

/// A boxed error from a transport or another source outside core.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with [`Error`] as the error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The phase of work an error or timeout happened in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Phase {
    /// Starting the agent process and waiting for its hello.
    Connect,
    /// The shell bootstrap that places and verifies the agent file.
    Bootstrap,
    /// The hello exchange that proves both ends run the same binary.
    Handshake,
    /// A function call.
    Call,
    /// Closing the tunnel.
    Close,
    /// A put or fetch.
    Transfer,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Connect => "connect",
            Phase::Bootstrap => "bootstrap",
            Phase::Handshake => "handshake",
            Phase::Call => "call",
            Phase::Close => "close",
            Phase::Transfer => "transfer",
        })
    }
}

/// Everything that can go wrong with a tunnel. Every variant names the host.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The transport could not start the agent process at all.
    #[non_exhaustive]
    #[error("could not start the agent on {host}: {message}")]
    Spawn {
        /// The host the tunnel points at.
        host: String,
        /// What went wrong, as a sentence; it includes the text of `cause`.
        message: String,
        /// The transport's own error, when there is one, for a program to
        /// downcast (`SshError`, `DockerError`, `LocalError`). Its text is
        /// already in `message`, so it is not returned again as `source()`:
        /// a cause-chain printer shows it once.
        cause: Option<BoxError>,
    },
    /// The process started but the agent never said hello: the bootstrap
    /// script failed, the program exited, or the target cannot run this binary.
    #[non_exhaustive]
    #[error("bootstrap on {host} failed: {message}")]
    Bootstrap {
        /// The host the tunnel points at.
        host: String,
        /// What went wrong, including what the process printed.
        message: String,
    },
    /// The agent answered but is not the same program or protocol version.
    #[non_exhaustive]
    #[error("handshake with the agent on {host} failed: {message}")]
    Handshake {
        /// The host the tunnel points at.
        host: String,
        /// What did not match.
        message: String,
    },
    /// The peer sent bytes that are not a valid frame or message; the tunnel was closed.
    #[non_exhaustive]
    #[error("protocol error on {host}: {message}; the tunnel was closed")]
    Protocol {
        /// The host the tunnel points at.
        host: String,
        /// What was wrong with the input.
        message: String,
    },
    /// The connection ended while the call was pending or before it was sent.
    #[non_exhaustive]
    #[error("{}", disconnected_sentence(host, reason, stderr_tail))]
    Disconnected {
        /// The host the tunnel points at.
        host: String,
        /// Why the connection ended (exit status, protocol error, close).
        reason: String,
        /// The last lines the agent process wrote to stderr.
        stderr_tail: Vec<String>,
    },
    /// The remote function panicked, or its arguments or result could not be decoded there.
    #[non_exhaustive]
    #[error("{function} failed on {host}: {message}")]
    Remote {
        /// The host the call ran on.
        host: String,
        /// The type name of the function that was called.
        function: String,
        /// The panic message or decoding error.
        message: String,
        /// The remote backtrace, when `RUST_BACKTRACE` enabled one on the agent.
        backtrace: Option<String>,
    },
    /// The agent is another build of this program (`TunnelBuilder::program_for`),
    /// which runs only functions listed in [`register!`](crate::register);
    /// this one is not. Nothing was sent.
    #[non_exhaustive]
    #[error(
        "the agent on {host} is another build of this program, which runs only functions \
         listed in chopsticks::register!, and {function} is not listed"
    )]
    NotRegistered {
        /// The host the call was for.
        host: String,
        /// The type name of the function.
        function: String,
    },
    /// A value could not be encoded, sent or decoded on this side.
    #[non_exhaustive]
    #[error("{what} of {function} for {host} could not be {action}: {message}")]
    Value {
        /// The host the call is for.
        host: String,
        /// The type name of the function.
        function: String,
        /// Which value.
        what: ValuePart,
        /// What could not be done with it.
        action: ValueAction,
        /// The serde error, or why the value could not be sent.
        message: String,
    },
    /// A phase did not finish within its time bound.
    #[non_exhaustive]
    #[error("{phase} on {host} timed out after {after:?}")]
    Timeout {
        /// The host the tunnel points at.
        host: String,
        /// The phase that timed out.
        phase: Phase,
        /// The bound that was exceeded.
        after: Duration,
    },
    /// A group could not be formed or used as asked.
    #[non_exhaustive]
    #[error("group error at {host}: {message}")]
    Group {
        /// The host the problem is about.
        host: String,
        /// What was being set up: forming the group (`Connect`) or a group transfer.
        phase: Phase,
        /// What is wrong.
        message: String,
    },
    /// Several hosts of a group failed; each error names its host.
    #[non_exhaustive]
    #[error("{}", hosts_sentence(failures))]
    Hosts {
        /// One error per failed host, in host order.
        failures: Vec<Error>,
    },
    /// A put or fetch failed. The target is as it was before and no
    /// temporary file is left behind.
    #[non_exhaustive]
    #[error("{} failed: {message}", transfer_route(*direction, host, local_path, remote_path))]
    Transfer {
        /// The host the tunnel points at.
        host: String,
        /// Put or fetch.
        direction: Direction,
        /// The path on this machine (empty for a put from memory).
        local_path: std::path::PathBuf,
        /// The path on the host.
        remote_path: std::path::PathBuf,
        /// What kind of failure, as `std::io` classifies it (`InvalidData` for a checksum mismatch).
        kind: std::io::ErrorKind,
        /// What went wrong, naming the side and path.
        message: String,
    },
    /// An I/O error on this side.
    #[non_exhaustive]
    #[error("I/O error on {host} during {phase}: {error}")]
    Io {
        /// The host the tunnel points at.
        host: String,
        /// The phase the error happened in.
        phase: Phase,
        /// The error, whose text this error's message includes (so it is
        /// not returned again as `source()`).
        error: std::io::Error,
    },
}

/// Which value of a call an [`Error::Value`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ValuePart {
    /// The argument tuple.
    Arguments,
    /// The function's result.
    Result,
    /// An item of a stream, by its index from 0.
    Item(u64),
}

impl fmt::Display for ValuePart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ValuePart::Arguments => f.write_str("the arguments"),
            ValuePart::Result => f.write_str("the result"),
            ValuePart::Item(index) => write!(f, "item {index} of the stream"),
        }
    }
}

/// What could not be done with a value, in an [`Error::Value`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ValueAction {
    /// Encoding it as CBOR (serde refused it).
    Encode,
    /// Sending it (larger than one value may be).
    Send,
    /// Decoding it (its bytes do not fit the type).
    Decode,
}

impl fmt::Display for ValueAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ValueAction::Encode => "encoded",
            ValueAction::Send => "sent",
            ValueAction::Decode => "decoded",
        })
    }
}

/// Which way a file moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From this machine to the host.
    Put,
    /// From the host to this machine.
    Fetch,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Put => "put",
            Direction::Fetch => "fetch",
        })
    }
}

fn transfer_route(
    direction: Direction,
    host: &str,
    local: &std::path::Path,
    remote: &std::path::Path,
) -> String {
    match direction {
        Direction::Put if local.as_os_str().is_empty() => {
            format!("put from memory → {host}:{}", remote.display())
        }
        Direction::Put => format!("put {} → {host}:{}", local.display(), remote.display()),
        Direction::Fetch => format!("fetch {host}:{} → {}", remote.display(), local.display()),
    }
}

fn hosts_sentence(failures: &[Error]) -> String {
    let mut text = format!("{} host(s) of the group failed:", failures.len());
    for failure in failures {
        text.push_str("\n  ");
        text.push_str(&failure.to_string());
    }
    text
}

fn disconnected_sentence(host: &str, reason: &str, stderr_tail: &[String]) -> String {
    let mut text = format!("the agent on {host} disconnected: {reason}");
    if !stderr_tail.is_empty() {
        text.push_str("; its last stderr lines were:");
        for line in stderr_tail {
            text.push_str("\n  ");
            text.push_str(line);
        }
    }
    text
}

impl Error {
    /// The error of a call whose function failed on the agent.
    pub(crate) fn remote(host: &str, function: &str, failure: crate::protocol::Failure) -> Error {
        Error::Remote {
            host: host.to_string(),
            function: function.to_string(),
            message: failure.describe(),
            backtrace: failure.backtrace,
        }
    }

    /// The host this error is about.
    pub fn host(&self) -> &str {
        match self {
            Error::Spawn { host, .. }
            | Error::Bootstrap { host, .. }
            | Error::Handshake { host, .. }
            | Error::Protocol { host, .. }
            | Error::Disconnected { host, .. }
            | Error::Remote { host, .. }
            | Error::NotRegistered { host, .. }
            | Error::Value { host, .. }
            | Error::Timeout { host, .. }
            | Error::Group { host, .. }
            | Error::Transfer { host, .. }
            | Error::Io { host, .. } => host,
            Error::Hosts { failures } => failures.first().map(Error::host).unwrap_or(""),
        }
    }

    /// Whether the error ended the connection, so that the next call reconnects.
    /// The phase that failed. A group's failure reports its first host's.
    pub fn phase(&self) -> Phase {
        match self {
            Error::Spawn { .. } => Phase::Connect,
            Error::Bootstrap { .. } => Phase::Bootstrap,
            Error::Handshake { .. } => Phase::Handshake,
            Error::Protocol { .. }
            | Error::Disconnected { .. }
            | Error::Remote { .. }
            | Error::NotRegistered { .. }
            | Error::Value { .. } => Phase::Call,
            Error::Timeout { phase, .. } | Error::Io { phase, .. } | Error::Group { phase, .. } => {
                *phase
            }
            Error::Transfer { .. } => Phase::Transfer,
            Error::Hosts { failures } => failures.first().map_or(Phase::Call, Error::phase),
        }
    }

    /// Whether the connection to the agent ended (it exited, was killed,
    /// went silent or broke the protocol); the next call reconnects.
    pub fn is_disconnected(&self) -> bool {
        matches!(self, Error::Disconnected { .. } | Error::Protocol { .. })
    }

    /// Whether a time bound ran out.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout { .. })
    }

    /// Whether the function ran on the agent and failed there (a panic, or
    /// arguments or a result the agent could not decode or encode).
    pub fn is_remote(&self) -> bool {
        matches!(self, Error::Remote { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disconnected_names_host_and_stderr() {
        let error = Error::Disconnected {
            host: "web1".into(),
            reason: "the agent was killed by signal 9".into(),
            stderr_tail: vec!["about to die".into()],
        };
        let text = error.to_string();
        assert!(text.contains("web1"), "{text}");
        assert!(text.contains("signal 9"), "{text}");
        assert!(text.contains("about to die"), "{text}");
        assert_eq!(error.host(), "web1");
    }
}
