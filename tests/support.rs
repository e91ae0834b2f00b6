//! Helpers shared by the test modules.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use chopsticks::{AgentCommand, AgentLaunch, BoxError, Pipes, StderrSink, Transport, async_trait};
use chopsticks_core::__private::protocol::{FailureKind, Message, PROTOCOL_VERSION, Payload};
use chopsticks_core::__private::wire::{Frame, FrameDecoder};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::Decoder;

/// Whether a process exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .map(|(_, rest)| !rest.starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Waits until `pid` is gone, at most `bound`; returns whether it went.
pub async fn wait_gone(pid: u32, bound: Duration) -> bool {
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        if !process_alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    !process_alive(pid)
}

/// A stderr sink that records `[host] line` strings.
pub fn capture_stderr() -> (StderrSink, Arc<Mutex<Vec<String>>>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let seen = lines.clone();
    let sink: StderrSink = Arc::new(move |host, line| {
        seen.lock().expect("lock").push(format!("[{host}] {line}"));
    });
    (sink, lines)
}

/// Reports a fault figure (a time to error, a time until a process is
/// gone, bytes left behind) on stderr, where `scripts/faults.sh` collects
/// them for BENCHMARKS.md; `cargo test` shows them with `--nocapture`.
pub fn figure(what: &str, value: impl std::fmt::Debug) {
    eprintln!("FIGURE {what}: {value:?}");
}

/// Runs `sh -c SCRIPT` instead of an agent: a real process that says whatever the test wants.
pub struct FakeAgent {
    pub script: String,
}

#[async_trait]
impl Transport for FakeAgent {
    fn host(&self) -> &str {
        "fake"
    }

    fn launch(&self) -> AgentLaunch {
        AgentLaunch::Direct
    }

    async fn spawn(&self, _command: &AgentCommand) -> Result<Pipes, BoxError> {
        let child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&self.script)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        Ok(Pipes::from_child(child)?)
    }
}

/// A target whose shell runs `sh -c SCRIPT` instead of the bootstrap it is
/// given: it says whatever the test wants where the bootstrap would speak.
pub struct FakeTarget {
    pub script: String,
}

#[async_trait]
impl Transport for FakeTarget {
    fn host(&self) -> &str {
        "fake-target"
    }

    fn launch(&self) -> AgentLaunch {
        AgentLaunch::ShellBootstrap
    }

    async fn spawn(&self, command: &AgentCommand) -> Result<Pipes, BoxError> {
        FakeAgent {
            script: self.script.clone(),
        }
        .spawn(command)
        .await
    }
}

#[cfg(any(feature = "ssh", feature = "docker"))]
pub fn sleep_secs(secs: u64) -> u64 {
    std::thread::sleep(Duration::from_secs(secs));
    secs
}

