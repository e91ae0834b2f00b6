//! [`Ssh`]: the agent on a remote host, through the system's OpenSSH client.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use chopsticks_core::{AgentCommand, Become, BoxError, Pipes, Transport, async_trait};

use crate::SshError;
use crate::diagnose::diagnose;

/// How often the client checks that the server is still there, and how many
/// unanswered checks end the connection (so a dead host is noticed in ~60 s).
const ALIVE_INTERVAL: u32 = 15;
const ALIVE_COUNT: u32 = 4;

/// Runs the agent on `host` through `ssh` (the OpenSSH client on `PATH`).
///
/// Your `~/.ssh/config` applies as it does for `ssh host`: aliases, `User`,
/// `Port`, `IdentityFile`, `ProxyJump`, agents, `ControlMaster`, known hosts.
/// The client runs with `BatchMode=yes` (it never prompts), keep-alives, and
/// no forwarding; host keys are checked as your configuration says, and
/// chopsticks never turns that off. The host name always follows `--`, so it
/// can never be read as an option, and the remote command is one
/// shell-quoted string.
///
/// ```no_run
/// use chopsticks_core::Tunnel;
/// use chopsticks_ssh::Ssh;
/// # use chopsticks_agent as _;
///
/// # async fn demo() -> chopsticks_core::Result<()> {
/// let tun = Tunnel::new(Ssh::new("web1.example.com").user("deploy").port(2222));
/// let kernel: String = tun.call(|| std::fs::read_to_string("/proc/version").unwrap_or_default(), ()).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Ssh {
    /// What `ssh` connects to: a name, an address or a config alias.
    destination: String,
    name: String,
    program: PathBuf,
    user: Option<String>,
    port: Option<u16>,
    identity_file: Option<PathBuf>,
    config_file: Option<PathBuf>,
    jump: Option<String>,
    connect_timeout: Option<Duration>,
    control_persist: Option<Duration>,
    options: Vec<(String, String)>,
}

impl Ssh {
    /// A copy of these settings (user, port, identity, config file, jump
    /// host, options, ...) for another host; `Group::ssh_with` makes one per
    /// host this way.
    pub fn for_host(&self, host: impl Into<String>) -> Ssh {
        let destination = host.into();
        Ssh {
            name: destination.clone(),
            destination,
            ..self.clone()
        }
    }

    /// The host as `ssh` would take it: a name, an address or a config alias.
    pub fn new(host: impl Into<String>) -> Ssh {
        let destination = host.into();
        Ssh {
            name: destination.clone(),
            destination,
            program: PathBuf::from("ssh"),
            user: None,
            port: None,
            identity_file: None,
            config_file: None,
            jump: None,
            connect_timeout: None,
            control_persist: None,
            options: Vec::new(),
        }
    }

    /// Runs the agent as root through `sudo` on the host, once logged in:
    /// `Become::sudo(self)`, whose [`user`](Become::user) and
    /// [`password`](Become::password) name another user and answer `sudo`.
    ///
    /// ```
    /// use chopsticks_ssh::Ssh;
    ///
    /// let postgres = Ssh::new("db1").user("deploy").sudo().user("postgres");
    /// assert_eq!(postgres.target_user(), "postgres");
    /// ```
    pub fn sudo(self) -> Become<Ssh> {
        Become::sudo(self)
    }

    /// Logs in as `user` (`-l`).
    pub fn user(mut self, user: impl Into<String>) -> Ssh {
        self.user = Some(user.into());
        self
    }

    /// Connects to `port` (`-p`).
    pub fn port(mut self, port: u16) -> Ssh {
        self.port = Some(port);
        self
    }

    /// Authenticates with this private key (`-i`).
    pub fn identity_file(mut self, path: impl Into<PathBuf>) -> Ssh {
        self.identity_file = Some(path.into());
        self
    }

