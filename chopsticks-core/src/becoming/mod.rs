//! [`Become`]: the agent as another user, through `sudo` or `doas`, over
//! any transport.
//!
//! `Become` wraps a transport and puts `sudo -u USER --` (or `doas -u USER
//! --`) in front of the command it starts, every word passed as a word. The
//! agent then reaches the target user through the shell bootstrap, into
//! that user's own cache. A password goes to `sudo -S` on stdin, after a
//! prompt set to a random token; see [`dialogue`].

mod dialogue;
mod password;

use std::sync::Arc;

use async_trait::async_trait;
use tokio::io::AsyncReadExt as _;

pub use password::Password;

use self::dialogue::{Stop, Tokens};
use self::password::PasswordSource;
use crate::error::BoxError;
use crate::transport::{AgentCommand, AgentLaunch, ExitReport, Pipes, Transport};
use std::time::Duration;

/// Runs the agent as another user through `sudo` or `doas`, over any
/// transport: locally, over ssh, in a container, through any command.
///
/// The user is `root` until [`user`](Self::user) names another. Without a
/// password, `sudo -n` (or `doas -n`) must be allowed without one (a
/// `NOPASSWD` or `nopass` rule), and never prompts. With
/// [`password`](Self::password) or [`password_from`](Self::password_from),
/// `sudo -S` gets it on its standard input after a prompt set to a random
/// token, so the prompt is recognised in any language; a wrong password
/// fails at once with [`BecomeError::WrongPassword`], and `sudo`'s second
/// prompt is never answered. The password never appears in an argument,
/// the environment, a log, `Debug` output or an error, and is zeroed when
/// dropped.
///
/// The host name is the wrapped transport's. The whole exchange is bounded
/// by the tunnel's connect timeout
/// ([`TunnelBuilder::connect_timeout`](crate::TunnelBuilder::connect_timeout)).
///
/// ```
/// use chopsticks_core::{Become, Password, Transport, Tunnel};
///
/// /// root on `host`, by a NOPASSWD rule.
/// fn as_root(host: impl Transport) -> Tunnel {
///     Tunnel::new(Become::sudo(host))
/// }
///
/// /// postgres on `host`, with a password asked for once per host.
/// fn as_postgres(host: impl Transport) -> Tunnel {
///     Tunnel::new(Become::sudo(host).user("postgres").password_from(|host, user| {
///         eprintln!("password to become {user} on {host}?");
///         let mut line = String::new();
///         std::io::stdin().read_line(&mut line).ok()?;
///         Some(Password::new(line.trim_end_matches(['\n', '\r'])))
///     }))
/// }
/// ```
#[derive(Clone)]
pub struct Become<T> {
    inner: T,
    tool: BecomeTool,
    user: String,
    password: Option<PasswordSource>,
}

/// The program a [`Become`] runs to change user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BecomeTool {
    /// `sudo`, with passwords on its standard input (`-S`).
    Sudo,
    /// OpenBSD's `doas` (OpenDoas on Linux), which reads passwords only
    /// from a terminal: it needs a `nopass` rule.
    Doas,
}

impl std::fmt::Display for BecomeTool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BecomeTool::Sudo => "sudo",
            BecomeTool::Doas => "doas",
        })
    }
}

impl<T> std::fmt::Debug for Become<T>
where
    T: std::fmt::Debug,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Become")
            .field("inner", &self.inner)
            .field("tool", &self.tool)
            .field("user", &self.user)
            .field("password", &self.password)
            .finish()
    }
}

impl<T> Become<T> {
    /// Becomes root through `sudo` on `inner`'s target.
    pub fn sudo(inner: T) -> Become<T> {
        Become::with_tool(inner, BecomeTool::Sudo)
    }

    /// Becomes root through `doas` on `inner`'s target.
    pub fn doas(inner: T) -> Become<T> {
        Become::with_tool(inner, BecomeTool::Doas)
    }

    fn with_tool(inner: T, tool: BecomeTool) -> Become<T> {
        Become {
            inner,
            tool,
            user: "root".to_string(),
            password: None,
        }
    }

