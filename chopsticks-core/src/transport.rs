//! The [`Transport`] trait: anything that can start a process and hand back its pipes.
//!
//! Core decides *what* to run (an [`AgentCommand`]); a transport decides *how*
//! to run it on its target: as a local subprocess, under `sudo`, through `ssh`,
//! inside a container, or through any other `kubectl exec`-style pipe.

use std::fmt;
use std::io;

use async_trait::async_trait;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::BoxError;

/// How the agent program reaches the target.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum AgentLaunch {
    /// The target can execute this very program through `/proc/self/exe`
    /// (same machine, same user or a user who can read it). No upload.
    Direct,
    /// The target has a POSIX `sh`; core runs the shell bootstrap, which
    /// uploads the agent only when its content-addressed cache misses.
    ShellBootstrap,
}

/// The process a transport must start: a program, its arguments and its environment.
///
/// Transports that start programs directly use [`program`](Self::program),
/// [`args`](Self::args) and [`env`](Self::env). Transports that can only
/// pass a command line to a remote shell (ssh) use
/// [`to_shell_command`](Self::to_shell_command), which quotes every word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentCommand {
    program: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl AgentCommand {
    /// A command that runs `program` with no arguments and no extra environment.
    pub fn new(program: impl Into<String>) -> Self {
        AgentCommand {
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// Appends one argument.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Adds one environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The program to execute.
    pub fn program(&self) -> &str {
        &self.program
    }

    /// The arguments after the program.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// Environment variables to add for the process.
    pub fn env_vars(&self) -> &[(String, String)] {
        &self.env
    }

    /// One command line for a POSIX shell, every word single-quoted, with the
    /// environment as `env K=V` in front, so no host name, path or option is
    /// ever interpreted by the shell.
    pub fn to_shell_command(&self) -> String {
        let mut words = Vec::with_capacity(self.args.len() + self.env.len() + 2);
        if !self.env.is_empty() {
            words.push("env".to_string());
            for (key, value) in &self.env {
                words.push(shell_quote(&format!("{key}={value}")));
            }
        }
        words.push(shell_quote(&self.program));
        words.extend(self.args.iter().map(|arg| shell_quote(arg)));
        words.join(" ")
    }
}

/// Quotes one word for a POSIX shell: `'...'` with embedded quotes as `'\''`.
pub fn shell_quote(word: &str) -> String {
    let mut quoted = String::with_capacity(word.len() + 2);
    quoted.push('\'');
    for ch in word.chars() {
        if ch == '\'' {
            quoted.push_str("'\\''");
        } else {
            quoted.push(ch);
        }
    }
    quoted.push('\'');
    quoted
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ExitReport {
    /// The exit code, when it exited normally.
    pub code: Option<i32>,
    /// The signal that killed it, when one did.
    pub signal: Option<i32>,
}

impl fmt::Display for ExitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exited with status {code}"),
            (None, Some(signal)) => write!(f, "was killed by signal {signal}"),
            (None, None) => f.write_str("ended with an unknown status"),
        }
    }
}

impl From<std::process::ExitStatus> for ExitReport {
    fn from(status: std::process::ExitStatus) -> Self {
        use std::os::unix::process::ExitStatusExt;
        ExitReport {
            code: status.code(),
            signal: status.signal(),
        }
    }
}

/// A started process that can be waited on and killed.
#[async_trait]
pub trait AgentProcess: Send + Sync {
    /// The OS process id on this machine, when there is one.
    fn id(&self) -> Option<u32>;
    /// Asks the process to die now, without waiting.
    fn start_kill(&mut self) -> io::Result<()>;
    /// Waits for the process to end and reaps it. An error means the
    /// transport lost the process without learning how it ended (its
    /// connection broke, say); its text, a clause such as "the ssh
    /// connection broke", goes into the tunnel's errors as it is.
    async fn wait(&mut self) -> io::Result<ExitReport>;
}

#[async_trait]
impl AgentProcess for tokio::process::Child {
    fn id(&self) -> Option<u32> {
        tokio::process::Child::id(self)
    }

    fn start_kill(&mut self) -> io::Result<()> {
        tokio::process::Child::start_kill(self)
    }

    async fn wait(&mut self) -> io::Result<ExitReport> {
        tokio::process::Child::wait(self)
            .await
            .map(ExitReport::from)
    }
}