    /// Reads this client configuration instead of `~/.ssh/config` (`-F`).
    pub fn config_file(mut self, path: impl Into<PathBuf>) -> Ssh {
        self.config_file = Some(path.into());
        self
    }

    /// Goes through a jump host (`-J`).
    pub fn jump(mut self, host: impl Into<String>) -> Ssh {
        self.jump = Some(host.into());
        self
    }

    /// Bounds the TCP connect and the SSH banner exchange (`ConnectTimeout`).
    /// The tunnel's own connect timeout bounds the whole start.
    pub fn connect_timeout(mut self, timeout: Duration) -> Ssh {
        self.connect_timeout = Some(timeout);
        self
    }

    /// Any `-o key=value` option.
    ///
    /// OpenSSH keeps the first value it sees for each key. `BatchMode=yes`
    /// and `ClearAllForwardings=yes` come before these, so they cannot be
    /// weakened; chopsticks' defaults (`ServerAliveInterval=15`,
    /// `ServerAliveCountMax=4`, and `ConnectTimeout` and the `Control*`
    /// options when set through their methods) come after, so these win.
    pub fn option(mut self, key: impl Into<String>, value: impl Into<String>) -> Ssh {
        self.options.push((key.into(), value.into()));
        self
    }

    /// Shares one connection between tunnels and reconnects (`ControlMaster=auto`),
    /// keeping it open `persist` after the last one closes. The control socket
    /// lives in a private directory, `$TMPDIR/chopsticks-ssh-UID` (mode 0700;
    /// under `/tmp` when `TMPDIR` holds characters ssh would split or expand,
    /// or is too long for a socket path).
    pub fn control_persist(mut self, persist: Duration) -> Ssh {
        self.control_persist = Some(persist);
        self
    }

    /// Uses this `ssh` program instead of the one on `PATH`.
    pub fn program(mut self, program: impl Into<PathBuf>) -> Ssh {
        self.program = program.into();
        self
    }

    /// Names the tunnel `name` in errors and groups instead of the host.
    pub fn named(mut self, name: impl Into<String>) -> Ssh {
        self.name = name.into();
        self
    }

    /// The arguments given to `ssh` to run `remote_command` (for tests and tools).
    pub fn arguments(&self, remote_command: &str) -> Result<Vec<String>, SshError> {
        if self.destination.is_empty() {
            return Err(SshError::InvalidHost {
                host: self.destination.clone(),
                reason: "it is empty",
            });
        }
        let mut args: Vec<String> = ["-T", "-x", "-a"].map(String::from).to_vec();
        let mut option = |key: &str, value: String| {
            args.push("-o".into());
            args.push(format!("{key}={value}"));
        };
        option("BatchMode", "yes".into());
        option("ClearAllForwardings", "yes".into());
        for (key, value) in &self.options {
            option(key, value.clone());
        }
        option("ServerAliveInterval", ALIVE_INTERVAL.to_string());
        option("ServerAliveCountMax", ALIVE_COUNT.to_string());
        if let Some(timeout) = self.connect_timeout {
            option("ConnectTimeout", timeout.as_secs().max(1).to_string());
        }
        if let Some(persist) = self.control_persist {
            let dir = control_dir().map_err(|reason| SshError::ControlDir { reason })?;
            option("ControlMaster", "auto".into());
            option("ControlPath", format!("{}/%C", dir.display()));
            option("ControlPersist", persist.as_secs().max(1).to_string());
        }
        if let Some(config) = &self.config_file {
            args.push("-F".into());
            args.push(config.display().to_string());
        }
        if let Some(identity) = &self.identity_file {
            args.push("-i".into());
            args.push(identity.display().to_string());
        }
        if let Some(port) = self.port {
            args.push("-p".into());
            args.push(port.to_string());
        }
        if let Some(user) = &self.user {
            args.push("-l".into());
            args.push(user.clone());
        }
        if let Some(jump) = &self.jump {
            args.push("-J".into());
            args.push(jump.clone());
        }
        // Everything after `--` is the destination and the command, never an option.
        args.push("--".into());
        args.push(self.destination.clone());
        args.push(remote_command.to_string());
        Ok(args)
    }
}