/// Connects `tunnel`, starts a 30 s call on it, runs `kill` while the call is
/// under way, and returns the call's error and how long after `kill` it came.
/// Panics if the call hangs for 10 s.
#[cfg(any(feature = "ssh", feature = "docker"))]
pub async fn pending_call_error_after(
    tunnel: &chopsticks::Tunnel,
    kill: impl FnOnce(),
) -> (chopsticks::Error, Duration) {
    tunnel.connect().await.expect("connect");
    let pending = tokio::spawn({
        let tunnel = tunnel.clone();
        async move { tunnel.call(sleep_secs, (30,)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed_at = Instant::now();
    kill();
    let result = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .expect("the pending call must not hang")
        .expect("join");
    (result.expect_err("the target died"), killed_at.elapsed())
}

/// Whether the tests run as root (needed to create users).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// The local transport with one byte flipped on the way, like a faulty link.
pub struct Corrupting {
    local: chopsticks::Local,
    stdin_at: Option<u64>,
    stdout_at: Option<u64>,
}

impl Corrupting {
    /// Flips the byte at `offset` of what the controller writes.
    pub fn stdin_at(offset: u64) -> Corrupting {
        Corrupting {
            local: chopsticks::Local::new(),
            stdin_at: Some(offset),
            stdout_at: None,
        }
    }

    /// Flips the byte at `offset` of what the agent writes.
    pub fn stdout_at(offset: u64) -> Corrupting {
        Corrupting {
            local: chopsticks::Local::new(),
            stdin_at: None,
            stdout_at: Some(offset),
        }
    }
}

#[async_trait]
impl Transport for Corrupting {
    fn host(&self) -> &str {
        "corrupting"
    }

    fn launch(&self) -> AgentLaunch {
        self.local.launch()
    }

    async fn spawn(&self, command: &AgentCommand) -> Result<Pipes, BoxError> {
        let mut pipes = self.local.spawn(command).await?;
        if let Some(offset) = self.stdin_at {
            pipes.stdin = Box::new(FlipWrite {
                inner: pipes.stdin,
                position: 0,
                offset,
            });
        }
        if let Some(offset) = self.stdout_at {
            pipes.stdout = Box::new(FlipRead {
                inner: pipes.stdout,
                position: 0,
                offset,
            });
        }
        Ok(pipes)
    }
}

struct FlipWrite<W> {
    inner: W,
    position: u64,
    offset: u64,
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for FlipWrite<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bytes: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let start = this.position;
        let result = if (start..start + bytes.len() as u64).contains(&this.offset) {
            let mut copy = bytes.to_vec();
            copy[(this.offset - start) as usize] ^= 0x20;
            std::pin::Pin::new(&mut this.inner).poll_write(cx, &copy)
        } else {
            std::pin::Pin::new(&mut this.inner).poll_write(cx, bytes)
        };
        if let std::task::Poll::Ready(Ok(written)) = &result {
            this.position += *written as u64;
        }
        result
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

struct FlipRead<R> {
    inner: R,
    position: u64,
    offset: u64,
}

impl<R: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for FlipRead<R> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buffer: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = &mut *self;
        let before = buffer.filled().len();
        let result = std::pin::Pin::new(&mut this.inner).poll_read(cx, buffer);
        if let std::task::Poll::Ready(Ok(())) = &result {
            let filled = buffer.filled_mut();
            let read = (filled.len() - before) as u64;
            if (this.position..this.position + read).contains(&this.offset) {
                filled[before + (this.offset - this.position) as usize] ^= 0x20;
            }
            this.position += read;
        }
        result
    }
}

/// A scratch directory, removed when dropped.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let path =
            std::env::temp_dir().join(format!("chopsticks-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create scratch dir");
        Scratch(path)
    }

    /// A scratch directory any user may write, for agents logged in as another user.
    #[cfg_attr(not(any(feature = "ssh", feature = "docker")), allow(dead_code))]
    pub fn shared(name: &str) -> Scratch {
        let scratch = Scratch::new(name);
        std::fs::set_permissions(&scratch.0, std::fs::Permissions::from_mode(0o777))
            .expect("chmod scratch dir");
        scratch
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// The directory itself.
    pub fn dir(&self) -> &Path {
        &self.0
    }

    /// The names in the directory, sorted; hidden staging files would show here.
    pub fn entries(&self) -> Vec<String> {
        entries(&self.0)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.0.join("small"))
            .output();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The names in `dir`, sorted.
pub fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|entry| {
            entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Writes `len` bytes of a non-repeating pattern.
pub fn patterned(path: &Path, len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ len as u64;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(path, &data).expect("write source");
    data
}

#[cfg(feature = "ssh")]
/// The `SshError` behind a failed connect.
pub fn ssh_error(error: &chopsticks::Error) -> &chopsticks::SshError {
    match error {
        chopsticks::Error::Spawn {
            cause: Some(cause), ..
        } => cause
            .downcast_ref::<chopsticks::SshError>()
            .unwrap_or_else(|| panic!("not an SshError: {error:?}")),
        other => panic!("expected Error::Spawn with an SshError, got {other:?}"),
    }
}

/// The throwaway user the sudo tests run agents as.
pub const USER: &str = "chopsticks-test";

/// Creates the test user when possible; says why not otherwise.
fn prepare_sudo_user() -> Result<u32, String> {
    if !is_root() {
        return Err("the sudo tests must run as root to create a user".into());
    }
    if std::process::Command::new("sudo")
        .arg("-V")
        .output()
        .is_err()
    {
        return Err("sudo is not installed (the README's test command installs it)".into());
    }
    let exists = std::process::Command::new("id")
        .arg("-u")
        .arg(USER)
        .output()
        .map_err(|e| e.to_string())?;
    if !exists.status.success() {
        let status = std::process::Command::new("useradd")
            .args(["--create-home", "--shell", "/bin/sh", USER])
            .status()
            .map_err(|e| format!("useradd: {e}"))?;
        // Another test process may have created it meanwhile; `id` decides below.
        let _ = status;
    }
    let output = std::process::Command::new("id")
        .arg("-u")
        .arg(USER)
        .output()
        .map_err(|e| e.to_string())?;
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .map_err(|e| format!("id -u {USER}: {e}"))
}

/// The test user's uid, or `None` (a skip) when it cannot be made, except under `CI=true`.
pub fn sudo_user() -> Option<u32> {
    chopsticks_testkit::require(prepare_sudo_user(), "the sudo test")
}

/// How long the event helpers below wait before they give up.
pub const EVENT_BOUND: Duration = Duration::from_secs(20);

/// Runs on an agent: leaves a file named `name` in `dir` and waits until
/// `count` files are there, at most [`EVENT_BOUND`]. Whether they all came:
/// calls that do not run at the same time never all arrive.
pub fn rendezvous(dir: PathBuf, name: String, count: usize) -> bool {
    std::fs::write(dir.join(&name), b"").expect("announce");
    let deadline = Instant::now() + EVENT_BOUND;
    while Instant::now() < deadline {
        if std::fs::read_dir(&dir)
            .map(|entries| entries.count())
            .unwrap_or(0)
            >= count
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// Runs on an agent: holds its thread until `path` exists, at most
/// [`EVENT_BOUND`]. Whether it appeared.
pub fn hold_until_exists(path: PathBuf) -> bool {
    let deadline = Instant::now() + EVENT_BOUND;
    while Instant::now() < deadline {
        if path.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// The test binary's allocator: the system's, noting the largest single
/// request made on a thread while that thread watches
/// ([`largest_allocation`]). Agents started from this binary use it too;
/// a thread that does not watch pays one thread-local read per allocation.
pub struct Tracking;

std::thread_local! {
    static LARGEST: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

fn note_allocation(size: usize) {
    let _ = LARGEST.try_with(|largest| {
        if let Some(seen) = largest.get() {
            largest.set(Some(seen.max(size)));
        }
    });
}

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged; the bookkeeping touches only a const-initialised thread-local
// `Cell` and never allocates.
unsafe impl std::alloc::GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        note_allocation(layout.size());
        // SAFETY: the caller's contract for `alloc` is passed on unchanged.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        note_allocation(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        note_allocation(new_size);
        // SAFETY: the caller's contract for `realloc` is passed on unchanged.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: the caller's contract for `dealloc` is passed on unchanged.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

/// Runs `work` and returns its output with the largest single allocation
/// this thread asked for meanwhile. On a current-thread runtime (the
/// default of `#[tokio::test]`) that covers every task the work spawned.
pub async fn largest_allocation<F: std::future::Future>(work: F) -> (F::Output, usize) {
    LARGEST.with(|largest| largest.set(Some(0)));
    let output = work.await;
    let largest = LARGEST.with(|largest| largest.take()).unwrap_or(0);
    (output, largest)
}

/// The hello a fake agent sends: this binary's id and `protocol`.
pub fn hello_message(
    protocol: u32,
    binary_id: Vec<u8>,
) -> chopsticks_core::__private::protocol::Message {
    use chopsticks_core::__private::protocol::{Hello, Message};
    Message::Hello(Hello {
        protocol,
        binary_id,
        pid: 1,
        os: "Linux".into(),
        arch: std::env::consts::ARCH.into(),
        depth: 1,
    })
}

/// The hello of a fake agent that passes the controller's checks.
pub fn our_hello_message() -> chopsticks_core::__private::protocol::Message {
    hello_message(
        chopsticks_core::__private::protocol::PROTOCOL_VERSION,
        chopsticks_core::__private::identity::binary_id().to_vec(),
    )
}

/// A directory made a root for `chroot` (and sshd's `ChrootDirectory`):
/// `/proc` mounted, `/dev/null`, a world-writable `/tmp`; undone when
/// dropped. [`with_tools`](Self::with_tools) fills it with this machine's
/// bootstrap tools and the libraries this program needs;
/// [`without_c_library`](Self::without_c_library) with a static busybox
/// alone, a user and a host name in `/etc`.
pub struct ChrootRoot(PathBuf);

impl ChrootRoot {
    /// An empty root named `kind-name`, under a path sshd accepts: every
    /// directory up to it owned by root and writable by no one else (not /tmp).
    fn empty(kind: &str, name: &str) -> Result<ChrootRoot, String> {
        if !is_root() {
            return Err("chroot needs root".into());
        }
        let base = Path::new("/srv/chopsticks-test");
        std::fs::create_dir_all(base).map_err(|e| e.to_string())?;
        std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        let root = base.join(format!("{kind}-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let made = ChrootRoot(root.clone());
        for dir in ["bin", "proc", "dev", "tmp", "etc"] {
            std::fs::create_dir_all(root.join(dir)).map_err(|e| e.to_string())?;
        }
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))
            .map_err(|e| e.to_string())?;
        let root_text = root.display().to_string();
        run(
            "mount",
            &["-t", "proc", "proc", &format!("{root_text}/proc")],
        )?;
        run(
            "mknod",
            &["-m", "666", &format!("{root_text}/dev/null"), "c", "1", "3"],
        )?;
        Ok(made)
    }

    /// A root with the bootstrap's tools and this program's libraries, as
    /// this machine has them.
    pub fn with_tools(name: &str) -> Result<ChrootRoot, String> {
        let root = ChrootRoot::empty("tools", name)?;
        chopsticks_testkit::rootfs::bootstrap_root(&root.0)?;
        Ok(root)
    }

    /// A root with no C library at all: a static busybox as `/bin/sh` and
    /// every tool, a user `operator-x` (4321) and a host `fleet-db`.
    pub fn without_c_library(name: &str) -> Result<ChrootRoot, String> {
        let busybox = Path::new("/bin/busybox");
        let listed = std::process::Command::new(busybox)
            .arg("--list")
            .output()
            .map_err(|e| {
                format!("busybox-static is not installed (scripts/test.sh installs it): {e}")
            })?;
        let dynamic = std::process::Command::new("ldd")
            .arg(busybox)
            .output()
            .is_ok_and(|output| output.status.success());
        if dynamic {
            return Err("/bin/busybox is dynamically linked; install busybox-static".into());
        }
        let root = ChrootRoot::empty("libcless", name)?;
        std::fs::copy(busybox, root.0.join("bin/busybox")).map_err(|e| e.to_string())?;
        for tool in String::from_utf8_lossy(&listed.stdout).lines() {
            let _ = std::os::unix::fs::symlink("busybox", root.0.join("bin").join(tool));
        }
        for (path, text) in [
            (
                "etc/passwd",
                "root:x:0:0:root:/root:/bin/sh\noperator-x:x:4321:4321::/tmp:/bin/sh\n",
            ),
            ("etc/group", "root:x:0:\n"),
            ("etc/hosts", "127.0.0.1 localhost\n10.9.8.7 fleet-db\n"),
            (
                "etc/nsswitch.conf",
                "passwd: files\ngroup: files\nhosts: files dns\n",
            ),
        ] {
            std::fs::write(root.0.join(path), text).map_err(|e| e.to_string())?;
        }
        Ok(root)
    }

    /// The root directory.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Gives the root this machine's dynamic loader and a C library that
    /// lacks every version this program needs (libm in libc's place), as an
    /// old distribution's would: the loader starts, then refuses.
    pub fn with_old_c_library(self) -> Result<ChrootRoot, String> {
        // Every library this program links, at its path, except that the
        // C library is libm: each GLIBC_x version the program needs is missing.
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let ldd = std::process::Command::new("ldd")
            .arg(&exe)
            .output()
            .map_err(|e| format!("ldd: {e}"))?;
        let text = String::from_utf8_lossy(&ldd.stdout).into_owned();
        let libm = text
            .split_whitespace()
            .find(|word| word.starts_with('/') && word.contains("libm.so"))
            .ok_or("this program does not link libm")?
            .to_string();
        for path in text.split_whitespace().filter(|word| word.starts_with('/')) {
            let source = if path.contains("/libc.so") {
                libm.as_str()
            } else {
                path
            };
            let target = self.0.join(path.trim_start_matches('/'));
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
            }
            std::fs::copy(source, &target).map_err(|e| format!("{source}: {e}"))?;
        }
        Ok(self)
    }
}

impl Drop for ChrootRoot {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.0.join("proc"))
            .status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `program args`; an error unless it succeeds.
fn run(program: &str, args: &[&str]) -> Result<(), String> {
    let status = std::process::Command::new(program)
        .args(args)
        .status()
        .map_err(|e| format!("{program}: {e}"))?;
    status
        .success()
        .then_some(())
        .ok_or_else(|| format!("{program} {} failed", args.join(" ")))
}

/// A user and a host looked up through the C library's name services.
pub fn lookups() -> (Option<u32>, Vec<String>) {
    // SAFETY: getpwnam takes a NUL-terminated name; the entry is read at once.
    let entry = unsafe { libc::getpwnam(c"operator-x".as_ptr()) };
    // SAFETY: a non-null entry points at a valid passwd until the next lookup.
    let uid = (!entry.is_null()).then(|| unsafe { (*entry).pw_uid });
    let addresses = std::net::ToSocketAddrs::to_socket_addrs(&("fleet-db", 5432))
        .map(|found| found.map(|address| address.ip().to_string()).collect())
        .unwrap_or_default();
    (uid, addresses)
}

pub fn has_c_library() -> bool {
    ["/lib", "/lib64", "/usr/lib"]
        .iter()
        .any(|dir| std::path::Path::new(dir).exists())
}

/// Calls, lookups, a put and a fetch through `tun`, whose agent runs in
/// `root` (a [`ChrootRoot::without_c_library`]) on the shipped C library.
pub async fn exercise_without_c_library(tun: &chopsticks::Tunnel, root: &ChrootRoot, text: &str) {
    fn add(a: u64, b: u64) -> u64 {
        a + b
    }
    assert!(
        !tun.call(has_c_library, ()).await.expect("call"),
        "the root has no C library"
    );
    assert_eq!(tun.call(add, (40, 2)).await.expect("call"), 42);
    let (uid, addresses) = tun.call(lookups, ()).await.expect("lookups");
    assert_eq!((uid, addresses), (Some(4321), vec!["10.9.8.7".to_string()]));
    tun.put_bytes(text.to_string(), "/tmp/put")
        .await
        .expect("put");
    assert_eq!(
        std::fs::read_to_string(root.path().join("tmp/put")).expect("read"),
        text
    );
    let dir = Scratch::new("without-c-library");
    tun.fetch("/tmp/put", dir.path("fetched"))
        .await
        .expect("fetch");
    assert_eq!(
        std::fs::read_to_string(dir.path("fetched")).expect("read"),
        text
    );
}

/// An agent started by hand, as a controller would, read and written frame by frame.
pub struct RawAgent {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::process::ChildStdout,
    buffer: BytesMut,
    decoder: FrameDecoder,
}

impl RawAgent {
    pub async fn start() -> RawAgent {
        let mut child = tokio::process::Command::new("/proc/self/exe")
            .env("CHOPSTICKS_AGENT", PROTOCOL_VERSION.to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the agent");
        let mut agent = RawAgent {
            stdin: child.stdin.take().expect("stdin"),
            stdout: child.stdout.take().expect("stdout"),
            child,
            buffer: BytesMut::new(),
            decoder: FrameDecoder::default(),
        };
        match agent.next().await {
            Frame::Message(Message::Hello(_)) => agent,
            other => panic!("expected the hello, got {other:?}"),
        }
    }

    pub async fn next(&mut self) -> Frame {
        loop {
            if let Some(frame) = self.decoder.decode(&mut self.buffer).expect("valid frames") {
                return frame;
            }
            let read = tokio::time::timeout(
                Duration::from_secs(10),
                self.stdout.read_buf(&mut self.buffer),
            )
            .await
            .expect("the agent answers within 10 s")
            .expect("read");
            assert!(read > 0, "the agent died: {:?}", self.child.try_wait());
        }
    }

    /// Writes `bytes` (frames) to the agent's input.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.stdin
            .write_all(bytes)
            .await
            .expect("write to the agent");
    }

    /// Whether the agent process is still running.
    pub fn is_alive(&mut self) -> bool {
        self.child.try_wait().expect("wait").is_none()
    }

    /// How the agent exited, waiting at most `bound`.
    pub async fn exit_status(&mut self, bound: Duration) -> std::process::ExitStatus {
        match tokio::time::timeout(bound, self.child.wait()).await {
            Ok(status) => status.expect("wait"),
            Err(_) => {
                let pid = self.child.id().unwrap_or(0);
                let mut threads = String::new();
                for task in std::fs::read_dir(format!("/proc/{pid}/task"))
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    let path = task.path();
                    let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
                    let wchan = std::fs::read_to_string(path.join("wchan")).unwrap_or_default();
                    let stat = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
                    let state = stat.split(' ').nth(2).unwrap_or("?").to_string();
                    threads.push_str(&format!("{} {} {}\n", comm.trim(), state, wchan));
                }
                panic!("the agent {pid} did not exit in {bound:?}; its threads:\n{threads}");
            }
        }
    }

    /// The next reply to a call (heartbeats skipped): its id and outcome.
    pub async fn reply(&mut self) -> (u64, Result<Vec<u8>, FailureKind>) {
        loop {
            match self.next().await {
                Frame::Message(Message::Return {
                    id,
                    value: Payload::Inline(value),
                }) => return (id, Ok(value)),
                Frame::Message(Message::Fail { id, failure }) => return (id, Err(failure.kind)),
                Frame::Message(Message::Heartbeat) => {}
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }
}

/// The bytes of a `Call` frame for `function` with the encoded `args`.
pub fn raw_call(
    id: u64,
    function: &chopsticks_core::__private::protocol::FunctionRef,
    mode: chopsticks_core::__private::protocol::CallMode,
    args: &[u8],
) -> Vec<u8> {
    use chopsticks_core::__private::protocol::{Message, Payload};
    chopsticks_core::__private::wire::OutFrame::message(&Message::Call {
        id,
        function: function.clone(),
        mode,
        args: Payload::Inline(args.to_vec()),
    })
    .to_bytes()
}

/// A fake agent's script: it says `hello`, waits for the controller's first
/// call (past the trace level every controller sends first), then says
/// `rest` and reads on. Files, so the frames can be of any size.
pub fn speaks_after_the_call(hello: &Path, rest: &Path) -> String {
    let trace_level = chopsticks_core::__private::wire::OutFrame::message(
        &chopsticks_core::__private::protocol::Message::TraceLevel { level: 0 },
    )
    .to_bytes()
    .len();
    format!(
        "cat '{}'; dd bs=1 count={} of=/dev/null 2>/dev/null; cat '{}'; cat > /dev/null",
        hello.display(),
        trace_level + 1,
        rest.display()
    )
}
