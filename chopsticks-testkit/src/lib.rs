//! Test fixtures for chopsticks: a real OpenSSH `sshd` on a loopback port,
//! with throwaway host and client keys and its own client configuration.
//!
//! [`Sshd::start`] writes everything into a fresh directory, starts
//! `/usr/sbin/sshd -D` on a free port of 127.0.0.1 and waits for its banner.
//! Dropping the fixture stops the server and everything it started, and
//! removes the directory. Run as root, clients log in as [`LOGIN_USER`], a
//! user the fixture creates with `/bin/sh` as its login shell; files that a
//! test moves over ssh must be in directories that user can write.
//!
//! The client configuration (`ssh -F`) names the server by aliases:
//!
//! - `NAME-0` … `NAME-{n-1}`: the server, with the right key and a known host key;
//! - `NAME-wrong-key`: a key the server does not accept;
//! - `NAME-unknown-host`: an empty `known_hosts`, with strict checking;
//! - `NAME-closed-port`: a loopback port nothing listens on.
//!
//! ```no_run
//! let sshd = chopsticks_testkit::Sshd::start("doc", 2).expect("sshd");
//! let status = std::process::Command::new("ssh")
//!     .arg("-F").arg(sshd.client_config())
//!     .arg(sshd.alias(0)).arg("true")
//!     .status().expect("ssh");
//! assert!(status.success());
//! ```

pub mod docker;
pub mod netns;
pub mod rootfs;
pub mod sudoers;

use std::io::Read;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `sshd` and the files a client needs to reach it.
#[derive(Debug)]
pub struct Sshd {
    name: String,
    dir: PathBuf,
    listen: SocketAddr,
    server: Option<Child>,
    aliases: Vec<String>,
    user: String,
}

/// Where `sshd` lives on Debian.
pub const SSHD: &str = "/usr/sbin/sshd";

impl Sshd {
    /// Starts a server reachable as `count` aliases named `name-0`, `name-1`, ….
    pub fn start(name: &str, count: usize) -> Result<Sshd, String> {
        Sshd::start_at(name, count, None, None)
    }

    /// Starts a server inside `host`'s network namespace, listening on its
    /// address, port 22; the aliases reach it there.
    pub fn start_in(host: &netns::NetnsHost, name: &str, count: usize) -> Result<Sshd, String> {
        Sshd::start_at(name, count, Some(host), None)
    }

    /// Starts a server whose sessions run inside `root` (sshd's
    /// `ChrootDirectory`: `root` and every directory above it must be owned
    /// by root and writable by no one else).
    pub fn start_chrooted(name: &str, count: usize, root: &Path) -> Result<Sshd, String> {
        Sshd::start_at(name, count, None, Some(root))
    }

