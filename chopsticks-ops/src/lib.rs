//! The operator kit for chopsticks: commands with live output, facts, and
//! whole directories, on one host or a whole [`Group`], built on
//! chopsticks' public API alone (streaming calls carry a command's output
//! as it comes).
//!
//! Bring [`TunnelOps`] and [`GroupOps`] into scope, and tunnels and groups
//! gain [`run`](TunnelOps::run), [`facts`](TunnelOps::facts),
//! [`put_dir`](TunnelOps::put_dir) and [`fetch_dir`](TunnelOps::fetch_dir):
//!
//! ```
//! use chopsticks_core::Tunnel;
//! use chopsticks_local::Local;
//! use chopsticks_ops::{Cmd, TunnelOps};
//! use chopsticks_agent as _; // lets this program become an agent
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let tun = Tunnel::new(Local::new());
//! let output = tun.run(Cmd::new("echo").args(["hello", "$(world)"])).await?;
//! assert!(output.status.success());
//! assert_eq!(output.stdout, b"hello $(world)\n");
//!
//! let failed = tun.run(Cmd::shell("echo oops >&2; exit 3")).await?;
//! assert_eq!(failed.status.code(), Some(3));
//! assert!(tun.run(Cmd::shell("exit 3").check()).await.is_err());
//!
//! let facts = tun.facts().await?;
//! assert!(facts.kernel_release.is_some());
//!
//! let here = std::env::temp_dir().join(format!("ops-doc-{}", std::process::id()));
//! std::fs::create_dir_all(here.join("src"))?;
//! std::fs::write(here.join("src/a.txt"), "a")?;
//! let there = here.join("copy").display().to_string();
//! let summary = tun.put_dir(here.join("src"), &there).await?;
//! assert_eq!(summary.files_sent, 1);
//! assert_eq!(tun.put_dir(here.join("src"), &there).await?.files_sent, 0);
//! # std::fs::remove_dir_all(&here)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! A command runs in a process group of its own on the host, with no shell
//! unless [`Cmd::shell`] asks for one. Its outputs are captured within a
//! bound (a head and a tail), and can be watched line by line as they come
//! ([`Cmd::echo`], [`Cmd::on_line`]). A [`timeout`](Cmd::timeout) kills the
//! whole group; dropping the run kills it too.

mod account;
mod cmd;
mod dirs;
mod error;
mod facts;
mod output;
mod remote;
mod run;

use std::future::Future;
use std::path::Path;

use chopsticks_core::{Group, GroupResult, Tunnel};

pub use cmd::{Cmd, DEFAULT_CAPTURE_LIMIT, DEFAULT_MAX_LINE};
pub use dirs::{DirError, DirSync, GroupDirSync, SyncProgress, SyncSummary};
pub use error::CmdError;
pub use facts::{Facts, Interface, Route};
pub use output::{ExitStatus, Line, Output, OutputKind};

/// Commands and facts on one tunnel.
pub trait TunnelOps {
    /// Runs `cmd` on the host and returns its [`Output`], whatever its
    /// status, unless it was [`check`](Cmd::check)ed.
    fn run(&self, cmd: Cmd) -> impl Future<Output = Result<Output, CmdError>> + Send;

    /// What the host is, in one call.
    fn facts(&self) -> impl Future<Output = chopsticks_core::Result<Facts>> + Send;

    /// Makes the tree at `remote` on the host the same as `local` here:
    /// modes and mtimes kept, symlinks kept as links, only what changed
    /// sent, each file landing whole. See [`DirSync`] for options.
    fn put_dir(&self, local: impl AsRef<Path>, remote: impl AsRef<str>) -> DirSync<'_>;

    /// Makes the tree at `local` here the same as `remote` on the host.
    fn fetch_dir(&self, remote: impl AsRef<str>, local: impl AsRef<Path>) -> DirSync<'_>;
}

impl TunnelOps for Tunnel {
    fn run(&self, cmd: Cmd) -> impl Future<Output = Result<Output, CmdError>> + Send {
        run::run_on(self, cmd)
    }

    async fn facts(&self) -> chopsticks_core::Result<Facts> {
        self.call(facts::gather, ()).await
    }

    fn put_dir(&self, local: impl AsRef<Path>, remote: impl AsRef<str>) -> DirSync<'_> {
        DirSync::put(self, local.as_ref(), remote.as_ref())
    }

    fn fetch_dir(&self, remote: impl AsRef<str>, local: impl AsRef<Path>) -> DirSync<'_> {
        DirSync::fetch(self, remote.as_ref(), local.as_ref())
    }
}

/// Commands and facts on every host of a group at once, under its
/// `max_parallel`; one slow or dead host never holds the others back.
pub trait GroupOps {
    /// Runs `cmd` on every host; live lines (`Cmd::echo`, `Cmd::on_line`)
    /// come tagged with their host as they come.
    fn run(&self, cmd: Cmd) -> impl Future<Output = GroupResult<Output, CmdError>> + Send;

    /// Every host's facts.
    fn facts(&self) -> impl Future<Output = GroupResult<Facts>> + Send;

    /// Pushes one tree to every host, as [`TunnelOps::put_dir`] does.
    fn put_dir(&self, local: impl AsRef<Path>, remote: impl AsRef<str>) -> GroupDirSync<'_>;
}

impl GroupOps for Group {
    fn run(&self, cmd: Cmd) -> impl Future<Output = GroupResult<Output, CmdError>> + Send {
        run::run_on_group(self, cmd)
    }

    async fn facts(&self) -> GroupResult<Facts> {
        self.call(facts::gather, ()).await
    }

    fn put_dir(&self, local: impl AsRef<Path>, remote: impl AsRef<str>) -> GroupDirSync<'_> {
        GroupDirSync::new(self, local.as_ref(), remote.as_ref())
    }
}
