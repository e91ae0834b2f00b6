//! [`Exec`]: the agent through any command that runs a program on the
//! target with its stdin and stdout (`kubectl exec -i POD --`, `ip netns
//! exec NS`, `chroot DIR`, ...).

use chopsticks_core::{AgentCommand, AgentLaunch, BoxError, Pipes, Transport, async_trait};

use crate::{LocalError, append_agent_command, spawn_piped};

/// Starts the agent through a command prefix, by the shell bootstrap.
///
/// The prefix is argv, never a shell string: `Exec::new(["kubectl", "exec",
/// "-i", "web-0", "--"])` runs `kubectl` with those words followed by
/// `sh -c SCRIPT ARGS...`. The command must hand the words after the prefix
/// to the target as they are (as `exec`, `chroot`, `nsenter`, `kubectl
/// exec`, `docker exec` and `podman exec` do) and connect its stdin and
/// stdout; one that joins them into a remote shell line (`ssh`) needs the
/// [`Ssh`](https://docs.rs/chopsticks/latest/chopsticks/struct.Ssh.html)
/// transport instead. The target needs what the shell bootstrap needs (a
/// POSIX `sh`, `uname`, `ls`, `head`, `mktemp`, `openssl` or `sha256sum`,
/// `/proc`, `/dev/null`) and must run this program.
///
/// ```no_run
/// use chopsticks_core::Tunnel;
/// use chopsticks_local::Exec;
///
/// // Untested here (no cluster runs on the test machines): a pod, and a
/// // Podman container.
/// let pod = Tunnel::new(Exec::new(["kubectl", "exec", "-i", "web-0", "--"]).named("web-0"));
/// let container = Tunnel::new(Exec::new(["podman", "exec", "-i", "db"]).named("db"));
/// // Tested: a network namespace.
/// let namespaced = Tunnel::new(Exec::new(["ip", "netns", "exec", "blue"]).named("blue"));
/// ```
#[derive(Debug, Clone)]
pub struct Exec {
    prefix: Vec<String>,
    name: String,
}

impl Exec {
    /// Runs the bootstrap through `prefix`; the host name is the prefix's
    /// words joined by spaces until [`named`](Self::named) gives one.
    pub fn new<I, S>(prefix: I) -> Exec
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let prefix: Vec<String> = prefix.into_iter().map(Into::into).collect();
        Exec {
            name: prefix.join(" "),
            prefix,
        }
    }

    /// The host name for errors, stderr prefixes and group keys.
    pub fn named(mut self, host: impl Into<String>) -> Exec {
        self.name = host.into();
        self
    }

    fn command_line(&self) -> String {
        self.prefix.join(" ")
    }
}

#[async_trait]
impl Transport for Exec {
    fn host(&self) -> &str {
        &self.name
    }

    fn launch(&self) -> AgentLaunch {
        AgentLaunch::ShellBootstrap
    }

    async fn spawn(&self, command: &AgentCommand) -> Result<Pipes, BoxError> {
        let Some((program, words)) = self.prefix.split_first() else {
            return Err(Box::new(LocalError::EmptyCommand {
                host: self.name.clone(),
            }));
        };
        let mut process = tokio::process::Command::new(program);
        process.args(words);
        append_agent_command(&mut process, command);
        Ok(spawn_piped(process, program)?)
    }

    fn diagnose(&self, stderr_tail: &[String]) -> Option<BoxError> {
        Some(Box::new(LocalError::CommandEnded {
            command: self.command_line(),
            stderr: stderr_tail.join(" / "),
        }))
    }
}
