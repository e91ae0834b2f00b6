//! `put` and `fetch`: whole files moved over a tunnel, verified, and
//! written atomically.
//!
//! The sender streams the file in chunk frames through the connection's bulk
//! queue (so calls on the same tunnel overtake it), hashing it with BLAKE3 as
//! it reads. The receiver writes into an [`AtomicFile`](crate::files::AtomicFile)
//! beside the target, hashing as it writes, and renames it over the target
//! only after size and checksum match and the data is synced. Memory stays
//! bounded by a few chunks on each side, whatever the file's size.

mod fetch;
mod put;
mod unchanged;

use std::future::{Future, IntoFuture};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Direction, Error, Result};
use crate::files::FileError;
use crate::progress::{ProgressEvent, SharedProgress};
use crate::protocol::Failure;
use crate::tunnel::Tunnel;

/// What a finished [`put`](Tunnel::put) or [`fetch`](Tunnel::fetch) moved.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Transfer {
    /// The path on this machine (empty for a put from memory,
    /// [`Tunnel::put_bytes`]).
    pub local_path: PathBuf,
    /// The path on the host.
    pub remote_path: PathBuf,
    /// Bytes moved.
    pub size: u64,
    /// The BLAKE3 digest of the content, as 64 lowercase hex digits
    /// (the same as `b3sum` prints).
    pub checksum: String,
    /// Whether the target was written. Always true, except for a put with
    /// [`skip_unchanged`](Put::skip_unchanged) that found the target
    /// already as asked and left it alone: `size` and `checksum` then
    /// describe what is there.
    pub changed: bool,
}

/// Options shared by every transfer builder.
#[derive(Clone)]
pub(crate) struct TransferOptions {
    pub(crate) mode: Option<u32>,
    pub(crate) create_dirs: bool,
    pub(crate) preserve_mtime: bool,
    pub(crate) sync: bool,
    pub(crate) progress: Option<SharedProgress>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) owner: Option<String>,
    pub(crate) group: Option<String>,
    pub(crate) skip_unchanged: bool,
}

impl Default for TransferOptions {
    fn default() -> TransferOptions {
        TransferOptions {
            mode: None,
            create_dirs: false,
            preserve_mtime: false,
            sync: true,
            progress: None,
            timeout: None,
            owner: None,
            group: None,
            skip_unchanged: false,
        }
    }
}

/// The builder methods every transfer shares.
macro_rules! transfer_options {
    ($builder:ident) => {
        impl $builder<'_> {
            /// Gives the written file these permission bits (default: the
            /// source's, minus the receiving side's umask).
            pub fn mode(mut self, mode: u32) -> Self {
                self.options.mode = Some(mode);
                self
            }

            /// Creates missing parent directories of the target (default: a
            /// missing directory is an error).
            pub fn create_dirs(mut self, create: bool) -> Self {
                self.options.create_dirs = create;
                self
            }

            /// Gives the written file the source's modification time (default: now).
            pub fn preserve_mtime(mut self, preserve: bool) -> Self {
                self.options.preserve_mtime = preserve;
                self
            }

            /// Whether the written file and its rename are synced to disk before
            /// the transfer returns (default: yes). Without, the file is still
            /// verified and appears whole or not at all, but a crash or power
            /// loss soon after may lose it; like `scp` or `rsync` without
            /// `--fsync`, it moves faster where the disk is the bottleneck.
            pub fn sync(mut self, sync: bool) -> Self {
                self.options.sync = sync;
                self
            }

            /// Reports progress: `Started`, `Advanced` as bytes move, `Finished`.
            pub fn progress(mut self, progress: impl $crate::progress::Progress + 'static) -> Self {
                self.options.progress = Some(std::sync::Arc::new(progress));
                self
            }

            /// Bounds the whole transfer, including connecting. On expiry the
            /// transfer fails with [`Error::Transfer`](crate::Error::Transfer)
            /// of kind `TimedOut` and nothing is left behind.
            pub fn timeout(mut self, after: std::time::Duration) -> Self {
                self.options.timeout = Some(after);
                self
            }
        }
    };
}
pub(crate) use transfer_options;