    /// Becomes `user` instead of root (a name, or `#UID` for `sudo`).
    pub fn user(mut self, user: impl Into<String>) -> Become<T> {
        self.user = user.into();
        self
    }

    /// Answers `sudo`'s password prompt with `password`.
    pub fn password(mut self, password: impl Into<Password>) -> Become<T> {
        self.password = Some(PasswordSource::Given(password.into()));
        self
    }

    /// Answers `sudo`'s password prompt with what `ask(host, user)` gives,
    /// asked on a blocking thread the first time `sudo` prompts (never with
    /// a `NOPASSWD` rule), and kept for reconnects to this host until `sudo`
    /// rejects it. `None` gives up with [`BecomeError::NoPassword`].
    pub fn password_from(
        mut self,
        ask: impl Fn(&str, &str) -> Option<Password> + Send + Sync + 'static,
    ) -> Become<T> {
        self.password = Some(PasswordSource::asked(Arc::new(ask)));
        self
    }

    /// The wrapped transport.
    pub fn inner(&self) -> &T {
        &self.inner
    }

    /// The user this becomes.
    pub fn target_user(&self) -> &str {
        &self.user
    }

    /// The same tool, user and password over another transport (another
    /// host, say); a password callback is asked afresh for it.
    ///
    /// ```
    /// use chopsticks_core::Become;
    ///
    /// let template = Become::sudo(()).user("postgres");
    /// let db2 = template.over("db2");
    /// assert_eq!(db2.target_user(), "postgres");
    /// assert_eq!(*db2.inner(), "db2");
    /// ```
    pub fn over<U>(&self, inner: U) -> Become<U> {
        Become {
            inner,
            tool: self.tool,
            user: self.user.clone(),
            password: self.password.as_ref().map(PasswordSource::for_another_host),
        }
    }

