//! [`NativeSsh`]: the agent on a remote host through libssh2, in-process.
//!
//! Connecting, the handshake, the host-key check and authentication run on a
//! blocking thread. The session then belongs to one *pump* thread, which
//! moves bytes between the SSH channel and three pipes whose other ends are
//! the tunnel's stdin, stdout and stderr, waiting in `poll(2)` on the socket
//! and the pipes. The async runtime never blocks on libssh2.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

use chopsticks_core::{
    AgentCommand, AgentProcess, BoxError, ExitReport, Pipes, Transport, async_trait,
};
use ssh2::{CheckResult, KnownHostFileKind, MethodType, Session};

use crate::{NativePhase, SshError};

mod pump;

use pump::{Pump, PumpEnds};

/// How one connection authenticates.
#[derive(Clone)]
enum Auth {
    Key {
        private: PathBuf,
        passphrase: Option<String>,
    },
    Agent,
    Password(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Key { private, .. } => write!(f, "Key({})", private.display()),
            Auth::Agent => f.write_str("Agent"),
            Auth::Password(_) => f.write_str("Password(..)"),
        }
    }
}

/// Runs the agent on a host through libssh2, without an `ssh` binary.
///
/// It reads no `ssh_config`: give the address, port, user and credentials
/// here. Authentication tries what was added, in order (by default the SSH
/// agent, then `~/.ssh/id_ed25519`, `id_ecdsa` and `id_rsa`). The host key
/// must be in `known_hosts` (default `~/.ssh/known_hosts`); an unknown or
/// changed key is refused, never accepted.
///
/// ```no_run
/// use chopsticks_core::Tunnel;
/// use chopsticks_ssh::NativeSsh;
/// # use chopsticks_agent as _;
///
/// # async fn demo() -> chopsticks_core::Result<()> {
/// let tun = Tunnel::new(
///     NativeSsh::new("10.0.0.5").user("deploy").identity_file("/etc/deploy/id_ed25519"),
/// );
/// let pid: u32 = tun.call(std::process::id, ()).await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct NativeSsh {
    /// The name or address connected to.
    address: String,
    name: String,
    port: u16,
    user: Option<String>,
    auth: Vec<Auth>,
    known_hosts: Option<PathBuf>,
    connect_timeout: Duration,
    ciphers: Option<String>,
}

impl NativeSsh {
    /// The host to connect to: a name or an address.
    pub fn new(host: impl Into<String>) -> NativeSsh {
        let address = host.into();
        NativeSsh {
            name: address.clone(),
            address,
            port: 22,
            user: None,
            auth: Vec::new(),
            known_hosts: None,
            connect_timeout: Duration::from_secs(10),
            ciphers: None,
        }
    }

    /// The ciphers to offer, most preferred first, comma-separated as in
    /// `ssh_config`'s `Ciphers` (default: libssh2's list, which starts with
    /// `chacha20-poly1305@openssh.com`). Names libssh2 does not know are
    /// dropped; a list with none it knows fails the connect.
    ///
    /// libssh2 runs AES one 16-byte block per call into OpenSSL, so its
    /// AES-GCM and AES-CTR move bulk data slower than its ChaCha20-Poly1305
    /// on CPUs with AES instructions (BENCHMARKS.md).
    pub fn ciphers(mut self, ciphers: impl Into<String>) -> NativeSsh {
        self.ciphers = Some(ciphers.into());
        self
    }

    /// The port (default 22).
    pub fn port(mut self, port: u16) -> NativeSsh {
        self.port = port;
        self
    }

    /// The user to log in as (default: the user running this program).
    pub fn user(mut self, user: impl Into<String>) -> NativeSsh {
        self.user = Some(user.into());
        self
    }

    /// Authenticates with this private key file.
    pub fn identity_file(mut self, path: impl Into<PathBuf>) -> NativeSsh {
        self.auth.push(Auth::Key {
            private: path.into(),
            passphrase: None,
        });
        self
    }

    /// Authenticates with this passphrase-protected private key file.
    pub fn identity_file_with_passphrase(
        mut self,
        path: impl Into<PathBuf>,
        passphrase: impl Into<String>,
    ) -> NativeSsh {
        self.auth.push(Auth::Key {
            private: path.into(),
            passphrase: Some(passphrase.into()),
        });
        self
    }

    /// Authenticates through the SSH agent (`SSH_AUTH_SOCK`).
    pub fn agent(mut self) -> NativeSsh {
        self.auth.push(Auth::Agent);
        self
    }

    /// Authenticates with a password.
    pub fn password(mut self, password: impl Into<String>) -> NativeSsh {
        self.auth.push(Auth::Password(password.into()));
        self
    }

