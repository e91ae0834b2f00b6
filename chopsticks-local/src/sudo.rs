//! [`Sudo`]: the agent as another user on this machine.

use chopsticks_core::{AgentCommand, AgentLaunch, BoxError, Pipes, Transport, async_trait};

use crate::{LocalError, append_agent_command, spawn_piped};

/// Runs the agent as `user` through `sudo -n -H -u USER`.
///
/// `sudo` must allow this without a password (`-n` never prompts). The agent
/// file reaches the user through the shell bootstrap, cached under the
/// user's `~/.cache/chopsticks` (or a private `/tmp/chopsticks-UID`).
#[derive(Debug, Clone)]
pub struct Sudo {
    user: String,
    host: String,
}

impl Sudo {
    /// An agent running as `user`; its host name is `sudo:USER`.
    pub fn new(user: impl Into<String>) -> Sudo {
        let user = user.into();
        Sudo {
            host: format!("sudo:{user}"),
            user,
        }
    }

    fn checked_user(&self) -> Result<&str, LocalError> {
        let invalid = |reason| LocalError::InvalidUser {
            user: self.user.clone(),
            reason,
        };
        if self.user.is_empty() {
            return Err(invalid("it is empty"));
        }
        if self.user.starts_with('-') {
            return Err(invalid("it starts with '-' and would be read as an option"));
        }
        if self
            .user
            .chars()
            .any(|ch| ch.is_whitespace() || ch.is_control())
        {
            return Err(invalid("it contains white space or control characters"));
        }
        Ok(&self.user)
    }
}

#[async_trait]
impl Transport for Sudo {
    fn host(&self) -> &str {
        &self.host
    }

    fn launch(&self) -> AgentLaunch {
        AgentLaunch::ShellBootstrap
    }

    async fn spawn(&self, command: &AgentCommand) -> Result<Pipes, BoxError> {
        let user = self.checked_user()?;
        let mut process = tokio::process::Command::new("sudo");
        process.args(["-n", "-H", "-u", user, "--"]);
        // sudo resets the environment.
        append_agent_command(&mut process, command);
        Ok(spawn_piped(process, "sudo")?)
    }
}
