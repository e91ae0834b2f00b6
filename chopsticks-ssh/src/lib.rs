//! SSH transports for chopsticks.
//!
//! - [`Ssh`] (default): the system's OpenSSH client, so `~/.ssh/config`,
//!   agents, `ProxyJump`, `ControlMaster` and `known_hosts` work as they do
//!   for `ssh host`.
//! - `NativeSsh` (feature `libssh2`): libssh2 inside the process, for
//!   controllers without an `ssh` binary or with programmatic authentication
//!   (key file, agent, password), and for fast fan-out to many hosts.
//!
//! Both start the agent through the shell bootstrap: the remote cache is
//! checked, the agent is uploaded only on a miss, verified (size and SHA-256)
//! before every exec, and a target that cannot run this binary is refused
//! with the platform it reported. Connection failures come back as
//! `Error::Spawn` whose source is an [`SshError`] saying what to fix.
//!
//! ```
//! use chopsticks_ssh::Ssh;
//!
//! let ssh = Ssh::new("-oProxyCommand=evil").user("deploy");
//! let args = ssh.arguments("true").unwrap();
//! // The host follows `--`: it can only ever be a host name.
//! assert_eq!(&args[args.len() - 3..], ["--", "-oProxyCommand=evil", "true"]);
//! ```

mod diagnose;
#[cfg(feature = "libssh2")]
mod native;
mod openssh;
mod pipes;

#[cfg(feature = "libssh2")]
pub use native::NativeSsh;
pub use openssh::Ssh;

use chopsticks_core::Become;

/// Why an SSH connection could not carry an agent. Every variant names the host.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SshError {
    /// The server refused every authentication method tried.
    #[error(
        "{host} refused authentication ({detail}); check the user name, the key \
         (identity_file or IdentityFile) and that the key is in the host's authorized_keys"
    )]
    Authentication {
        /// The host.
        host: String,
        /// What the client printed.
        detail: String,
    },
    /// The host's key is unknown or has changed.
    #[error(
        "the host key of {host} is unknown or has changed ({detail}); verify the key and add it \
         to known_hosts (for example with ssh-keyscan); chopsticks never turns host-key checking off"
    )]
    HostKey {
        /// The host.
        host: String,
        /// What the client printed.
        detail: String,
    },
    /// The host name does not resolve.
    #[error("the host name {host} does not resolve ({detail}); check its spelling and DNS")]
    Resolve {
        /// The host.
        host: String,
        /// What the client printed.
        detail: String,
    },
    /// Nothing listens on the SSH port.
    #[error("{host} refused the connection ({detail}); is sshd running, and on this port?")]
    Refused {
        /// The host.
        host: String,
        /// What the client printed.
        detail: String,
    },
    /// The connection or the handshake timed out.
    #[error("connecting to {host} timed out ({detail}); is the host up and reachable?")]
    Timeout {
        /// The host.
        host: String,
        /// What the client printed.
        detail: String,
    },
    /// No network path to the host.
    #[error("{host} is unreachable ({detail}); check the network and routes")]
    Unreachable {
        /// The host.
        host: String,
        /// What the client printed.
        detail: String,
    },
    /// The server closed the connection before a session started.
    #[error("{host} closed the connection ({detail}); the server may be overloaded or refusing us")]
    Closed {
        /// The host.
        host: String,
        /// What the client printed.
        detail: String,
    },
    /// The client and the server share no cipher, key exchange, MAC or
    /// host-key algorithm.
    #[error(
        "{host} and this client agree on no algorithm ({detail}); allow a common cipher, \
         key exchange or host key type on one side"
    )]
    Negotiation {
        /// The host.
        host: String,
        /// What the client printed.
        detail: String,
    },
    /// The host name cannot be used.
    #[error("{host:?} is not a usable host: {reason}")]
    InvalidHost {
        /// The rejected host.
        host: String,
        /// Why.
        reason: &'static str,
    },
    /// The OpenSSH client could not be run.
    #[error("could not run the ssh client {program} (install openssh-client or use NativeSsh)")]
    ClientMissing {
        /// The program that was to run.
        program: String,
        /// Why it could not.
        #[source]
        source: std::io::Error,
    },
    /// The private directory for control sockets is unusable.
    #[error("the ControlMaster socket directory is unsafe or unusable: {reason}")]
    ControlDir {
        /// Why.
        reason: String,
    },
    /// A failure inside libssh2 (the native backend), with the phase it happened in.
    #[error("ssh to {host} failed while {phase}: {message}")]
    Native {
        /// The host.
        host: String,
        /// What was being done.
        phase: NativePhase,
        /// What libssh2 or the system said.
        message: String,
    },
}