    fn checked_user(&self) -> Result<&str, BecomeError> {
        let invalid = |reason| BecomeError::InvalidUser {
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

    /// `command` behind the tool and the marker shell.
    fn wrap(&self, command: &AgentCommand, tokens: &Tokens, user: &str) -> AgentCommand {
        // `env` first: the tool's messages in one language, and a missing
        // tool named by `env` on stderr, whatever runs the command.
        let mut wrapped = AgentCommand::new("env")
            .arg("LC_ALL=C")
            .arg(self.tool.to_string());
        match (self.tool, &self.password) {
            (BecomeTool::Sudo, Some(_)) => {
                wrapped = wrapped.arg("-S").arg("-p").arg(&tokens.prompt)
            }
            _ => wrapped = wrapped.arg("-n"),
        }
        if self.tool == BecomeTool::Sudo {
            // The target user's home, so the agent cache is theirs (doas
            // sets it by itself).
            wrapped = wrapped.arg("-H");
        }
        wrapped = wrapped
            .arg("-u")
            .arg(user)
            .arg("--")
            .arg("sh")
            .arg("-c")
            .arg(MARKER_SHELL)
            .arg(&tokens.marker);
        // sudo and doas reset the environment: `env` sets it on the far side.
        if !command.env_vars().is_empty() {
            wrapped = wrapped.arg("env");
            for (key, value) in command.env_vars() {
                wrapped = wrapped.arg(format!("{key}={value}"));
            }
        }
        wrapped = wrapped.arg(command.program());
        for arg in command.args() {
            wrapped = wrapped.arg(arg);
        }
        wrapped
    }
}

/// Runs as the target user: says so with the marker (`$0`), drops the
/// `LC_ALL` given to the tool, and becomes the command.
const MARKER_SHELL: &str = "printf '%s\\n' \"$0\" >&2; unset LC_ALL; exec \"$@\"";

#[async_trait]
impl<T: Transport> Transport for Become<T> {
    fn host(&self) -> &str {
        self.inner.host()
    }

    fn launch(&self) -> AgentLaunch {
        AgentLaunch::ShellBootstrap
    }

    async fn spawn(&self, command: &AgentCommand) -> Result<Pipes, BoxError> {
        let user = self.checked_user()?;
        let host = self.inner.host();
        if self.tool == BecomeTool::Doas && self.password.is_some() {
            return Err(Box::new(BecomeError::NeedsTerminal {
                host: host.to_string(),
                user: user.to_string(),
            }));
        }
        let tokens = Tokens::new()?;
        let wrapped = self.wrap(command, &tokens, user);
        let mut pipes = self.inner.spawn(&wrapped).await?;
        let Some(mut stderr) = pipes.stderr.take() else {
            let _ = pipes.process.start_kill();
            return Err(Box::new(BecomeError::Failed {
                host: host.to_string(),
                user: user.to_string(),
                tool: self.tool,
                status: None,
                stderr: "the transport gave no separate stderr, where sudo and doas speak".into(),
            }));
        };
        let talk = dialogue::Talk {
            stdin: pipes.stdin.as_mut(),
            stdout: pipes.stdout.as_mut(),
            stderr: stderr.as_mut(),
        };
        match dialogue::converse(talk, &tokens, self.password.as_ref(), (host, user)).await {
            Ok(became) => {
                pipes.stderr = Some(Box::new(std::io::Cursor::new(became.stderr).chain(stderr)));
                if !became.stdout.is_empty() {
                    let stdout = std::mem::replace(&mut pipes.stdout, Box::new(tokio::io::empty()));
                    pipes.stdout = Box::new(std::io::Cursor::new(became.stdout).chain(stdout));
                }
                Ok(pipes)
            }
            Err(stop) => {
                // No second answer: the tool sees its input end.
                pipes.stdin = Box::new(tokio::io::sink());
                if !matches!(stop, Stop::Ended { .. }) {
                    let _ = pipes.process.start_kill();
                }
                // An ending process's status tells a missing program.
                let status = stop_process(&mut pipes, Duration::from_secs(2)).await;
                let error = self.failure(stop, status, user);
                if matches!(
                    error,
                    BecomeError::WrongPassword { .. } | BecomeError::UnusablePassword { .. }
                ) && let Some(source) = &self.password
                {
                    source.rejected();
                }
                Err(Box::new(error))
            }
        }
    }

    fn diagnose(&self, stderr_tail: &[String]) -> Option<BoxError> {
        self.inner.diagnose(stderr_tail)
    }
}

/// Waits up to `bound` for the process to end, then kills it; its status,
/// when it came.
async fn stop_process(pipes: &mut Pipes, bound: Duration) -> Option<ExitReport> {
    if let Ok(Ok(status)) = tokio::time::timeout(bound, pipes.process.wait()).await {
        return Some(status);
    }
    let _ = pipes.process.start_kill();
    tokio::time::timeout(bound, pipes.process.wait())
        .await
        .ok()
        .and_then(Result::ok)
}

impl<T: Transport> Become<T> {
    /// The error for a conversation that did not reach the agent's command.
    fn failure(&self, stop: Stop, status: Option<ExitReport>, user: &str) -> BecomeError {
        let (host, tool, user) = (self.inner.host().to_string(), self.tool, user.to_string());
        match stop {
            Stop::Rejected => BecomeError::WrongPassword { host, user, tool },
            Stop::NoSource => BecomeError::PasswordRequired { host, user, tool },
            Stop::NoPassword => BecomeError::NoPassword { host, user },
            Stop::Unusable => BecomeError::UnusablePassword { host, user, tool },
            Stop::ForeignPrompt { question } => BecomeError::Question {
                host,
                user,
                tool,
                question,
            },
            Stop::StdoutFlood => BecomeError::Failed {
                host,
                user,
                tool,
                status: None,
                stderr: "its standard output carried more than a start of sudo or doas ever \
                         does, before the user's shell ran"
                    .into(),
            },
            Stop::Ended { said, answered } => match classify(&said, status, answered, tool) {
                Some(Kind::WrongPassword) => BecomeError::WrongPassword { host, user, tool },
                Some(Kind::PasswordRequired) => BecomeError::PasswordRequired { host, user, tool },
                Some(Kind::NotAllowed) => BecomeError::NotAllowed {
                    host,
                    user,
                    tool,
                    message: refusal_words(&said, tool),
                },
                Some(Kind::UnknownUser) => BecomeError::UnknownUser { host, user, tool },
                Some(Kind::NotInstalled) => BecomeError::NotInstalled { host, tool },
                None => {
                    // The transport may know better (ssh: authentication,
                    // host key, refusal).
                    let lines: Vec<String> = said.lines().map(str::to_string).collect();
                    if let Some(explained) = self.inner.diagnose(&lines) {
                        return BecomeError::Transport {
                            host,
                            source: explained,
                        };
                    }
                    BecomeError::Failed {
                        host,
                        user,
                        tool,
                        status: status.map(|status| status.to_string()),
                        stderr: said,
                    }
                }
            },
        }
    }
}

/// What `sudo` or `doas` said, told apart (with `LC_ALL=C`).
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    WrongPassword,
    PasswordRequired,
    NotAllowed,
    UnknownUser,
    NotInstalled,
}

fn classify(
    said: &str,
    status: Option<ExitReport>,
    answered: bool,
    tool: BecomeTool,
) -> Option<Kind> {
    let has = |text: &str| said.contains(text);
    let name = tool.to_string();
    let own = format!("{name}:");
    if answered && (has("incorrect password attempt") || has("Sorry, try again")) {
        return Some(Kind::WrongPassword);
    }
    if has("a password is required")
        || has("interactive authentication is required")
        || has("Authentication required")
        || has("Authorization required")
    {
        return Some(Kind::PasswordRequired);
    }
    if has("unknown user") {
        return Some(Kind::UnknownUser);
    }
    let doas_refused = tool == BecomeTool::Doas
        && said
            .lines()
            .any(|line| line.starts_with("doas:") && line.contains("Operation not permitted"));
    if has("is not in the sudoers file")
        || has("is not allowed to execute")
        || has("may not run sudo")
        || doas_refused
    {
        return Some(Kind::NotAllowed);
    }
    // Another program saying the tool is missing (`env: 'sudo': No such
    // file or directory`, Docker's "executable file not found"), never the
    // tool itself complaining about something it runs.
    let missing = said.lines().any(|line| {
        !line.starts_with(&own)
            && line.contains(&name)
            && (line.contains("not found") || line.contains("No such file"))
    });
    let code = status.and_then(|status| status.code);
    if missing || (said.is_empty() && matches!(code, Some(126 | 127))) {
        return Some(Kind::NotInstalled);
    }
    None
}

/// The tool's refusal: its own lines, with the agent's long command line
/// (which sudo quotes, newlines and all) left out.
fn refusal_words(said: &str, tool: BecomeTool) -> String {
    let text = match (said.find(" to execute '"), said.rfind("' as ")) {
        (Some(start), Some(end)) if start < end => format!(
            "{} to execute the agent's command{}",
            &said[..start],
            &said[end + 1..]
        ),
        _ => said.to_string(),
    };
    let own = format!("{tool}:");
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| line.starts_with(&own) || line.starts_with("Sorry"))
        .collect();
    if lines.is_empty() {
        text.lines().collect::<Vec<_>>().join(" / ")
    } else {
        lines.join(" / ")
    }
}