/// The pipes of a started agent process.
pub struct Pipes {
    /// Writes to the process's standard input. Besides the tunnel's writer
    /// task, a caller's thread may poll it (with a no-op waker, one
    /// nonblocking write) to send a lone call at once, always inside the
    /// runtime's context; it must not block.
    pub stdin: Box<dyn AsyncWrite + Send + Unpin>,
    /// Reads the process's standard output.
    pub stdout: Box<dyn AsyncRead + Send + Unpin>,
    /// Reads the process's standard error, when the transport keeps it separate.
    pub stderr: Option<Box<dyn AsyncRead + Send + Unpin>>,
    /// The process itself.
    pub process: Box<dyn AgentProcess>,
}

impl Pipes {
    /// Takes the three pipes of a `tokio::process::Child` spawned with all of them piped.
    pub fn from_child(mut child: tokio::process::Child) -> io::Result<Pipes> {
        let missing = |name| io::Error::other(format!("the child's {name} was not piped"));
        let stdin = child.stdin.take().ok_or_else(|| missing("stdin"))?;
        let stdout = child.stdout.take().ok_or_else(|| missing("stdout"))?;
        let stderr = child.stderr.take();
        Ok(Pipes {
            stdin: Box::new(stdin),
            stdout: Box::new(stdout),
            stderr: stderr.map(|pipe| Box::new(pipe) as Box<dyn AsyncRead + Send + Unpin>),
            process: Box::new(child),
        })
    }
}

impl fmt::Debug for Pipes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipes")
            .field("stderr", &self.stderr.is_some())
            .field("pid", &self.process.id())
            .finish_non_exhaustive()
    }
}

/// Anything that can start a process on a target and return its pipes.
///
/// Implement this to reach targets that chopsticks does not know about
/// (`kubectl exec`, `lxc exec`, `ip netns exec`, a cloud API). The trait is
/// object-safe; core stores transports as `Arc<dyn Transport>`.
///
/// ```
/// use chopsticks_core::{AgentCommand, AgentLaunch, Pipes, Transport, BoxError};
///
/// /// Runs the agent under `nice -n 10` on this machine.
/// struct Niced;
///
/// #[async_trait::async_trait]
/// impl Transport for Niced {
///     fn host(&self) -> &str { "niced" }
///     fn launch(&self) -> AgentLaunch { AgentLaunch::Direct }
///     async fn spawn(&self, command: &AgentCommand) -> Result<Pipes, BoxError> {
///         let child = tokio::process::Command::new("nice")
///             .arg("-n").arg("10").arg("--").arg(command.program()).args(command.args())
///             .envs(command.env_vars().iter().map(|(k, v)| (k, v)))
///             .stdin(std::process::Stdio::piped())
///             .stdout(std::process::Stdio::piped())
///             .stderr(std::process::Stdio::piped())
///             .kill_on_drop(true)
///             .spawn()?;
///         Ok(Pipes::from_child(child)?)
///     }
/// }
/// ```
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// The name used in errors, stderr prefixes and group keys.
    fn host(&self) -> &str;

    /// How the agent program reaches this target. The default is the shell
    /// bootstrap, which needs only a POSIX `sh` there.
    fn launch(&self) -> AgentLaunch {
        AgentLaunch::ShellBootstrap
    }

    /// Starts `command` on the target with stdin, stdout and stderr piped.
    async fn spawn(&self, command: &AgentCommand) -> Result<Pipes, BoxError>;

    /// Explains a start that ended before the agent said hello, from the
    /// process's last stderr lines, when the transport can say more than the
    /// lines do (ssh: authentication, host key, name resolution, refusal).
    /// The explanation becomes the source of an [`Error::Spawn`](crate::Error::Spawn);
    /// `None` (the default) reports the lines in an `Error::Bootstrap`.
    fn diagnose(&self, stderr_tail: &[String]) -> Option<BoxError> {
        let _ = stderr_tail;
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_defuses_everything() {
        assert_eq!(shell_quote("plain"), "'plain'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(
            shell_quote("$(rm -rf /); `x` \"y\""),
            "'$(rm -rf /); `x` \"y\"'"
        );
    }

    #[test]
    fn shell_command_quotes_env_and_args() {
        let command = AgentCommand::new("sh")
            .arg("-c")
            .arg("echo $1")
            .env("A", "b c");
        assert_eq!(
            command.to_shell_command(),
            "env 'A=b c' 'sh' '-c' 'echo $1'"
        );
    }
}
