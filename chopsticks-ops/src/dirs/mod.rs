//! Whole directories: [`put_dir`](crate::TunnelOps::put_dir) and
//! [`fetch_dir`](crate::TunnelOps::fetch_dir).
//!
//! Both ends walk their tree (one call for the far one), the controller
//! compares them (size and mtime, or BLAKE3 in checksum mode) and sends only
//! what changed: small files in batches of many per call, several batches
//! in flight while the next are read, large ones through chopsticks' own
//! verified `put` and `fetch`. Every file lands whole (see [`apply`]).

mod apply;
mod tree;

use std::future::{Future, IntoFuture};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;

use chopsticks_core::{Group, GroupResult, Tunnel};
use futures_util::{StreamExt, TryStreamExt};

use self::apply::{Op, Stopped};
use self::tree::{Entry, Kind};

/// Files larger than this go through `put`/`fetch`, one each.
const LARGE: u64 = 1 << 20;
/// A batch of small files holds at most this many bytes…
const BATCH_BYTES: u64 = 4 << 20;
/// …and this many files (each an open descriptor on the far end until
/// its batch is placed).
const BATCH_FILES: usize = 128;
/// Batches in flight at once.
const IN_FLIGHT: usize = 3;

/// What a sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SyncSummary {
    /// Files sent (new or changed).
    pub files_sent: u64,
    /// Files already the same at the destination.
    pub files_unchanged: u64,
    /// Directories created.
    pub dirs_created: u64,
    /// Symlinks made or changed.
    pub links: u64,
    /// Entries removed from the destination (`delete(true)`).
    pub deleted: u64,
    /// Bytes of file content sent.
    pub bytes_sent: u64,
    /// Sockets, FIFOs and devices left out, by name.
    pub skipped: Vec<String>,
}

/// How far a sync is, for [`DirSync::progress`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SyncProgress {
    /// Files sent so far.
    pub files_done: u64,
    /// Files to send.
    pub files_total: u64,
    /// Bytes sent so far.
    pub bytes_done: u64,
    /// Bytes to send.
    pub bytes_total: u64,
}

/// Why a sync stopped. Each names the host; one that stopped midway says
/// which entry failed and carries the summary of what was done (every file
/// is either old or new).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DirError {
    /// The tunnel failed.
    #[error(transparent)]
    Tunnel(#[from] chopsticks_core::Error),
    /// An entry that cannot be sent safely: a name with `..` or an absolute
    /// one, a symlink that points out of the tree, a socket or device (when
    /// [`refuse_special`](DirSync::refuse_special) is set), a bad pattern.
    #[error("{host}: the entry {entry:?} is refused: {reason}")]
    Refused {
        /// The host.
        host: String,
        /// The entry, relative to its tree.
        entry: String,
        /// Why.
        reason: String,
    },
    /// A tree could not be walked (on this machine or the host).
    #[error("{host}: walking {side} tree failed: {message}")]
    Walk {
        /// The host.
        host: String,
        /// "the local" or "the remote".
        side: &'static str,
        /// What failed.
        message: String,
    },
    /// A change failed midway; what was done before it is in place.
    #[error(
        "{host}: the sync stopped at {entry:?}: {message} ({} files sent before it)",
        summary.files_sent
    )]
    Stopped {
        /// The host.
        host: String,
        /// The entry that failed.
        entry: String,
        /// What failed.
        message: String,
        /// What was done.
        summary: Box<SyncSummary>,
        /// The tunnel's error, when the connection failed midway.
        #[source]
        cause: Option<chopsticks_core::Error>,
    },
    /// Several hosts failed.
    #[error("{} hosts failed: {}", failures.len(), failures.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Hosts {
        /// One error per failed host.
        failures: Vec<DirError>,
    },
}

impl chopsticks_core::HostFailures for DirError {
    fn from_failures(failures: Vec<DirError>) -> DirError {
        DirError::Hosts { failures }
    }
}

type ProgressFn = dyn Fn(&SyncProgress) + Send + Sync;

