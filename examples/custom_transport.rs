//! A transport written outside chopsticks: the agent runs in a new session
//! with an empty environment, through `setsid` and `env -i`.
//!
//! The same pattern reaches `kubectl exec`, `lxc exec` or `ip netns exec`:
//! put the wrapper in front of the command core asks for.
//!
//! Run with `cargo run --example custom_transport`.

use std::process::Stdio;

use chopsticks::{AgentCommand, AgentLaunch, BoxError, Pipes, Transport, Tunnel, async_trait};

/// Runs the agent as `setsid env -i [VARS] PROGRAM ARGS`.
pub struct Isolated {
    name: String,
}

impl Isolated {
    /// An isolated local agent called `name`.
    pub fn new(name: impl Into<String>) -> Self {
        Isolated { name: name.into() }
    }
}

#[async_trait]
impl Transport for Isolated {
    fn host(&self) -> &str {
        &self.name
    }

    fn launch(&self) -> AgentLaunch {
        // The program is reachable on this machine, so no upload is needed.
        AgentLaunch::Direct
    }

    async fn spawn(&self, command: &AgentCommand) -> Result<Pipes, BoxError> {
        let child = tokio::process::Command::new("setsid")
            .arg("env")
            .arg("-i")
            .args(
                command
                    .env_vars()
                    .iter()
                    .map(|(key, value)| format!("{key}={value}")),
            )
            .arg(command.program())
            .args(command.args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        Ok(Pipes::from_child(child)?)
    }
}

fn environment_size() -> usize {
    std::env::vars().count()
}

#[tokio::main]
async fn main() -> chopsticks::Result<()> {
    let tun = Tunnel::new(Isolated::new("isolated"));
    let count = tun.call(environment_size, ()).await?;
    println!(
        "the agent on {} sees {count} environment variables",
        tun.host()
    );
    tun.close().await
}