    /// Checks the host key against this file instead of `~/.ssh/known_hosts`.
    pub fn known_hosts(mut self, path: impl Into<PathBuf>) -> NativeSsh {
        self.known_hosts = Some(path.into());
        self
    }

    /// Bounds the TCP connect, the handshake and authentication (default 10 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> NativeSsh {
        self.connect_timeout = timeout;
        self
    }

    /// Names the tunnel `name` in errors and groups instead of the host.
    pub fn named(mut self, name: impl Into<String>) -> NativeSsh {
        self.name = name.into();
        self
    }

    fn fail(&self, phase: NativePhase, message: impl std::fmt::Display) -> SshError {
        SshError::Native {
            host: self.name.clone(),
            phase,
            message: message.to_string(),
        }
    }

    /// Connects, checks the host key, authenticates and starts `command`.
    fn open(&self, command: &str) -> Result<(Session, ssh2::Channel), SshError> {
        let host = self.name.clone();
        let addresses: Vec<_> = (self.address.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|error| SshError::Resolve {
                host: host.clone(),
                detail: error.to_string(),
            })?
            .collect();
        let mut last = None;
        let mut stream = None;
        for address in addresses {
            match TcpStream::connect_timeout(&address, self.connect_timeout) {
                Ok(connected) => {
                    stream = Some(connected);
                    break;
                }
                Err(error) => last = Some(error),
            }
        }
        let stream = stream.ok_or_else(|| {
            let error = last.unwrap_or_else(|| io::Error::other("no address"));
            let detail = error.to_string();
            match error.kind() {
                io::ErrorKind::ConnectionRefused => SshError::Refused {
                    host: host.clone(),
                    detail,
                },
                io::ErrorKind::TimedOut => SshError::Timeout {
                    host: host.clone(),
                    detail,
                },
                _ => SshError::Unreachable {
                    host: host.clone(),
                    detail,
                },
            }
        })?;
        let _ = stream.set_nodelay(true);
        give_up_after_unacknowledged(&stream, DEAD_PEER_TIMEOUT);
        let mut session = Session::new().map_err(|e| self.fail(NativePhase::CreatingSession, e))?;
        session.set_timeout(self.connect_timeout.as_millis().min(u32::MAX as u128) as u32);
        session.set_tcp_stream(stream);
        if let Some(ciphers) = &self.ciphers {
            for direction in [MethodType::CryptCs, MethodType::CryptSc] {
                session
                    .method_pref(direction, ciphers)
                    .map_err(|e| self.fail(NativePhase::ChoosingCiphers, e))?;
            }
        }
        session.handshake().map_err(|error| {
            let detail = format!("handshake: {error}");
            let host = host.clone();
            // LIBSSH2_ERROR_KEX_FAILURE: no algorithm in common.
            if error.code() == ssh2::ErrorCode::Session(-5) {
                SshError::Negotiation { host, detail }
            } else {
                SshError::Closed { host, detail }
            }
        })?;
        self.check_host_key(&session)?;
        self.authenticate(&session)?;
        let mut channel = session
            .channel_session()
            .map_err(|e| self.fail(NativePhase::OpeningChannel, e))?;
        channel
            .exec(command)
            .map_err(|e| self.fail(NativePhase::StartingBootstrap, e))?;
        Ok((session, channel))
    }

    fn check_host_key(&self, session: &Session) -> Result<(), SshError> {
        let path = match &self.known_hosts {
            Some(path) => path.clone(),
            None => home()
                .map(|home| home.join(".ssh/known_hosts"))
                .ok_or_else(|| self.fail(NativePhase::CheckingHostKey, "HOME is not set"))?,
        };
        let mut known = session
            .known_hosts()
            .map_err(|e| self.fail(NativePhase::CheckingHostKey, e))?;
        // A missing file means no host is known: the check below refuses.
        let _ = known.read_file(&path, KnownHostFileKind::OpenSSH);
        let (key, _) = session.host_key().ok_or_else(|| {
            self.fail(NativePhase::CheckingHostKey, "the server sent no host key")
        })?;
        match known.check_port(&self.address, self.port, key) {
            CheckResult::Match => Ok(()),
            CheckResult::Mismatch => Err(SshError::HostKey {
                host: self.name.clone(),
                detail: format!(
                    "the key differs from the one recorded in {}",
                    path.display()
                ),
            }),
            CheckResult::NotFound => Err(SshError::HostKey {
                host: self.name.clone(),
                detail: format!("no key for it in {}", path.display()),
            }),
            CheckResult::Failure => Err(self.fail(NativePhase::CheckingHostKey, "libssh2 failed")),
        }
    }

    fn authenticate(&self, session: &Session) -> Result<(), SshError> {
        let user = match &self.user {
            Some(user) => user.clone(),
            None => current_user(),
        };
        let mut methods = self.auth.clone();
        if methods.is_empty() {
            methods.push(Auth::Agent);
            if let Some(home) = home() {
                for key in ["id_ed25519", "id_ecdsa", "id_rsa"] {
                    let private = home.join(".ssh").join(key);
                    if private.exists() {
                        methods.push(Auth::Key {
                            private,
                            passphrase: None,
                        });
                    }
                }
            }
        }
        let mut tried = Vec::new();
        for method in &methods {
            let result = match method {
                Auth::Key {
                    private,
                    passphrase,
                } => session.userauth_pubkey_file(&user, None, private, passphrase.as_deref()),
                Auth::Agent => session.userauth_agent(&user),
                Auth::Password(password) => session.userauth_password(&user, password),
            };
            match result {
                Ok(()) if session.authenticated() => return Ok(()),
                Ok(()) => tried.push(format!("{method:?}: not accepted")),
                Err(error) => tried.push(format!("{method:?}: {}", error.message())),
            }
        }
        Err(SshError::Authentication {
            host: self.name.clone(),
            detail: format!("as {user}; tried {}", tried.join(", ")),
        })
    }
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME").map(PathBuf::from)
}