/// What the native (libssh2) backend was doing when it failed, in an
/// [`SshError::Native`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum NativePhase {
    /// Resolving the address and opening the TCP connection.
    Connecting,
    /// Creating the libssh2 session.
    CreatingSession,
    /// Setting the cipher preference.
    ChoosingCiphers,
    /// Checking the server's host key against `known_hosts`.
    CheckingHostKey,
    /// Opening the session channel.
    OpeningChannel,
    /// Running the bootstrap command on the channel.
    StartingBootstrap,
    /// Creating the local pipes the pump moves data through.
    CreatingPipes,
    /// Starting the pump thread.
    StartingPump,
}

impl std::fmt::Display for NativePhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            NativePhase::Connecting => "connecting",
            NativePhase::CreatingSession => "creating a session",
            NativePhase::ChoosingCiphers => "choosing ciphers",
            NativePhase::CheckingHostKey => "checking the host key",
            NativePhase::OpeningChannel => "opening a channel",
            NativePhase::StartingBootstrap => "starting the bootstrap",
            NativePhase::CreatingPipes => "creating pipes",
            NativePhase::StartingPump => "starting the pump thread",
        })
    }
}

impl SshError {
    /// The host this error is about (empty for errors not about one host).
    pub fn host(&self) -> &str {
        match self {
            SshError::Authentication { host, .. }
            | SshError::HostKey { host, .. }
            | SshError::Resolve { host, .. }
            | SshError::Refused { host, .. }
            | SshError::Timeout { host, .. }
            | SshError::Unreachable { host, .. }
            | SshError::Closed { host, .. }
            | SshError::Negotiation { host, .. }
            | SshError::InvalidHost { host, .. }
            | SshError::Native { host, .. } => host,
            SshError::ClientMissing { .. } | SshError::ControlDir { .. } => "",
        }
    }
}

/// `Group::ssh([...])`: a group of [`Ssh`] tunnels, one per host; and
/// `Group::ssh_with([...], &settings)`, where every host gets the settings
/// of one [`Ssh`] builder (user, identity, config file, options, ...).
///
/// ```
/// use chopsticks_core::Group;
/// use chopsticks_ssh::{Ssh, SshGroup};
///
/// let web = Group::ssh(["web1", "web2", "web3"]).unwrap();
/// assert_eq!(web.hosts().collect::<Vec<_>>(), ["web1", "web2", "web3"]);
///
/// let settings = Ssh::new("any").user("deploy").port(2222).option("Compression", "yes");
/// let db = Group::ssh_with(["db1", "db2"], &settings).unwrap();
/// assert_eq!(db.hosts().collect::<Vec<_>>(), ["db1", "db2"]);
/// ```
///
/// For settings that differ per host, build the tunnels and use `Group::new`.
pub trait SshGroup: Sized {
    /// One tunnel per host, each `Ssh::new(host)` with default settings.
    fn ssh<I>(hosts: I) -> chopsticks_core::Result<Self>
    where
        I: IntoIterator,
        I::Item: Into<String>;

    /// One tunnel per host, each with the settings of `settings` (its own
    /// host is not used; see [`Ssh::for_host`]).
    fn ssh_with<I>(hosts: I, settings: &Ssh) -> chopsticks_core::Result<Self>
    where
        I: IntoIterator,
        I::Item: Into<String>;

    /// One tunnel per host that becomes another user as `settings` says
    /// (its transport's own host is not used; see [`Become::over`]): a
    /// password callback is asked once per host.
    ///
    /// ```
    /// use chopsticks_core::Group;
    /// use chopsticks_ssh::{Ssh, SshGroup};
    ///
    /// let settings = Ssh::new("any").user("deploy").sudo().user("postgres");
    /// let db = Group::ssh_become(["db1", "db2"], &settings).unwrap();
    /// assert_eq!(db.hosts().collect::<Vec<_>>(), ["db1", "db2"]);
    /// ```
    fn ssh_become<I>(hosts: I, settings: &Become<Ssh>) -> chopsticks_core::Result<Self>
    where
        I: IntoIterator,
        I::Item: Into<String>;
}

impl SshGroup for chopsticks_core::Group {
    fn ssh<I>(hosts: I) -> chopsticks_core::Result<Self>
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        Self::ssh_with(hosts, &Ssh::new(""))
    }

    fn ssh_with<I>(hosts: I, settings: &Ssh) -> chopsticks_core::Result<Self>
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        chopsticks_core::Group::new(
            hosts
                .into_iter()
                .map(|host| chopsticks_core::Tunnel::new(settings.for_host(host))),
        )
    }

    fn ssh_become<I>(hosts: I, settings: &Become<Ssh>) -> chopsticks_core::Result<Self>
    where
        I: IntoIterator,
        I::Item: Into<String>,
    {
        chopsticks_core::Group::new(hosts.into_iter().map(|host| {
            chopsticks_core::Tunnel::new(settings.over(settings.inner().for_host(host)))
        }))
    }
}