#[derive(Clone, Default)]
struct Options {
    delete: bool,
    excludes: Vec<String>,
    checksum: bool,
    refuse_special: bool,
    no_sync: bool,
    progress: Option<Arc<ProgressFn>>,
}

/// Which way a sync goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    Put,
    Fetch,
}

/// A directory sync being set up; `.await` it. Made by
/// [`TunnelOps::put_dir`](crate::TunnelOps::put_dir) and
/// [`fetch_dir`](crate::TunnelOps::fetch_dir).
#[must_use = "a sync does nothing until awaited"]
pub struct DirSync<'t> {
    tunnel: &'t Tunnel,
    way: Way,
    local: PathBuf,
    remote: String,
    options: Options,
}

/// [`GroupOps::put_dir`](crate::GroupOps::put_dir): one tree to every host.
#[must_use = "a sync does nothing until awaited"]
pub struct GroupDirSync<'g> {
    group: &'g Group,
    local: PathBuf,
    remote: String,
    options: Options,
}

macro_rules! sync_options {
    () => {
        /// Removes from the destination what the source lacks (excluded
        /// names are left alone).
        pub fn delete(mut self, delete: bool) -> Self {
            self.options.delete = delete;
            self
        }

        /// Leaves out names matching `pattern` (a glob: `*.log`,
        /// `target/**`); a pattern without `/` matches a name at any depth.
        pub fn exclude(mut self, pattern: impl Into<String>) -> Self {
            self.options.excludes.push(pattern.into());
            self
        }

        /// Compares files by BLAKE3 as well as size, catching same-size
        /// edits whose mtime did not move (both ends read every file).
        pub fn checksum(mut self, checksum: bool) -> Self {
            self.options.checksum = checksum;
            self
        }

        /// Fails on a socket, FIFO or device instead of skipping it (skipped
        /// ones are listed in the summary).
        pub fn refuse_special(mut self, refuse: bool) -> Self {
            self.options.refuse_special = refuse;
            self
        }

        /// Whether files are flushed to disk before they replace the old
        /// ones (default true: one `syncfs` per batch).
        pub fn sync(mut self, sync: bool) -> Self {
            self.options.no_sync = !sync;
            self
        }

        /// Calls `report` as files and bytes go.
        pub fn progress(mut self, report: impl Fn(&SyncProgress) + Send + Sync + 'static) -> Self {
            self.options.progress = Some(Arc::new(report));
            self
        }
    };
}

impl<'t> DirSync<'t> {
    pub(crate) fn put(tunnel: &'t Tunnel, local: &Path, remote: &str) -> DirSync<'t> {
        DirSync::new(tunnel, Way::Put, local, remote)
    }

    pub(crate) fn fetch(tunnel: &'t Tunnel, remote: &str, local: &Path) -> DirSync<'t> {
        DirSync::new(tunnel, Way::Fetch, local, remote)
    }

    fn new(tunnel: &'t Tunnel, way: Way, local: &Path, remote: &str) -> DirSync<'t> {
        DirSync {
            tunnel,
            way,
            local: local.to_path_buf(),
            remote: remote.to_string(),
            options: Options::default(),
        }
    }

    sync_options!();
}

impl<'g> GroupDirSync<'g> {
    pub(crate) fn new(group: &'g Group, local: &Path, remote: &str) -> GroupDirSync<'g> {
        GroupDirSync {
            group,
            local: local.to_path_buf(),
            remote: remote.to_string(),
            options: Options::default(),
        }
    }

    sync_options!();
}

impl<'t> IntoFuture for DirSync<'t> {
    type Output = Result<SyncSummary, DirError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 't>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let sync = HostSync {
                tunnel: self.tunnel,
                host: self.tunnel.host().to_string(),
                local: self.local,
                remote: self.remote,
                options: self.options,
            };
            match self.way {
                Way::Put => sync.put().await,
                Way::Fetch => sync.fetch().await,
            }
        })
    }
}