    fn start_at(
        name: &str,
        count: usize,
        host: Option<&netns::NetnsHost>,
        chroot: Option<&Path>,
    ) -> Result<Sshd, String> {
        for tool in [SSHD, "ssh", "ssh-keygen"] {
            if !tool_exists(tool) {
                return Err(format!(
                    "{tool} is not installed (scripts/test.sh installs openssh-server and openssh-client)"
                ));
            }
        }
        let dir =
            std::env::temp_dir().join(format!("chopsticks-sshd-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        // sshd insists on its privilege separation directory.
        let _ = std::fs::create_dir_all("/run/sshd");
        for key in ["host_ed25519", "client_ed25519", "wrong_ed25519"] {
            keygen(&dir.join(key))?;
        }
        let user = login_user()?;
        let host_public = read(&dir.join("host_ed25519.pub"))?;
        std::fs::write(
            dir.join("authorized_keys"),
            read(&dir.join("client_ed25519.pub"))?,
        )
        .map_err(|e| e.to_string())?;
        let mut last_error = String::new();
        let address = host.map_or(Ipv4Addr::LOCALHOST, netns::NetnsHost::address);
        for _ in 0..5 {
            let port = match host {
                Some(_) => 22,
                None => free_port()?,
            };
            let listen = SocketAddr::from((address, port));
            write_server_config(&dir, listen, chroot)?;
            let aliases: Vec<String> = (0..count).map(|i| format!("{name}-{i}")).collect();
            write_client_config(&dir, name, &aliases, listen, &user, &host_public)?;
            let mut command = match host {
                Some(host) => host.command(SSHD),
                None => Command::new(SSHD),
            };
            let server = command
                .arg("-D")
                .arg("-e")
                .arg("-f")
                .arg(dir.join("sshd_config"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("starting {SSHD}: {e}"))?;
            let mut sshd = Sshd {
                name: name.to_string(),
                dir: dir.clone(),
                listen,
                server: Some(server),
                aliases,
                user: user.clone(),
            };
            match sshd.wait_ready() {
                Ok(()) => return Ok(sshd),
                Err(error) => {
                    last_error = error;
                    sshd.stop();
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        Err(format!("sshd did not start: {last_error}"))
    }

    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let address = self.listen;
        while Instant::now() < deadline {
            if let Some(server) = self.server.as_mut()
                && let Ok(Some(status)) = server.try_wait()
            {
                let mut stderr = String::new();
                if let Some(mut pipe) = server.stderr.take() {
                    let _ = pipe.read_to_string(&mut stderr);
                }
                return Err(format!("sshd exited ({status}): {}", stderr.trim()));
            }
            if let Ok(mut stream) = TcpStream::connect_timeout(&address, Duration::from_millis(200))
            {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let mut banner = [0u8; 7];
                if stream.read_exact(&mut banner).is_ok() && &banner == b"SSH-2.0" {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err("sshd did not answer on its port within 10 s".into())
    }

    /// The client configuration file, for `ssh -F` or `Ssh::config_file`.
    pub fn client_config(&self) -> PathBuf {
        self.dir.join("ssh_config")
    }

    /// The `index`th alias of the server.
    pub fn alias(&self, index: usize) -> &str {
        &self.aliases[index]
    }

    /// Every alias of the server.
    pub fn aliases(&self) -> &[String] {
        &self.aliases
    }

    /// An alias whose key the server refuses.
    pub fn wrong_key_alias(&self) -> String {
        format!("{}-wrong-key", self.name)
    }

    /// An alias whose host key is unknown to the client.
    pub fn unknown_host_alias(&self) -> String {
        format!("{}-unknown-host", self.name)
    }

    /// An alias pointing at a port nothing listens on.
    pub fn closed_port_alias(&self) -> String {
        format!("{}-closed-port", self.name)
    }

    /// The server's port on 127.0.0.1 (or on its namespace's address).
    pub fn port(&self) -> u16 {
        self.listen.port()
    }

    /// The server's address: 127.0.0.1, or its namespace's address.
    pub fn address(&self) -> std::net::IpAddr {
        self.listen.ip()
    }

    /// The user the client logs in as ([`LOGIN_USER`] when the tests run as root).
    pub fn user(&self) -> &str {
        &self.user
    }

    /// The private key the server accepts.
    pub fn client_key(&self) -> PathBuf {
        self.dir.join("client_ed25519")
    }

    /// A private key the server refuses.
    pub fn wrong_key(&self) -> PathBuf {
        self.dir.join("wrong_ed25519")
    }

    /// A `known_hosts` file with the server's key for `[ADDRESS]:PORT`.
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.join("known_hosts_by_address")
    }

    /// The server's process id (the listener).
    pub fn pid(&self) -> Option<u32> {
        self.server.as_ref().map(Child::id)
    }

    /// Kills the listener and every per-connection `sshd` it started, as a
    /// crashed server would go; processes the sessions started are left alone.
    pub fn kill(&mut self) {
        if let Some(pid) = self.pid() {
            for child in descendants(pid) {
                if process_name(child).is_some_and(|name| name.starts_with("sshd")) {
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(child as i32, libc::SIGKILL) };
                }
            }
        }
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            for child in descendants(pid) {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(child as i32, libc::SIGTERM) };
            }
        }
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `command`; its stderr says why when it fails.
fn run(command: &mut Command) -> Result<(), String> {
    let output = command
        .output()
        .map_err(|error| format!("{command:?}: {error}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{command:?} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

fn tool_exists(tool: &str) -> bool {
    if tool.starts_with('/') {
        return Path::new(tool).exists();
    }
    std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).exists()))
        .unwrap_or(false)
}

fn keygen(path: &Path) -> Result<(), String> {
    let output = Command::new("ssh-keygen")
        .args([
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "chopsticks-testkit",
            "-f",
        ])
        .arg(path)
        .output()
        .map_err(|e| format!("ssh-keygen: {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ssh-keygen failed: {}",
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("reading {}: {e}", path.display()))
}

/// The user tests log in as: as root, a dedicated user whose login shell is
/// `/bin/sh` (so no interactive shell start-up files run on every connect,
/// as for a typical deploy account); otherwise the current user.
pub const LOGIN_USER: &str = "chopsticks-ssh";

fn login_user() -> Result<String, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return current_user();
    }
    let exists = |name: &str| {
        Command::new("id")
            .arg("-u")
            .arg(name)
            .output()
            .map(|output| output.status.success())
            .unwrap_or(false)
    };
    // Tests start servers in parallel threads and processes: one creates the user.
    let lock = exclusive("chopsticks-testkit-user")?;
    if !exists(LOGIN_USER) {
        let _ = Command::new("useradd")
            .args(["--create-home", "--shell", "/bin/sh", LOGIN_USER])
            .output();
    }
    // Without PAM, sshd refuses accounts whose password is locked ("!"), as
    // useradd leaves them; "*" allows key logins and no password.
    let _ = Command::new("usermod")
        .args(["-p", "*", LOGIN_USER])
        .output();
    // A home left by an earlier user of the same name must belong to this one.
    let home = PathBuf::from("/home").join(LOGIN_USER);
    let _ = std::fs::create_dir_all(&home);
    let _ = Command::new("chown")
        .arg("-R")
        .arg(format!("{LOGIN_USER}:"))
        .arg(&home)
        .output();
    drop(lock);
    if exists(LOGIN_USER) {
        Ok(LOGIN_USER.to_string())
    } else {
        Err(format!(
            "could not create the user {LOGIN_USER} (useradd, from the passwd package)"
        ))
    }
}

fn current_user() -> Result<String, String> {
    let output = Command::new("id")
        .arg("-un")
        .output()
        .map_err(|e| format!("id -un: {e}"))?;
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

fn free_port() -> Result<u16, String> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| format!("binding a port: {e}"))?;
    listener
        .local_addr()
        .map(|address| address.port())
        .map_err(|e| e.to_string())
}

fn write_server_config(
    dir: &Path,
    listen: SocketAddr,
    chroot: Option<&Path>,
) -> Result<(), String> {
    let (address, port) = (listen.ip(), listen.port());
    let chroot = chroot
        .map(|root| format!("ChrootDirectory {}\n", root.display()))
        .unwrap_or_default();
    let config = format!(
        "Port {port}\n\
         ListenAddress {address}\n\
         HostKey {dir}/host_ed25519\n\
         PidFile {dir}/sshd.pid\n\
         AuthorizedKeysFile {dir}/authorized_keys\n\
         StrictModes no\n\
         PubkeyAuthentication yes\n\
         PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n\
         PermitRootLogin prohibit-password\n\
         UsePAM no\n\
         MaxSessions 200\n\
         MaxStartups 200:30:400\n\
         LogLevel ERROR\n\
         {chroot}",
        dir = dir.display()
    );
    std::fs::write(dir.join("sshd_config"), config).map_err(|e| e.to_string())
}

fn write_client_config(
    dir: &Path,
    name: &str,
    aliases: &[String],
    listen: SocketAddr,
    user: &str,
    host_public: &str,
) -> Result<(), String> {
    let (address, port) = (listen.ip(), listen.port());
    let key = host_public
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ");
    std::fs::write(
        dir.join("known_hosts"),
        format!("chopsticks-testkit {key}\n"),
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(
        dir.join("known_hosts_by_address"),
        format!("[{address}]:{port} {key}\n"),
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(dir.join("known_hosts_empty"), "").map_err(|e| e.to_string())?;
    let closed = free_port()?;
    let dir = dir.display();
    let common = format!(
        "  User {user}\n  IdentitiesOnly yes\n  GlobalKnownHostsFile /dev/null\n  \
         StrictHostKeyChecking yes\n  HostKeyAlias chopsticks-testkit\n  BatchMode yes\n  LogLevel ERROR\n"
    );
    let config = format!(
        "Host {aliases}\n  HostName {address}\n  Port {port}\n  IdentityFile {dir}/client_ed25519\n  UserKnownHostsFile {dir}/known_hosts\n{common}\n\
         Host {name}-wrong-key\n  HostName {address}\n  Port {port}\n  IdentityFile {dir}/wrong_ed25519\n  UserKnownHostsFile {dir}/known_hosts\n{common}\n\
         Host {name}-unknown-host\n  HostName {address}\n  Port {port}\n  IdentityFile {dir}/client_ed25519\n  UserKnownHostsFile {dir}/known_hosts_empty\n{common}\n\
         Host {name}-closed-port\n  HostName 127.0.0.1\n  Port {closed}\n  IdentityFile {dir}/client_ed25519\n  UserKnownHostsFile {dir}/known_hosts\n{common}",
        aliases = aliases.join(" ")
    );
    std::fs::write(format!("{dir}/ssh_config"), config).map_err(|e| e.to_string())
}

/// Every process below `root`, read from `/proc`.
fn descendants(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                && let Some((_, rest)) = stat.rsplit_once(") ")
                && let Some(parent) = rest.split_whitespace().nth(1).and_then(|s| s.parse().ok())
            {
                parents.push((pid, parent));
            }
        }
    }
    let mut found = vec![root];
    let mut index = 0;
    while index < found.len() {
        let current = found[index];
        found.extend(
            parents
                .iter()
                .filter(|(_, parent)| *parent == current)
                .map(|(pid, _)| *pid),
        );
        index += 1;
    }
    found.remove(0);
    found
}

fn process_name(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|name| name.trim().to_string())
}

/// An `Sshd`, or `None` with a note when the prerequisites are missing —
/// except under `CI=true`, where a missing prerequisite is a failure.
pub fn sshd_or_skip(name: &str, count: usize) -> Option<Sshd> {
    require(Sshd::start(name, count), "an ssh test")
}

/// The prepared prerequisite, or `None` with a `SKIPPED` line on stderr that
/// `cargo test` shows even for a passing test (the test then returns
/// early) — except under `CI=true`, where a missing prerequisite is a
/// failure.
pub fn require<T>(prepared: Result<T, String>, test: &str) -> Option<T> {
    match prepared {
        Ok(value) => Some(value),
        Err(reason) if in_ci() => panic!("prerequisite missing under CI=true: {reason}"),
        Err(reason) => {
            // Straight to the process's stderr: `cargo test` captures what
            // `eprintln!` prints from a passing test, and a skip must show.
            use std::io::Write;
            let name = std::thread::current()
                .name()
                .unwrap_or("a test")
                .to_string();
            let _ = writeln!(std::io::stderr(), "SKIPPED {name} ({test}): {reason}");
            None
        }
    }
}

/// An exclusive lock on `/tmp/NAME.lock`, held until the file is dropped, for
/// set-up that parallel tests (threads or processes) must do only once.
fn exclusive(name: &str) -> Result<std::fs::File, String> {
    let path = std::env::temp_dir().join(format!("{name}.lock"));
    let lock =
        std::fs::File::create(&path).map_err(|e| format!("creating {}: {e}", path.display()))?;
    // SAFETY: flock on an open descriptor has no memory-safety preconditions.
    unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    Ok(lock)
}

/// Whether this run must treat a missing prerequisite as a failure.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|value| value == "true" || value == "1")
}

/// This process's peak resident memory (`VmHWM`) in KiB; 0 where unreadable.
pub fn peak_resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmHWM:"))
                .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}