/// Why a [`Become`] could not run the agent as its user. Each names the
/// host, and the user where it matters; none holds the password.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BecomeError {
    /// The password was rejected; it was given once and not again.
    #[error("{tool} on {host} rejected the password for becoming {user}")]
    WrongPassword {
        /// The host.
        host: String,
        /// The user to become.
        user: String,
        /// sudo or doas.
        tool: BecomeTool,
    },
    /// A password is needed: there is no `NOPASSWD` (or `nopass`) rule for
    /// the login user, and none was given.
    #[error(
        "{tool} on {host} wants a password to become {user}: the login user has no rule that \
         needs none; give one with Become::password (sudo), or add a NOPASSWD rule"
    )]
    PasswordRequired {
        /// The host.
        host: String,
        /// The user to become.
        user: String,
        /// sudo or doas.
        tool: BecomeTool,
    },
    /// The login user has no rule to become this user.
    #[error("{tool} on {host} does not let the login user become {user}: {message}")]
    NotAllowed {
        /// The host.
        host: String,
        /// The user to become.
        user: String,
        /// sudo or doas.
        tool: BecomeTool,
        /// What the tool said.
        message: String,
    },
    /// The target has no such user.
    #[error("{tool} on {host} knows no user {user}")]
    UnknownUser {
        /// The host.
        host: String,
        /// The user to become.
        user: String,
        /// sudo or doas.
        tool: BecomeTool,
    },
    /// The target has no `sudo` (or `doas`) on its `PATH`.
    #[error("{tool} is not installed on {host} (no executable {tool} is on the login user's PATH)")]
    NotInstalled {
        /// The host.
        host: String,
        /// sudo or doas.
        tool: BecomeTool,
    },
    /// The password callback gave none.
    #[error("no password to become {user} on {host}: the password callback gave none")]
    NoPassword {
        /// The host.
        host: String,
        /// The user to become.
        user: String,
    },
    /// The password holds a line break or NUL, which would end it early
    /// and hand the rest to the agent; it was not sent.
    #[error(
        "the password for becoming {user} on {host} holds a line break or NUL, where {tool} \
         would end it; it was not sent"
    )]
    UnusablePassword {
        /// The host.
        host: String,
        /// The user to become.
        user: String,
        /// sudo or doas.
        tool: BecomeTool,
    },
    /// `doas` was given a password, which it reads only from a terminal.
    #[error(
        "doas on {host} reads passwords only from a terminal: give the login user a \
         `permit nopass` rule to become {user}, or use sudo"
    )]
    NeedsTerminal {
        /// The host.
        host: String,
        /// The user to become.
        user: String,
    },
    /// The user name cannot be passed safely.
    #[error("{user:?} is not a usable user name: {reason}")]
    InvalidUser {
        /// The rejected name.
        user: String,
        /// Why it was rejected.
        reason: &'static str,
    },
    /// Something asked a question other than the password prompt (a
    /// one-time code, a new password for an expired one) and waited.
    #[error(
        "{tool} on {host} asked {question:?} while becoming {user}, which is not its password \
         prompt; chopsticks answers only that one"
    )]
    Question {
        /// The host.
        host: String,
        /// The user to become.
        user: String,
        /// sudo or doas.
        tool: BecomeTool,
        /// The question, as it was printed.
        question: String,
    },
    /// The transport explained the failure (ssh: authentication, host key, ...).
    #[error("{source}")]
    Transport {
        /// The host.
        host: String,
        /// The transport's own error.
        source: BoxError,
    },
    /// The tool ended before the user's shell ran, for another reason.
    #[error(
        "{tool} on {host} ended before becoming {user}{}: {}",
        status.as_ref().map(|status| format!(" ({status})")).unwrap_or_default(),
        if stderr.is_empty() { "it wrote nothing to stderr" } else { stderr.as_str() }
    )]
    Failed {
        /// The host.
        host: String,
        /// The user to become.
        user: String,
        /// sudo or doas.
        tool: BecomeTool,
        /// How it ended, when known.
        status: Option<String>,
        /// What it wrote to stderr.
        stderr: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(command: &AgentCommand) -> Vec<&str> {
        std::iter::once(command.program())
            .chain(command.args().iter().map(String::as_str))
            .collect()
    }

    fn tokens() -> Tokens {
        Tokens {
            prompt: "P:".into(),
            marker: "M".into(),
        }
    }

    #[test]
    fn sudo_without_a_password_never_prompts() {
        let command = AgentCommand::new("sh").arg("-c").arg("x; y");
        let wrapped = Become::sudo(()).wrap(&command, &tokens(), "root");
        assert_eq!(
            words(&wrapped),
            [
                "env",
                "LC_ALL=C",
                "sudo",
                "-n",
                "-H",
                "-u",
                "root",
                "--",
                "sh",
                "-c",
                MARKER_SHELL,
                "M",
                "sh",
                "-c",
                "x; y"
            ]
        );
        assert!(wrapped.env_vars().is_empty());
    }

    #[test]
    fn a_password_goes_to_stdin_after_the_random_prompt() {
        let command = AgentCommand::new("agent").env("A", "b c");
        let wrapped = Become::sudo(()).user("postgres").password("secret").wrap(
            &command,
            &tokens(),
            "postgres",
        );
        let words = words(&wrapped);
        assert_eq!(
            words[..9],
            [
                "env", "LC_ALL=C", "sudo", "-S", "-p", "P:", "-H", "-u", "postgres"
            ]
        );
        assert_eq!(words[words.len() - 3..], ["env", "A=b c", "agent"]);
        assert!(!format!("{wrapped:?}").contains("secret"));
        assert!(
            !format!("{:?}", Become::sudo(()).password("secret")).contains("secret"),
            "Debug shows no password"
        );
    }

    #[test]
    fn doas_has_no_home_flag() {
        let wrapped = Become::doas(()).wrap(&AgentCommand::new("a"), &tokens(), "root");
        assert_eq!(words(&wrapped)[2..7], ["doas", "-n", "-u", "root", "--"]);
    }

    #[test]
    fn hostile_user_names_are_refused() {
        for user in ["", "-s", "a b", "a\nb"] {
            assert!(matches!(
                Become::sudo(()).user(user).checked_user(),
                Err(BecomeError::InvalidUser { .. })
            ));
        }
        assert!(Become::sudo(()).user("#1000").checked_user().is_ok());
    }

    #[test]
    fn a_refusal_leaves_the_command_out() {
        let said = "We trust you have received the usual lecture.\n\
                    Sorry, user a is not allowed to execute '/bin/sh -c x\ny\nz' as b on h.";
        assert_eq!(
            refusal_words(said, BecomeTool::Sudo),
            "Sorry, user a is not allowed to execute the agent's command as b on h."
        );
    }

    #[test]
    fn messages_are_told_apart() {
        let sudo = |said, answered| classify(said, None, answered, BecomeTool::Sudo);
        assert_eq!(
            sudo(
                "Sorry, try again.\nsudo: 1 incorrect password attempt",
                true
            ),
            Some(Kind::WrongPassword)
        );
        assert_eq!(
            sudo("sudo: a password is required", false),
            Some(Kind::PasswordRequired)
        );
        assert_eq!(
            sudo(
                "Sorry, user a is not allowed to execute 'x' as b on h.",
                true
            ),
            Some(Kind::NotAllowed)
        );
        assert_eq!(
            sudo("sudo: unknown user nosuch", false),
            Some(Kind::UnknownUser)
        );
        assert_eq!(
            sudo("sh: 1: sudo: not found", false),
            Some(Kind::NotInstalled)
        );
        assert_eq!(
            classify(
                "",
                Some(ExitReport {
                    code: Some(127),
                    signal: None
                }),
                false,
                BecomeTool::Sudo
            ),
            Some(Kind::NotInstalled)
        );
        assert_eq!(
            classify(
                "doas: Operation not permitted",
                None,
                false,
                BecomeTool::Doas
            ),
            Some(Kind::NotAllowed)
        );
        assert_eq!(sudo("something else", false), None);
        // sudo itself missing a program is not sudo missing.
        assert_eq!(sudo("sudo: sh: command not found", false), None);
        assert_eq!(
            sudo("env: 'sudo': No such file or directory", false),
            Some(Kind::NotInstalled)
        );
        assert_eq!(
            sudo(
                "sudo: setrlimit(RLIMIT_CORE): Operation not permitted\nsudo: unknown user x",
                false
            ),
            Some(Kind::UnknownUser)
        );
        assert_eq!(
            sudo(
                "sudo: setrlimit(RLIMIT_CORE): Operation not permitted",
                false
            ),
            None
        );
        assert_eq!(
            sudo("sudo: interactive authentication is required", false),
            Some(Kind::PasswordRequired)
        );
        assert_eq!(
            classify(
                "bash: line 1: x",
                Some(ExitReport {
                    code: Some(127),
                    signal: None
                }),
                false,
                BecomeTool::Sudo
            ),
            None
        );
    }
}