impl<'g> IntoFuture for GroupDirSync<'g> {
    type Output = GroupResult<SyncSummary, DirError>;
    type IntoFuture = Pin<Box<dyn Future<Output = Self::Output> + Send + 'g>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            let parallel = self.group.parallelism();
            let runs: Vec<_> = self
                .group
                .tunnels()
                .map(|tunnel| {
                    put_to_host(
                        tunnel,
                        self.local.clone(),
                        self.remote.clone(),
                        self.options.clone(),
                    )
                })
                .collect();
            futures_util::stream::iter(runs)
                .buffer_unordered(parallel)
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect()
        })
    }
}

/// One host's sync in a group, with the host's name.
type HostRun<'t> =
    Pin<Box<dyn Future<Output = (String, Result<SyncSummary, DirError>)> + Send + 't>>;

/// One host of a group's `put_dir`.
fn put_to_host(tunnel: &Tunnel, local: PathBuf, remote: String, options: Options) -> HostRun<'_> {
    Box::pin(async move {
        let sync = HostSync {
            tunnel,
            host: tunnel.host().to_string(),
            local,
            remote,
            options,
        };
        (tunnel.host().to_string(), sync.put().await)
    })
}

/// What changes, from a source tree to a target tree.
#[derive(Default)]
struct Plan {
    dirs: Vec<Entry>,
    /// Existing directories the owner cannot write, opened for the sync.
    opened: Vec<Entry>,
    files: Vec<Entry>,
    /// Files whose content is in place and whose mode or mtime is not.
    file_metas: Vec<Entry>,
    links: Vec<Entry>,
    /// Entries to remove, and whether a directory goes whole.
    deletes: Vec<(String, bool)>,
    metas: Vec<Entry>,
    unchanged: u64,
    skipped: Vec<String>,
}

/// The directories above `path`, nearest last.
fn ancestors(path: &str) -> Vec<&str> {
    path.match_indices('/').map(|(at, _)| &path[..at]).collect()
}

impl Plan {
    /// The summary and the progress before anything is sent.
    fn start(&self) -> (SyncSummary, SyncProgress) {
        let summary = SyncSummary {
            files_unchanged: self.unchanged,
            skipped: self.skipped.clone(),
            ..SyncSummary::default()
        };
        let progress = SyncProgress {
            files_total: self.files.len() as u64,
            bytes_total: self.files.iter().map(|entry| entry.size).sum(),
            ..SyncProgress::default()
        };
        (summary, progress)
    }

    /// The directories to make, parents first (writable by their owner
    /// until their own mode comes last).
    fn dir_ops(&self) -> Vec<Op> {
        self.dirs
            .iter()
            .chain(&self.opened)
            .map(|entry| Op::Dir {
                path: entry.path.clone(),
                mode: entry.mode | 0o700,
            })
            .collect()
    }

    /// What follows the files: links, deletions, then directory modes and
    /// mtimes, deepest first.
    fn closing_ops(&self) -> Vec<Op> {
        let mut ops: Vec<Op> = self.links.iter().map(link_op).collect();
        ops.extend(self.deletes.iter().map(|(path, whole)| Op::Delete {
            path: path.clone(),
            whole: *whole,
        }));
        ops.extend(self.file_metas.iter().map(meta_op));
        ops.extend(self.metas.iter().map(meta_op));
        ops
    }

    fn finish(&self, summary: &mut SyncSummary) {
        summary.links = self.links.len() as u64;
        summary.deleted = self.deletes.len() as u64;
    }

    /// Whether anything changes at the destination.
    fn changes(&self) -> bool {
        !(self.dirs.is_empty()
            && self.files.is_empty()
            && self.links.is_empty()
            && self.deletes.is_empty()
            && self.file_metas.is_empty()
            && self.metas.is_empty())
    }
}

