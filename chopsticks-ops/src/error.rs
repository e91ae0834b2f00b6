//! [`CmdError`]: why a command gave no [`Output`], or a checked one failed.

use std::time::Duration;

use crate::output::Output;

/// Why [`run`](crate::TunnelOps::run) failed. Each names the host and the
/// command; those that ran keep their [`Output`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CmdError {
    /// The tunnel failed: the host was unreachable, the agent died, ...
    #[error(transparent)]
    Tunnel(#[from] chopsticks_core::Error),
    /// The program is not on the host (or not on its `PATH`).
    #[error("`{command}` cannot run on {host}: no program {program:?} there ({message})")]
    NotFound {
        /// The host.
        host: String,
        /// The command.
        command: String,
        /// The program that was looked for.
        program: String,
        /// What the host said.
        message: String,
    },
    /// The directory to run in is missing or not a directory.
    #[error("`{command}` cannot run on {host} in {dir}: {message}")]
    BadDirectory {
        /// The host.
        host: String,
        /// The command.
        command: String,
        /// The directory.
        dir: String,
        /// What the host said.
        message: String,
    },
    /// The user to run as is unknown there.
    #[error("`{command}` cannot run on {host}: {message}")]
    NoSuchUser {
        /// The host.
        host: String,
        /// The command.
        command: String,
        /// What the host said.
        message: String,
    },
    /// The command could not start for another reason.
    #[error("`{command}` could not start on {host}: {message}")]
    Spawn {
        /// The host.
        host: String,
        /// The command.
        command: String,
        /// What the host said.
        message: String,
    },
    /// The command ran past its timeout; its whole process group was killed.
    #[error(
        "`{command}` on {host} ran past its timeout of {after:?}; its process group was killed"
    )]
    TimedOut {
        /// The host.
        host: String,
        /// The command.
        command: String,
        /// The timeout.
        after: Duration,
        /// What it printed until then.
        output: Box<Output>,
    },
    /// The command ended without reading all of its stdin.
    #[error(
        "`{command}` on {host} ended ({}) without reading {unread} bytes of its stdin",
        output.status
    )]
    StdinNotRead {
        /// The host.
        host: String,
        /// The command.
        command: String,
        /// How much was left (at least).
        unread: u64,
        /// What it printed.
        output: Box<Output>,
    },
    /// A [`check`](crate::Cmd::check)ed command ended with a non-zero
    /// status or a signal.
    #[error("`{command}` on {host} failed with {}{}", output.status, stderr_clause(output))]
    Failed {
        /// The host.
        host: String,
        /// The command.
        command: String,
        /// Its status and what it printed.
        output: Box<Output>,
    },
    /// The agent's answer ended before the command's status came.
    #[error("`{command}` on {host} ended without an exit status")]
    Incomplete {
        /// The host.
        host: String,
        /// The command.
        command: String,
    },
    /// A stream feeds one command: a group takes bytes.
    #[error("a stdin stream feeds one host; give Group::run bytes (Cmd::stdin)")]
    StreamForGroup,
    /// Several hosts failed ([`GroupResult::into_result`](chopsticks_core::GroupResult::into_result)).
    #[error("{} hosts failed: {}", failures.len(), list(failures))]
    Hosts {
        /// One error per failed host.
        failures: Vec<CmdError>,
    },
}

impl CmdError {
    /// The host this error is about (empty for [`Hosts`](Self::Hosts) and
    /// [`StreamForGroup`](Self::StreamForGroup)).
    pub fn host(&self) -> &str {
        match self {
            CmdError::Tunnel(error) => error.host(),
            CmdError::NotFound { host, .. }
            | CmdError::BadDirectory { host, .. }
            | CmdError::NoSuchUser { host, .. }
            | CmdError::Spawn { host, .. }
            | CmdError::TimedOut { host, .. }
            | CmdError::StdinNotRead { host, .. }
            | CmdError::Failed { host, .. }
            | CmdError::Incomplete { host, .. } => host,
            CmdError::StreamForGroup | CmdError::Hosts { .. } => "",
        }
    }

    /// What the command printed, for the errors of commands that ran.
    pub fn output(&self) -> Option<&Output> {
        match self {
            CmdError::TimedOut { output, .. }
            | CmdError::StdinNotRead { output, .. }
            | CmdError::Failed { output, .. } => Some(output),
            _ => None,
        }
    }
}

impl chopsticks_core::HostFailures for CmdError {
    fn from_failures(failures: Vec<CmdError>) -> CmdError {
        CmdError::Hosts { failures }
    }
}

fn stderr_clause(output: &Output) -> String {
    let tail = output.stderr_tail();
    if tail.is_empty() {
        String::new()
    } else {
        format!("; stderr ends: {tail}")
    }
}

fn list(failures: &[CmdError]) -> String {
    failures
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}
