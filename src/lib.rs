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
//! # Features
//!
//! - `local` (default): [`Local`] and [`Sudo`].
//! - `full`: every transport.

pub use chopsticks_core::{
    AgentCommand, AgentLaunch, AgentProcess, BoxError, Call, Error, ExitReport, Group, GroupResult,
    Phase, Pipes, Result, StderrSink, Transport, Tunnel, TunnelBuilder, async_trait, shell_quote,
};
pub use chopsticks_core::{agent_env, buffer, identity, protocol, remote, stderr, wire};

#[cfg(feature = "local")]
pub use chopsticks_local::{Local, LocalError, Sudo};

// Naming the agent crate keeps its constructor in every program that uses chopsticks.
use chopsticks_agent as _;

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