/// Compares `source` with `target`; refuses an unsafe source entry.
///
/// Set-user-ID and set-group-ID bits are not carried: a file from another
/// host never becomes a privileged program here, nor ours one there.
fn plan(source: &[Entry], target: &[Entry], options: &Options) -> Result<Plan, (String, String)> {
    use std::collections::{HashMap, HashSet};
    let mut plan = Plan::default();
    let by_path: HashMap<&str, &Entry> = target
        .iter()
        .map(|entry| (entry.path.as_str(), entry))
        .collect();
    let kinds: HashMap<&str, Kind> = source
        .iter()
        .map(|entry| (entry.path.as_str(), entry.kind))
        .collect();
    let mut wanted = HashSet::new();
    for listed in source {
        let refuse = |why: String| (listed.path.clone(), why);
        tree::checked_relative(&listed.path).map_err(refuse)?;
        // A name under a directory the listing does not hold as one (a
        // hostile far end naming `link/file`) is refused.
        if let Some((parent, _)) = listed.path.rsplit_once('/')
            && kinds.get(parent) != Some(&Kind::Dir)
        {
            return Err(refuse(format!("{parent:?} is not a directory of the tree")));
        }
        let mut entry = listed.clone();
        entry.mode &= !0o6000;
        let there = by_path.get(entry.path.as_str()).copied();
        match entry.kind {
            Kind::Special => {
                if options.refuse_special {
                    return Err(refuse("a socket, FIFO or device cannot be sent".into()));
                }
                plan.skipped.push(entry.path.clone());
                continue;
            }
            Kind::Dir => match there {
                Some(there) if there.kind == Kind::Dir => {
                    if there.mode & 0o700 != 0o700 {
                        // Writable while the sync works in it; its own mode
                        // comes back at the end.
                        plan.opened.push(entry.clone());
                    }
                }
                _ => plan.dirs.push(entry.clone()),
            },
            Kind::File => match there {
                Some(there) if apply::same_file(&entry, there) => {
                    plan.unchanged += 1;
                    if there.mode != entry.mode || there.mtime.0 != entry.mtime.0 {
                        plan.file_metas.push(entry.clone());
                    }
                }
                _ => plan.files.push(entry.clone()),
            },
            Kind::Symlink => {
                let target_text = entry.target.as_deref().unwrap_or_default();
                if !tree::link_stays_inside(&entry.path, target_text) {
                    return Err(refuse(format!(
                        "the symlink points out of the tree (to {target_text:?})"
                    )));
                }
                if tree::link_passes_links(&entry.path, target_text, &kinds) {
                    return Err(refuse(format!(
                        "the symlink's target ({target_text:?}) passes through another symlink"
                    )));
                }
                if there
                    .is_none_or(|there| there.kind != Kind::Symlink || there.target != entry.target)
                {
                    plan.links.push(entry.clone());
                }
            }
        }
        wanted.insert(listed.path.as_str());
    }
    if options.delete {
        // With excludes, a directory goes only once empty: what is excluded
        // in it stays (and so does the directory).
        let whole = options.excludes.is_empty();
        let mut deleted: HashSet<&str> = HashSet::new();
        for entry in target {
            let ancestors = ancestors(&entry.path);
            let under_deleted = whole && ancestors.iter().any(|dir| deleted.contains(dir));
            // Under a name the source has as a file or link: replacing it
            // takes the whole subtree.
            let under_replaced = ancestors
                .iter()
                .any(|dir| kinds.get(dir).is_some_and(|kind| *kind != Kind::Dir));
            if !wanted.contains(entry.path.as_str()) && !under_deleted && !under_replaced {
                plan.deletes.push((entry.path.clone(), whole));
                if entry.kind == Kind::Dir {
                    deleted.insert(&entry.path);
                }
            }
        }
        // Children before their directories.
        plan.deletes.sort_by(|a, b| b.0.cmp(&a.0));
    }
    let changed = !(plan.dirs.is_empty()
        && plan.files.is_empty()
        && plan.links.is_empty()
        && plan.deletes.is_empty());
    if !changed {
        plan.opened.clear();
    }
    for listed in source.iter().filter(|entry| entry.kind == Kind::Dir) {
        let mut entry = listed.clone();
        entry.mode &= !0o6000;
        let there = by_path.get(entry.path.as_str());
        let differs =
            there.is_none_or(|there| there.mode != entry.mode || there.mtime.0 != entry.mtime.0);
        if changed || differs {
            plan.metas.push(entry);
        }
    }
    // Deepest first, so a directory's mtime is set after its children's.
    plan.metas.reverse();
    Ok(plan)
}