fn current_user() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "root".to_string())
}

#[async_trait]
impl Transport for NativeSsh {
    fn host(&self) -> &str {
        &self.name
    }

    async fn spawn(&self, command: &AgentCommand) -> Result<Pipes, BoxError> {
        let this = self.clone();
        let command = command.to_shell_command();
        let (session, channel) = tokio::task::spawn_blocking(move || this.open(&command))
            .await
            .map_err(|error| self.fail(NativePhase::Connecting, error))??;
        let ends = PumpEnds::new().map_err(|e| self.fail(NativePhase::CreatingPipes, e))?;
        let (exit_sender, exit) = tokio::sync::oneshot::channel();
        let kill = ends.kill_write;
        let pump = Pump {
            session,
            channel,
            stdin: ends.stdin_read,
            stdout: ends.stdout_write,
            stderr: ends.stderr_write,
            kill: ends.kill_read,
            _pipe_shares: ends.shares,
        };
        std::thread::Builder::new()
            .name("chopsticks-ssh2".into())
            .spawn(move || {
                let report = pump.run();
                let _ = exit_sender.send(report);
            })
            .map_err(|e| self.fail(NativePhase::StartingPump, e))?;
        Ok(Pipes {
            stdin: Box::new(tokio::net::unix::pipe::Sender::from_owned_fd(
                ends.stdin_write,
            )?),
            stdout: Box::new(tokio::net::unix::pipe::Receiver::from_owned_fd(
                ends.stdout_read,
            )?),
            stderr: Some(Box::new(tokio::net::unix::pipe::Receiver::from_owned_fd(
                ends.stderr_read,
            )?)),
            process: Box::new(NativeProcess {
                exit: Some(exit),
                kill: Some(kill),
            }),
        })
    }
}

/// The remote command, as seen from here: its exit status comes from the pump.
struct NativeProcess {
    exit: Option<tokio::sync::oneshot::Receiver<io::Result<ExitReport>>>,
    kill: Option<OwnedFd>,
}

#[async_trait]
impl AgentProcess for NativeProcess {
    fn id(&self) -> Option<u32> {
        None
    }

    fn start_kill(&mut self) -> io::Result<()> {
        // Closing the kill pipe wakes the pump, which closes the channel.
        self.kill = None;
        Ok(())
    }

    async fn wait(&mut self) -> io::Result<ExitReport> {
        let lost = || io::Error::other("the ssh pump thread ended without a report");
        match self.exit.take() {
            Some(exit) => exit.await.unwrap_or_else(|_| Err(lost())),
            None => Err(lost()),
        }
    }
}

/// How long sent data may stay unacknowledged before the connection counts as
/// dead: the pump sends a keep-alive after 15 s without traffic, so a host
/// that vanishes is noticed within about this long plus 15 s (the `Ssh`
/// backend's `ServerAliveInterval` × `ServerAliveCountMax`).
const DEAD_PEER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Sets `TCP_USER_TIMEOUT`, so a write to a host that stopped answering fails
/// after `timeout` instead of after TCP's retransmissions (about 15 minutes).
fn give_up_after_unacknowledged(stream: &TcpStream, timeout: std::time::Duration) {
    use std::os::fd::AsRawFd;
    let millis = timeout.as_millis().min(u32::MAX as u128) as libc::c_uint;
    // SAFETY: the option value points at a c_uint of the length given, for
    // the duration of the call, on a socket the stream owns.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&millis as *const libc::c_uint).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        );
    }
}
