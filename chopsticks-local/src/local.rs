//! [`Local`]: the agent as a subprocess of this program.

use chopsticks_core::{AgentCommand, AgentLaunch, BoxError, Pipes, Transport, async_trait};

use crate::spawn_piped;

/// Runs the agent as a child process on this machine.
///
/// By default the child executes this very program through `/proc/PID/exe`
/// (no copy, no shell). [`shell_bootstrap`](Self::shell_bootstrap) makes it
/// go through the same `sh` bootstrap and agent cache that remote targets use.
#[derive(Debug, Clone)]
pub struct Local {
    name: String,
    shell_bootstrap: bool,
    env: Vec<(String, String)>,
}

impl Default for Local {
    fn default() -> Self {
        Local::new()
    }
}

impl Local {
    /// A local agent whose host name is `localhost`.
    pub fn new() -> Local {
        Local::named("localhost")
    }

    /// A local agent with its own host name, for errors, stderr prefixes and group keys.
    pub fn named(name: impl Into<String>) -> Local {
        Local {
            name: name.into(),
            shell_bootstrap: false,
            env: Vec::new(),
        }
    }

    /// Starts the agent through the shell bootstrap and agent cache instead of directly.
    pub fn shell_bootstrap(mut self, enabled: bool) -> Local {
        self.shell_bootstrap = enabled;
        self
    }

    /// Sets an environment variable for the agent process (for example `XDG_CACHE_HOME`).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Local {
        self.env.push((key.into(), value.into()));
        self
    }
}

#[async_trait]
impl Transport for Local {
    fn host(&self) -> &str {
        &self.name
    }

    fn launch(&self) -> AgentLaunch {
        if self.shell_bootstrap {
            AgentLaunch::ShellBootstrap
        } else {
            AgentLaunch::Direct
        }
    }

    async fn spawn(&self, command: &AgentCommand) -> Result<Pipes, BoxError> {
        let mut process = tokio::process::Command::new(command.program());
        process
            .args(command.args())
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .envs(command.env_vars().iter().map(|(key, value)| (key, value)));
        Ok(spawn_piped(process, command.program())?)
    }
}