/// One host's sync, either way.
struct HostSync<'t> {
    tunnel: &'t Tunnel,
    host: String,
    local: PathBuf,
    remote: String,
    options: Options,
}

impl HostSync<'_> {
    fn refused(&self, (entry, reason): (String, String)) -> DirError {
        DirError::Refused {
            host: self.host.clone(),
            entry,
            reason,
        }
    }

    fn walk_error(&self, side: &'static str, message: String) -> DirError {
        DirError::Walk {
            host: self.host.clone(),
            side,
            message,
        }
    }

    fn stopped(&self, summary: &SyncSummary, stopped: Stopped) -> DirError {
        let message = if stopped.done > 0 {
            format!(
                "{} (the {} changes before it in its batch are in place)",
                stopped.message, stopped.done
            )
        } else {
            stopped.message
        };
        DirError::Stopped {
            host: self.host.clone(),
            entry: stopped.path,
            message,
            summary: Box::new(summary.clone()),
            cause: None,
        }
    }

    /// The connection failed at `entry`, with `summary` done.
    fn cut_off(
        &self,
        summary: &SyncSummary,
        entry: &str,
        error: chopsticks_core::Error,
    ) -> DirError {
        DirError::Stopped {
            host: self.host.clone(),
            entry: entry.to_string(),
            message: "the connection to the host failed".into(),
            summary: Box::new(summary.clone()),
            cause: Some(error),
        }
    }

    async fn walk_local(&self, destination: bool) -> Result<Vec<Entry>, DirError> {
        let (root, excludes, hashes) = (
            self.local.clone(),
            self.options.excludes.clone(),
            self.options.checksum,
        );
        tokio::task::spawn_blocking(move || {
            let excludes = tree::Excludes::new(&excludes)?;
            tree::walk(&root, &excludes, hashes, destination)
        })
        .await
        .map_err(|error| self.walk_error("the local", error.to_string()))?
        .map_err(|message| self.walk_error("the local", message))
    }

    async fn walk_remote(&self, destination: bool) -> Result<Vec<Entry>, DirError> {
        self.tunnel
            .call(
                apply::scan,
                (
                    self.remote.clone(),
                    self.options.checksum,
                    self.options.excludes.clone(),
                    destination,
                ),
            )
            .await?
            .map_err(|message| self.walk_error("the remote", message))
    }

    /// Counts `files` and `bytes` as sent, and reports the progress.
    fn sent(&self, summary: &mut SyncSummary, progress: &mut SyncProgress, files: u64, bytes: u64) {
        summary.files_sent += files;
        summary.bytes_sent += bytes;
        progress.files_done += files;
        progress.bytes_done += bytes;
        if let Some(report) = &self.options.progress {
            report(progress);
        }
    }

    async fn put(self) -> Result<SyncSummary, DirError> {
        let (source, target) =
            futures_util::future::try_join(self.walk_local(false), self.walk_remote(true)).await?;
        let plan =
            plan(&source, &target, &self.options).map_err(|refusal| self.refused(refusal))?;
        let (mut summary, mut progress) = plan.start();
        let sync = !self.options.no_sync;
        // Directories first, parents before children.
        let dirs = plan.dir_ops();
        let count = dirs.len() as u64;
        if plan.changes() {
            // Also makes the root, which a tree of large files alone needs.
            self.tunnel
                .call(
                    apply::apply,
                    (self.remote.clone(), dirs, !self.options.no_sync),
                )
                .await?
                .map_err(|stopped| self.stopped(&summary, stopped))?;
        }
        summary.dirs_created = count;
        // Files: small ones batched, several batches in flight.
        let (large, small): (Vec<&Entry>, Vec<&Entry>) =
            plan.files.iter().partition(|entry| entry.size > LARGE);
        let mut batches = futures_util::stream::iter(batches(&small))
            .map(|batch| self.send_batch(batch))
            .buffer_unordered(IN_FLIGHT);
        while let Some(sent) = batches.next().await {
            let (files, bytes) = match sent {
                Ok(sent) => sent,
                Err(BatchFailure::Stopped(stopped)) => return Err(self.stopped(&summary, stopped)),
                Err(BatchFailure::Tunnel { first, error }) => {
                    return Err(self.cut_off(&summary, &first, error));
                }
            };
            self.sent(&mut summary, &mut progress, files, bytes);
        }
        drop(batches);
        for entry in large {
            self.tunnel
                .put(
                    self.local.join(&entry.path),
                    remote_path(&self.remote, &entry.path),
                )
                .mode(entry.mode)
                .preserve_mtime(true)
                .sync(sync)
                .await
                .map_err(|error| self.cut_off(&summary, &entry.path, error))?;
            self.sent(&mut summary, &mut progress, 1, entry.size);
        }
        let rest = plan.closing_ops();
        self.apply_remote(rest, &summary).await?;
        plan.finish(&mut summary);
        Ok(summary)
    }

    async fn apply_remote(&self, ops: Vec<Op>, summary: &SyncSummary) -> Result<(), DirError> {
        if ops.is_empty() {
            return Ok(());
        }
        let first = ops
            .first()
            .map(|op| op.path().to_string())
            .unwrap_or_default();
        self.tunnel
            .call(
                apply::apply,
                (self.remote.clone(), ops, !self.options.no_sync),
            )
            .await
            .map_err(|error| self.cut_off(summary, &first, error))?
            .map(drop)
            .map_err(|stopped| self.stopped(summary, stopped))
    }

    /// Reads a batch here and applies it there: (files, bytes).
    async fn send_batch(&self, batch: Vec<Entry>) -> Result<(u64, u64), BatchFailure> {
        let root = self.local.clone();
        let first = batch
            .first()
            .map(|entry| entry.path.clone())
            .unwrap_or_default();
        let read = tokio::task::spawn_blocking(move || -> Result<Vec<Op>, Stopped> {
            batch
                .into_iter()
                .enumerate()
                .map(|(done, entry)| {
                    let stopped = |message: String| Stopped {
                        done: done as u64,
                        path: entry.path.clone(),
                        message: format!("reading it here: {message}"),
                    };
                    let full = tree::inside(&root, &entry.path).map_err(stopped)?;
                    let (data, meta) = apply::read_as_seen(&full, entry.size).map_err(stopped)?;
                    Ok(Op::File {
                        hash: *blake3::hash(&data).as_bytes(),
                        mode: std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o1777,
                        mtime: apply::mtime_of(&meta),
                        path: entry.path,
                        data,
                    })
                })
                .collect()
        })
        .await
        .map_err(|error| Stopped {
            done: 0,
            path: String::new(),
            message: error.to_string(),
        })
        .and_then(|read| read)
        .map_err(BatchFailure::Stopped)?;
        let (files, bytes) = (read.len() as u64, read.iter().map(op_len).sum());
        match self
            .tunnel
            .call(
                apply::apply,
                (self.remote.clone(), read, !self.options.no_sync),
            )
            .await
        {
            Ok(Ok(_)) => Ok((files, bytes)),
            Ok(Err(stopped)) => Err(BatchFailure::Stopped(stopped)),
            Err(error) => Err(BatchFailure::Tunnel { first, error }),
        }
    }

    async fn fetch(self) -> Result<SyncSummary, DirError> {
        let (source, target) =
            futures_util::future::try_join(self.walk_remote(false), self.walk_local(true)).await?;
        let plan =
            plan(&source, &target, &self.options).map_err(|refusal| self.refused(refusal))?;
        let (mut summary, mut progress) = plan.start();
        let dirs = plan.dir_ops();
        summary.dirs_created = dirs.len() as u64;
        if plan.changes() {
            self.apply_local_always(dirs, &summary).await?;
        }
        let (large, small): (Vec<&Entry>, Vec<&Entry>) =
            plan.files.iter().partition(|entry| entry.size > LARGE);
        let this = &self;
        let mut batches = futures_util::stream::iter(batches(&small))
            .map(|batch| async move {
                let asked_for: Vec<(String, u64)> = batch
                    .iter()
                    .map(|entry| (entry.path.clone(), entry.size))
                    .collect();
                let first = asked_for[0].0.clone();
                let files = this
                    .tunnel
                    .call(apply::read, (this.remote.clone(), asked_for.clone()))
                    .await
                    .map_err(|error| this.cut_off(&SyncSummary::default(), &first, error))?
                    .map_err(|stopped| this.stopped(&SyncSummary::default(), stopped))?;
                // What was asked for, each once, under the names asked for.
                let mut asked: std::collections::HashSet<&str> =
                    asked_for.iter().map(|(path, _)| path.as_str()).collect();
                if let Some(stray) = files
                    .iter()
                    .find(|op| !matches!(op, Op::File { .. }) || !asked.remove(op.path()))
                {
                    return Err(this.refused((
                        stray.path().to_string(),
                        "the agent sent an entry that was not asked for".into(),
                    )));
                }
                if let Some(missing) = asked.iter().next() {
                    return Err(this.refused((
                        missing.to_string(),
                        "the agent left out an entry that was asked for".into(),
                    )));
                }
                Ok::<_, DirError>(files)
            })
            .buffered(IN_FLIGHT)
            .map_ok(|files| async {
                let (count, bytes) = (files.len() as u64, files.iter().map(op_len).sum::<u64>());
                self.apply_local(files, &summary)
                    .await
                    .map(|()| (count, bytes))
            })
            .try_buffered(1);
        // The batches borrow the summary: what they send is counted apart.
        let mut fetched = SyncSummary::default();
        while let Some(applied) = batches.next().await {
            let (files, bytes) = applied
                .map_err(|error| with_summary(error, (fetched.files_sent, fetched.bytes_sent)))?;
            self.sent(&mut fetched, &mut progress, files, bytes);
        }
        drop(batches);
        summary.files_sent = fetched.files_sent;
        summary.bytes_sent = fetched.bytes_sent;
        for entry in large {
            // Never through a symlink here, whatever the far end listed.
            tree::inside(&self.local, &entry.path)
                .map_err(|why| self.refused((entry.path.clone(), why)))?;
            self.tunnel
                .fetch(
                    remote_path(&self.remote, &entry.path),
                    self.local.join(&entry.path),
                )
                .mode(entry.mode)
                .preserve_mtime(true)
                .await
                .map_err(|error| self.cut_off(&summary, &entry.path, error))?;
            self.sent(&mut summary, &mut progress, 1, entry.size);
        }
        let rest = plan.closing_ops();
        self.apply_local(rest, &summary).await?;
        plan.finish(&mut summary);
        Ok(summary)
    }

    async fn apply_local(&self, ops: Vec<Op>, summary: &SyncSummary) -> Result<(), DirError> {
        if ops.is_empty() {
            return Ok(());
        }
        self.apply_local_always(ops, summary).await
    }

    /// Applies `ops` here, making the root even when there are none.
    async fn apply_local_always(
        &self,
        ops: Vec<Op>,
        summary: &SyncSummary,
    ) -> Result<(), DirError> {
        let root = self.local.display().to_string();
        let sync = !self.options.no_sync;
        tokio::task::spawn_blocking(move || apply::apply(root, ops, sync))
            .await
            .map_err(|error| self.walk_error("the local", error.to_string()))?
            .map(drop)
            .map_err(|stopped| self.stopped(summary, stopped))
    }
}

