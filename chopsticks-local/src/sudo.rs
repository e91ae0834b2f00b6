//! [`Sudo`]: the agent as another user on this machine.

use chopsticks_core::{AgentCommand, AgentLaunch, Become, BoxError, Pipes, Transport, async_trait};

use crate::Local;

/// Runs the agent as `user` on this machine through `sudo -n -H -u USER`:
/// [`Become`] over [`Local`], under the host name `sudo:USER`.
///
/// `sudo` must allow this without a password (`-n` never prompts); for a
/// password, use `Become::sudo(Local::new()).user(USER).password(...)`. The
/// agent file reaches the user through the shell bootstrap, cached under the
/// user's `~/.cache/chopsticks` (or a private `/tmp/chopsticks-UID`).
#[derive(Debug, Clone)]
pub struct Sudo {
    inner: Become<Local>,
}

impl Sudo {
    /// An agent running as `user`; its host name is `sudo:USER`.
    pub fn new(user: impl Into<String>) -> Sudo {
        let user = user.into();
        Sudo {
            inner: Become::sudo(Local::named(format!("sudo:{user}"))).user(user),
        }
    }
}

#[async_trait]
impl Transport for Sudo {
    fn host(&self) -> &str {
        self.inner.host()
    }

    fn launch(&self) -> AgentLaunch {
        self.inner.launch()
    }

    async fn spawn(&self, command: &AgentCommand) -> Result<Pipes, BoxError> {
        self.inner.spawn(command).await
    }

    fn diagnose(&self, stderr_tail: &[String]) -> Option<BoxError> {
        self.inner.diagnose(stderr_tail)
    }
}