/// The builder methods of puts only.
macro_rules! put_options {
    ($builder:ident) => {
        impl $builder<'_> {
            /// Gives the written file this owner: a user name, resolved on
            /// the host, or a decimal user id (as `chown` takes them). The
            /// staged file gets it before any data moves, so an agent that
            /// may not (one that is not root) fails at once with kind
            /// `PermissionDenied`, an unknown name with `NotFound`, and the
            /// target is untouched.
            pub fn owner(mut self, user: impl Into<String>) -> Self {
                self.options.owner = Some(user.into());
                self
            }

            /// Gives the written file this group: a group name, resolved on
            /// the host, or a decimal group id; see [`owner`](Self::owner).
            pub fn group(mut self, group: impl Into<String>) -> Self {
                self.options.group = Some(group.into());
                self
            }

            /// Leaves the target alone when it is already a regular file with
            /// this content (same size and BLAKE3) and the mode, owner and
            /// group asked for (those not asked for are not compared). The
            /// result's [`changed`](crate::Transfer::changed) says which
            /// happened. It costs one more round trip, reading the target on
            /// the host, and for a file, reading it here before it is sent.
            pub fn skip_unchanged(mut self, skip: bool) -> Self {
                self.options.skip_unchanged = skip;
                self
            }
        }
    };
}
pub(crate) use put_options;

/// What a put sends.
#[derive(Clone)]
pub(crate) enum PutSource {
    /// A file on this machine.
    File(PathBuf),
    /// Bytes in memory.
    Memory(bytes::Bytes),
}

impl PutSource {
    /// The local path, for reports and errors (empty for memory).
    pub(crate) fn local_path(&self) -> PathBuf {
        match self {
            PutSource::File(path) => path.clone(),
            PutSource::Memory(_) => PathBuf::new(),
        }
    }
}

/// What a transfer does: a put of what, or a fetch.
#[derive(Clone)]
pub(crate) enum Job {
    Put(PutSource),
    Fetch,
}

/// A pending [`Tunnel::put`]; await it, after setting any options.
#[must_use = "a put does nothing until it is awaited"]
pub struct Put<'t> {
    tunnel: &'t Tunnel,
    source: PutSource,
    remote: PathBuf,
    options: TransferOptions,
}

/// A pending [`Tunnel::fetch`]; await it, after setting any options.
#[must_use = "a fetch does nothing until it is awaited"]
pub struct Fetch<'t> {
    tunnel: &'t Tunnel,
    remote: PathBuf,
    local: PathBuf,
    options: TransferOptions,
}

transfer_options!(Put);
transfer_options!(Fetch);
put_options!(Put);

type Running<'t> = Pin<Box<dyn Future<Output = Result<Transfer>> + Send + 't>>;

impl<'t> IntoFuture for Put<'t> {
    type Output = Result<Transfer>;
    type IntoFuture = Running<'t>;

    fn into_future(self) -> Running<'t> {
        let local = self.source.local_path();
        let route = Route::new(self.tunnel, Direction::Put, local, self.remote);
        Box::pin(run(self.tunnel, route, self.options, Job::Put(self.source)))
    }
}

impl<'t> IntoFuture for Fetch<'t> {
    type Output = Result<Transfer>;
    type IntoFuture = Running<'t>;

    fn into_future(self) -> Running<'t> {
        let route = Route::new(self.tunnel, Direction::Fetch, self.local, self.remote);
        Box::pin(run(self.tunnel, route, self.options, Job::Fetch))
    }
}