/// Fills in how much had been done when a fetch stopped.
fn with_summary(error: DirError, (files, bytes): (u64, u64)) -> DirError {
    match error {
        DirError::Stopped {
            host,
            entry,
            message,
            mut summary,
            cause,
        } => {
            summary.files_sent += files;
            summary.bytes_sent += bytes;
            DirError::Stopped {
                host,
                entry,
                message,
                summary,
                cause,
            }
        }
        other => other,
    }
}

/// Why a batch of files was not all sent.
enum BatchFailure {
    /// The far end stopped at an entry.
    Stopped(Stopped),
    /// The connection failed while the batch starting at `first` was under way.
    Tunnel {
        first: String,
        error: chopsticks_core::Error,
    },
}

fn batches(files: &[&Entry]) -> Vec<Vec<Entry>> {
    let mut batches = Vec::new();
    let mut batch: Vec<Entry> = Vec::new();
    let mut bytes = 0;
    for entry in files {
        if !batch.is_empty() && (bytes + entry.size > BATCH_BYTES || batch.len() >= BATCH_FILES) {
            batches.push(std::mem::take(&mut batch));
            bytes = 0;
        }
        bytes += entry.size;
        batch.push((*entry).clone());
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    batches
}

fn op_len(op: &Op) -> u64 {
    match op {
        Op::File { data, .. } => data.len() as u64,
        _ => 0,
    }
}

fn link_op(entry: &Entry) -> Op {
    Op::Link {
        path: entry.path.clone(),
        target: entry.target.clone().unwrap_or_default(),
    }
}

fn meta_op(entry: &Entry) -> Op {
    Op::Meta {
        path: entry.path.clone(),
        mode: entry.mode,
        mtime: entry.mtime,
    }
}

fn remote_path(root: &str, relative: &str) -> String {
    format!("{}/{relative}", root.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: Kind) -> Entry {
        Entry {
            path: path.into(),
            kind,
            mode: 0o644,
            mtime: (1, 0),
            size: 1,
            target: None,
            hash: None,
        }
    }

    #[test]
    fn a_hostile_source_is_refused_by_name() {
        let options = Options::default();
        for bad in ["../x", "/etc/passwd", "a/../../x", ""] {
            let refused = plan(&[entry(bad, Kind::File)], &[], &options)
                .err()
                .expect("refused");
            assert_eq!(refused.0, bad);
        }
        let mut link = entry("a/l", Kind::Symlink);
        link.target = Some("../../x".into());
        assert_eq!(
            plan(&[link], &[], &options).err().expect("refused").0,
            "a/l"
        );
    }

    #[test]
    fn chained_links_and_names_under_links_are_refused() {
        let options = Options::default();
        let mut up = entry("d/up", Kind::Symlink);
        up.target = Some("..".into());
        let mut escape = entry("esc", Kind::Symlink);
        escape.target = Some("d/up/..".into());
        let source = [entry("d", Kind::Dir), up.clone(), escape];
        assert_eq!(
            plan(&source, &[], &options).err().expect("refused").0,
            "esc"
        );
        // A file listed under a link (a hostile far end).
        let source = [entry("d", Kind::Dir), up, entry("d/up/file", Kind::File)];
        assert_eq!(
            plan(&source, &[], &options).err().expect("refused").0,
            "d/up/file"
        );
    }

    #[test]
    fn a_directory_replaced_by_a_file_is_not_emptied_first() {
        let options = Options {
            delete: true,
            ..Options::default()
        };
        let target = [entry("x", Kind::Dir), entry("x/a", Kind::File)];
        let plan = plan(&[entry("x", Kind::File)], &target, &options).expect("plan");
        assert!(plan.deletes.is_empty(), "{:?}", plan.deletes);
        assert_eq!(plan.files.len(), 1);
    }

    #[test]
    fn a_mode_change_alone_moves_and_privilege_bits_never_do() {
        let mut source = entry("f", Kind::File);
        source.mode = 0o4755;
        let plan = plan(&[source], &[entry("f", Kind::File)], &Options::default()).expect("plan");
        assert!(plan.files.is_empty());
        assert_eq!(plan.file_metas.len(), 1);
        assert_eq!(plan.file_metas[0].mode, 0o755);
    }

    #[test]
    fn only_what_changed_moves_and_deletes_take_whole_subtrees() {
        let source = [entry("a", Kind::Dir), entry("a/f", Kind::File)];
        let mut changed = entry("a/g", Kind::File);
        changed.size = 2;
        let target = [
            entry("a", Kind::Dir),
            entry("a/f", Kind::File),
            changed,
            entry("old", Kind::Dir),
            entry("old/x", Kind::File),
        ];
        let options = Options {
            delete: true,
            ..Options::default()
        };
        let plan = plan(&source, &target, &options).expect("plan");
        assert_eq!(plan.unchanged, 1);
        assert!(plan.files.is_empty());
        assert_eq!(
            plan.deletes,
            [("old".to_string(), true), ("a/g".to_string(), true)]
        );
    }
}