/// `$TMPDIR/chopsticks-ssh-UID` (or `/tmp/...`), created 0700 and checked
/// to be ours and private.
fn control_dir() -> Result<PathBuf, String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    // ssh splits `-o` values on blanks and expands `%` in ControlPath, so a
    // TMPDIR with anything but plain path characters, or too long for a
    // socket path, is not used for it.
    let plain = |path: &std::path::Path| {
        path.to_str().is_some_and(|text| {
            text.bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || b"/._-+,@~".contains(&byte))
        })
    };
    // A socket path holds at most 107 bytes: the directory, `/`, 40 for
    // `%C` and the 17 ssh adds while it creates the socket.
    let short = |path: &std::path::Path| path.as_os_str().len() + 1 + 20 + 1 + 40 + 17 <= 107;
    let temp = std::env::temp_dir();
    let base = if plain(&temp) && short(&temp) {
        temp
    } else {
        PathBuf::from("/tmp")
    };
    let dir = base.join(format!("chopsticks-ssh-{uid}"));
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(error) => return Err(format!("creating {}: {error}", dir.display())),
    }
    let metadata = std::fs::symlink_metadata(&dir).map_err(|e| e.to_string())?;
    if !metadata.is_dir() || metadata.uid() != uid || metadata.mode() & 0o077 != 0 {
        return Err(format!(
            "{} must be a directory owned by uid {uid} with mode 0700",
            dir.display()
        ));
    }
    Ok(dir)
}

#[async_trait]
impl Transport for Ssh {
    fn host(&self) -> &str {
        &self.name
    }

    async fn spawn(&self, command: &AgentCommand) -> Result<Pipes, BoxError> {
        let args = self.arguments(&command.to_shell_command())?;
        let child = tokio::process::Command::new(&self.program)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| SshError::ClientMissing {
                program: self.program.display().to_string(),
                source,
            })?;
        // Larger pipes to and from `ssh`, within the controller's budget.
        let shares = (
            child.stdin.as_ref().and_then(crate::pipes::enlarge),
            child.stdout.as_ref().and_then(crate::pipes::enlarge),
        );
        let mut pipes = Pipes::from_child(child)?;
        pipes.stdin = Box::new(crate::pipes::Holding::new(pipes.stdin, shares.0));
        pipes.stdout = Box::new(crate::pipes::Holding::new(pipes.stdout, shares.1));
        Ok(pipes)
    }

    fn diagnose(&self, stderr_tail: &[String]) -> Option<BoxError> {
        diagnose(&self.destination, stderr_tail).map(|error| Box::new(error) as BoxError)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_always_follows_the_end_of_options() {
        let args = Ssh::new("-oProxyCommand=touch /tmp/pwned")
            .user("deploy")
            .port(2222)
            .option("Compression", "no")
            .arguments("sh -c 'true'")
            .expect("arguments");
        let end = args.iter().position(|arg| arg == "--").expect("--");
        assert_eq!(args[end + 1], "-oProxyCommand=touch /tmp/pwned");
        assert_eq!(args[end + 2], "sh -c 'true'");
        assert_eq!(args.len(), end + 3);
        assert!(args.contains(&"BatchMode=yes".to_string()));
        let batch = args.iter().position(|arg| arg == "BatchMode=yes");
        let user_option = args.iter().position(|arg| arg == "Compression=no");
        assert!(
            batch < user_option,
            "chopsticks' options come first and win"
        );
    }

    #[test]
    fn an_empty_host_is_refused() {
        assert!(matches!(
            Ssh::new("").arguments("true"),
            Err(SshError::InvalidHost { .. })
        ));
    }
}
