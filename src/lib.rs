//! Run your own Rust functions on other machines, containers and
//! subprocesses, over nothing but a pipe.
//!
//! A [`Tunnel`] starts an agent on its target through a [`Transport`]. The
//! agent is this very program, so any plain `fn`, `async fn` or closure that
//! captures nothing can be called there by name: arguments and results travel
//! as CBOR, many calls overlap on one tunnel, and bulk data streams in
//! chunks.
//!
//! ```
//! use chopsticks::{Local, Tunnel};
//!
//! fn add3(a: i64, b: i64, c: i64) -> i64 { a + b + c }
//!
//! async fn hostname() -> String {
//!     std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default()
//! }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let tun = Tunnel::new(Local::new());
//! assert_eq!(tun.call(add3, (1, 2, 39)).await?, 42);
//! let pid: u32 = tun.call(std::process::id, ()).await?;
//! assert_ne!(pid, std::process::id());
//! let name = tun.call_async(hostname, ()).await?;
//! assert!(!name.is_empty());
//! # Ok::<(), chopsticks::Error>(())
//! # }).unwrap();
//! ```
//!
//! Files move with [`Tunnel::put`] and [`Tunnel::fetch`]: streamed in
//! chunks beside the calls, checked with BLAKE3, and renamed into place only
//! when complete, so a target is never left half written.
//!
//! ```
//! use chopsticks::{Local, Tunnel};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let dir = std::env::temp_dir().join(format!("chopsticks-facade-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! std::fs::write(dir.join("app.conf"), "listen = 8080\n")?;
//! let tun = Tunnel::new(Local::new());
//! let sent = tun.put(dir.join("app.conf"), dir.join("remote/app.conf"))
//!     .mode(0o640)
//!     .create_dirs(true)
//!     .await?;
//! assert_eq!(sent.size, 14);
//! let back = tun.fetch(dir.join("remote/app.conf"), dir.join("copy.conf")).await?;
//! assert_eq!(back.checksum, sent.checksum);
//!
//! // A rendered configuration, written only when it differs from what is there.
//! let rendered = format!("workers = {}\n", 4);
//! let first = tun.put_bytes(rendered.clone(), dir.join("remote/workers.conf"))
//!     .mode(0o640)
//!     .skip_unchanged(true)
//!     .await?;
//! let again = tun.put_bytes(rendered, dir.join("remote/workers.conf"))
//!     .mode(0o640)
//!     .skip_unchanged(true)
//!     .await?;
//! assert!(first.changed && !again.changed);
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! # Start here
//!
//! 1. Depend on `chopsticks` (transports are features, below) and on `tokio`
//!    with its `macros` and `rt-multi-thread` features.
//! 2. Make a [`Tunnel`] from a transport: [`Local`], `Ssh`, `Docker`, or
//!    [`TunnelBuilder`] for timeouts and where the agent's stderr goes. It
//!    connects on first use.
//! 3. [`Tunnel::call`] a plain `fn`, [`Tunnel::call_async`] an `async fn`.
//!    A function returning `Result<T, E>` gives `Ok(Err(e))` when it ran and
//!    failed; return [`RemoteError`] there to use `?` on any error.
//! 4. Move files with [`Tunnel::put`] and [`Tunnel::fetch`].
//! 5. Stream: [`Tunnel::call_stream`] gives the items of a function that
//!    returns an iterator as they come (a [`CallStream`]);
//!    [`Tunnel::call_byte_stream`] raw bytes; [`Tunnel::call_with_input`]
//!    feeds a function's [`Receiver`] or [`ByteReceiver`] from any stream,
//!    and [`Tunnel::call_stream_with_input`] does both.
//!    `tracing` events of remote functions reach your subscriber.
//! 6. Reach many hosts with a [`Group`]: every operation gives a
//!    [`GroupResult`], one outcome per host ([`Group::call_stream`] merges
//!    the hosts' streams).
//! 7. Act on failures with [`Error`]: [`Error::host`], [`Error::phase`],
//!    [`Error::is_timeout`], [`Error::is_disconnected`].
//! 8. Reach targets through any command with `Exec` (`kubectl exec -i`,
//!    `ip netns exec`, `chroot`), or write your own [`Transport`].
//! 9. Reach hosts that cannot run this program: its libraries travel with it
//!    when needed ([`TunnelBuilder::bundle_libraries`]); for another
//!    architecture, [`register!`] the functions and name a build with
//!    [`TunnelBuilder::program_for`].
//!
//! The README says what a target must provide and what stays on it.
//!
//! # Functions that capture nothing
//!
//! The agent finds a function by its type, so a closure that captures
//! variables cannot be called: send the data as arguments instead. Stable
//! Rust lets a library check this only when the program is built (`cargo
//! build`, `cargo test`), not in `cargo check`; the build then fails with
//! one error, E0080, whose note points at the call:
//!
//! ```compile_fail,E0080
//! use chopsticks::{Local, Tunnel};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let tun = Tunnel::new(Local::new());
//! let offset = 5u64;
//! let _ = tun.call(move |a: u64| a + offset, (1,)).await; // captures `offset`
//! # });
//! ```
//!
//! ```
//! use chopsticks::{Local, Tunnel};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let tun = Tunnel::new(Local::new());
//! let offset = 5u64;
//! assert_eq!(tun.call(|a: u64, offset: u64| a + offset, (1, offset)).await?, 6);
//! # Ok::<(), chopsticks::Error>(())
//! # }).unwrap();
//! ```
//!
//! # Another user
//!
//! [`Become`] runs the agent as another user (root by default) through
//! `sudo` or `doas`, over any transport; a password goes to `sudo -S` on its
//! standard input and nowhere else ([`Password`] is zeroed and never
//! printed):
//!
//! ```no_run
//! use chopsticks::{Become, Local, Tunnel};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let root = Tunnel::new(Become::sudo(Local::new()));
//! let postgres = Tunnel::new(Become::sudo(Local::new()).user("postgres").password("s3cret"));
//! # let _ = (root, postgres);
//! # });
//! ```
//!
//! # Features
//!
//! - `local` (default): [`Local`], [`Sudo`] and [`Exec`] (any command: `kubectl exec -i`, `ip netns exec`, `chroot`).
//! - `ssh`: `Ssh`, through the system's OpenSSH client, and `Group::ssh` (`SshGroup`).
//! - `libssh2`: `NativeSsh`, libssh2 in-process (needs a C compiler and OpenSSL headers).
//! - `docker`: `Docker`, containers through the Engine API, even `FROM scratch` images.
//! - `progress`: terminal progress bars, `progress::Bars`.
//! - `ops`: the operator kit, `ops::{Cmd, TunnelOps, GroupOps}`: commands with live output and
//!   facts.
//! - `full`: every transport and `progress`.

