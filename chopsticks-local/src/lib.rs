//! Transports that start the agent from this machine: [`Local`] (a
//! subprocess), [`Sudo`] (a subprocess running as another user through
//! `sudo -n`, a `Become` over `Local`) and [`Exec`] (through any command that runs a program on a
//! target: `kubectl exec -i`, `ip netns exec`, `chroot`, ...).
//!
//! ```
//! use chopsticks_core::Tunnel;
//! use chopsticks_local::Local;
//! use chopsticks_agent as _; // lets this program become an agent
//!
//! fn add3(a: i64, b: i64, c: i64) -> i64 { a + b + c }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let tun = Tunnel::new(Local::named("sidecar"));
//! assert_eq!(tun.host(), "sidecar");
//! assert_eq!(tun.call(add3, (1, 2, 39)).await.unwrap(), 42);
//! # });
//! ```

mod exec;
mod local;
mod sudo;

pub use exec::Exec;
pub use local::Local;
pub use sudo::Sudo;

/// Errors of the local transports; core reports them as `Error::Spawn`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalError {
    /// The program could not be executed.
    #[error("could not run {program}")]
    Exec {
        /// The program that was to run.
        program: String,
        /// Why it could not.
        #[source]
        source: std::io::Error,
    },
    /// An [`Exec`] with no command words.
    #[error("the command for {host:?} is empty; give Exec the words of a command")]
    EmptyCommand {
        /// The host name of the transport.
        host: String,
    },
    /// An [`Exec`] command ended before the agent said hello.
    #[error("`{command}` ended before the agent started{}", stderr_text(stderr))]
    CommandEnded {
        /// The command prefix, its words joined by spaces.
        command: String,
        /// Its last stderr lines, joined by " / ".
        stderr: String,
    },
}

/// Appends the agent's command to `process` behind a prefix that may not
/// pass this environment on (`sudo`, `kubectl exec`): `env K=V ...` on the
/// target sets it, word by word, then the program and its arguments.
fn append_agent_command(
    process: &mut tokio::process::Command,
    command: &chopsticks_core::AgentCommand,
) {
    if !command.env_vars().is_empty() {
        process.arg("env");
        process.args(
            command
                .env_vars()
                .iter()
                .map(|(key, value)| format!("{key}={value}")),
        );
    }
    process.arg(command.program()).args(command.args());
}

fn stderr_text(stderr: &str) -> String {
    if stderr.is_empty() {
        " (it wrote nothing to stderr)".to_string()
    } else {
        format!(": {stderr}")
    }
}

fn spawn_piped(
    mut command: tokio::process::Command,
    program: &str,
) -> Result<chopsticks_core::Pipes, LocalError> {
    use std::process::Stdio;
    let exec_error = |source| LocalError::Exec {
        program: program.to_string(),
        source,
    };
    let child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(exec_error)?;
    chopsticks_core::Pipes::from_child(child).map_err(exec_error)
}