impl<'t> Put<'t> {
    pub(crate) fn new(tunnel: &'t Tunnel, source: PutSource, remote: &Path) -> Put<'t> {
        Put {
            tunnel,
            source,
            remote: remote.to_path_buf(),
            options: TransferOptions::default(),
        }
    }
}

impl<'t> Fetch<'t> {
    pub(crate) fn new(tunnel: &'t Tunnel, remote: &Path, local: &Path) -> Fetch<'t> {
        Fetch {
            tunnel,
            remote: remote.to_path_buf(),
            local: local.to_path_buf(),
            options: TransferOptions::default(),
        }
    }
}

/// Runs `job` on `tunnel` (`route` says where, for reports and errors),
/// with its timeout and progress events around it.
pub(crate) async fn run(
    tunnel: &Tunnel,
    route: Route,
    options: TransferOptions,
    job: Job,
) -> Result<Transfer> {
    let route = Arc::new(route);
    let progress = options.progress.clone();
    if let Some(progress) = &progress {
        let task = match &job {
            Job::Put(PutSource::File(local)) => format!("put {}", local.display()),
            Job::Put(PutSource::Memory(bytes)) => {
                format!("put {} bytes to {}", bytes.len(), route.remote.display())
            }
            Job::Fetch => format!("fetch {}", route.remote.display()),
        };
        progress.report(&ProgressEvent::Started {
            host: &route.host,
            task: &task,
            total: None,
        });
    }
    let timeout = options.timeout;
    let running: Running<'_> = match job {
        Job::Put(source) => Box::pin(put::put(tunnel, route.clone(), source, options)),
        Job::Fetch => Box::pin(fetch::fetch(tunnel, route.clone(), options)),
    };
    let result = match timeout {
        None => running.await,
        Some(after) => tokio::time::timeout(after, running)
            .await
            .unwrap_or_else(|_| {
                Err(route.error(
                    std::io::ErrorKind::TimedOut,
                    format!("it did not finish within {after:?}"),
                ))
            }),
    };
    if let Some(progress) = &progress {
        progress.report(&ProgressEvent::Finished {
            host: &route.host,
            ok: result.is_ok(),
        });
    }
    result
}

/// Where a transfer goes, for its errors.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub(crate) host: String,
    pub(crate) direction: Direction,
    pub(crate) local: PathBuf,
    pub(crate) remote: PathBuf,
}

impl Route {
    pub(crate) fn new(
        tunnel: &Tunnel,
        direction: Direction,
        local: PathBuf,
        remote: PathBuf,
    ) -> Route {
        Route {
            host: tunnel.host().to_string(),
            direction,
            local,
            remote,
        }
    }

    pub(crate) fn error(&self, kind: std::io::ErrorKind, message: String) -> Error {
        Error::Transfer {
            host: self.host.clone(),
            direction: self.direction,
            local_path: self.local.clone(),
            remote_path: self.remote.clone(),
            kind,
            message,
        }
    }

    /// A file operation failed on this machine.
    pub(crate) fn local_failure(&self, error: FileError) -> Error {
        self.error(error.source.kind(), format!("on this machine, {error}"))
    }

    /// A file operation failed on the host.
    pub(crate) fn remote_failure(&self, failure: Failure) -> Error {
        let kind = match failure.kind {
            crate::protocol::FailureKind::File(file) => file.io_kind(),
            _ => std::io::ErrorKind::Other,
        };
        self.error(kind, format!("on {}, {}", self.host, failure.describe()))
    }

    /// The connection failed while the transfer was under way.
    pub(crate) fn broken(&self, error: Error) -> Error {
        let kind = match &error {
            Error::Transfer { .. } => return error,
            Error::Timeout { .. } => std::io::ErrorKind::TimedOut,
            _ => std::io::ErrorKind::ConnectionAborted,
        };
        self.error(kind, error.to_string())
    }

    /// A checksum or size disagreement between the two ends.
    pub(crate) fn corrupt(&self, message: String) -> Error {
        self.error(std::io::ErrorKind::InvalidData, message)
    }
}

/// Reports bytes moved, if a reporter is set.
pub(crate) fn advanced(progress: &Option<SharedProgress>, host: &str, done: u64, total: u64) {
    if let Some(progress) = progress {
        progress.report(&ProgressEvent::Advanced {
            host,
            done,
            total: Some(total),
        });
    }
}

/// The mode a received file gets: the one asked for, else the source's minus the umask.
pub(crate) fn effective_mode(asked: Option<u32>, source_mode: u32, umask: u32) -> u32 {
    asked.unwrap_or(source_mode & 0o777 & !umask)
}