pub use chopsticks_core::{
    AgentCommand, AgentLaunch, AgentProcess, AsyncRemoteFn, Become, BecomeError, BecomeTool,
    BoxError, ByteReceiver, Call, CallStream, DEFAULT_CLOSE_TIMEOUT, DEFAULT_CONNECT_TIMEOUT,
    Direction, Error, ExitReport, Fetch, Group, GroupFetch, GroupPut, GroupResult, GroupStream,
    HostFailures, InputEnd, Password, Phase, Pipes, Put, Receiver, RemoteError, RemoteFn, Result,
    StderrSink, Transfer, Transport, Tunnel, TunnelBuilder, ValueAction, ValuePart, async_trait,
    register, shell_quote,
};
pub use chopsticks_core::{progress, stderr};

#[cfg(feature = "docker")]
pub use chopsticks_docker::{Docker, DockerError};
#[cfg(feature = "local")]
pub use chopsticks_local::{Exec, Local, LocalError, Sudo};
/// The operator kit: commands with live output and facts (`use
/// chopsticks::ops::{Cmd, TunnelOps}`).
#[cfg(feature = "ops")]
pub use chopsticks_ops as ops;
#[cfg(feature = "libssh2")]
pub use chopsticks_ssh::{NativePhase, NativeSsh};
#[cfg(feature = "ssh")]
pub use chopsticks_ssh::{Ssh, SshError, SshGroup};

// Naming the agent crate keeps its constructor in every program that uses chopsticks.
use chopsticks_agent as _;

// The README shows every transport, so it is tested with all of them (`--all-features`).
#[cfg(all(doctest, feature = "full"))]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
