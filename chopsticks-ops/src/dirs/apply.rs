//! Changes to a tree, applied the same way on either end: the agent's for
//! `put_dir`, this machine's for `fetch_dir`. Every file lands whole: it is
//! written beside its place under a fresh name, checked against the hash
//! it was sent with, given its mode and mtime, flushed with the rest of its
//! batch, and renamed over the old one. Set-user-ID and set-group-ID bits
//! are never applied.

use std::fs::{File, FileTimes, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::tree::{self, Entry, Excludes, Kind};

/// One change to a tree.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum Op {
    /// A directory (anything else in its place goes).
    Dir { path: String, mode: u32 },
    /// A whole file.
    File {
        path: String,
        mode: u32,
        mtime: (i64, u32),
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
        hash: [u8; 32],
    },
    /// A symlink.
    Link { path: String, target: String },
    /// Mode and mtime of something already in place.
    Meta {
        path: String,
        mode: u32,
        mtime: (i64, u32),
    },
    /// Removes an entry: a directory with all it holds (`whole`), or only
    /// once it is empty.
    Delete { path: String, whole: bool },
}

impl Op {
    pub(crate) fn path(&self) -> &str {
        match self {
            Op::Dir { path, .. }
            | Op::File { path, .. }
            | Op::Link { path, .. }
            | Op::Meta { path, .. }
            | Op::Delete { path, .. } => path,
        }
    }
}

/// How far a batch got before it failed.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Stopped {
    /// Changes made in full before the failure.
    pub(crate) done: u64,
    /// The entry that failed.
    pub(crate) path: String,
    pub(crate) message: String,
}

/// The agent's end of a scan: `root`'s entries (empty when it is missing);
/// a destination's scan (`clean`) removes what a dead sync staged.
pub(crate) fn scan(
    root: String,
    hashes: bool,
    excludes: Vec<String>,
    clean: bool,
) -> Result<Vec<Entry>, String> {
    let excludes = Excludes::new(&excludes)?;
    tree::walk(Path::new(&root), &excludes, hashes, clean)
}

/// The agent's end of a fetch: the files at `paths` under `root`, whole,
/// each of the size the scan saw.
pub(crate) fn read(root: String, paths: Vec<(String, u64)>) -> Result<Vec<Op>, Stopped> {
    let root = PathBuf::from(root);
    let mut files = Vec::with_capacity(paths.len());
    for (done, (path, size)) in paths.into_iter().enumerate() {
        let stopped = |message: String| Stopped {
            done: done as u64,
            path: path.clone(),
            message,
        };
        let full = tree::inside(&root, &path).map_err(stopped)?;
        let (data, meta) = read_as_seen(&full, size).map_err(stopped)?;
        files.push(Op::File {
            mode: meta.permissions().mode() & 0o1777,
            mtime: mtime_of(&meta),
            hash: *blake3::hash(&data).as_bytes(),
            data,
            path,
        });
    }
    Ok(files)
}

/// A regular file's content and metadata (from the open descriptor),
/// never through a symlink, never more than the `size` the walk saw: a file
/// that changed since is refused rather than read unbounded.
pub(crate) fn read_as_seen(path: &Path, size: u64) -> Result<(Vec<u8>, std::fs::Metadata), String> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|error| error.to_string())?;
    let meta = file.metadata().map_err(|error| error.to_string())?;
    if !meta.is_file() {
        return Err("it is no longer a regular file".into());
    }
    let mut data = Vec::with_capacity(usize::try_from(size.min(meta.len())).unwrap_or(0));
    std::io::Read::read_to_end(&mut std::io::Read::take(&file, size + 1), &mut data)
        .map_err(|error| error.to_string())?;
    if data.len() as u64 != size {
        return Err("it changed while the tree was synced".into());
    }
    Ok((data, meta))
}

pub(crate) fn mtime_of(meta: &std::fs::Metadata) -> (i64, u32) {
    use std::os::unix::fs::MetadataExt;
    (meta.mtime(), u32::try_from(meta.mtime_nsec()).unwrap_or(0))
}

/// Applies `ops` under `root` in order; files are flushed (when `sync`)
/// and renamed into place together at the end of the batch, or at the
/// first change that is not a file.
pub(crate) fn apply(root: String, ops: Vec<Op>, sync: bool) -> Result<u64, Stopped> {
    let root = PathBuf::from(root);
    std::fs::create_dir_all(&root).map_err(|error| Stopped {
        done: 0,
        path: String::new(),
        message: format!("creating {}: {error}", root.display()),
    })?;
    let mut staged: Vec<Staged> = Vec::new();
    let mut done = 0u64;
    for op in ops {
        let path = op.path().to_string();
        let stopped = |done: u64, message: String| Stopped {
            done,
            path: path.clone(),
            message,
        };
        let full = match tree::inside(&root, &path) {
            Ok(full) => full,
            Err(message) => {
                unstage(&staged);
                return Err(stopped(done, message));
            }
        };
        if let Op::File {
            mode,
            mtime,
            data,
            hash,
            ..
        } = &op
        {
            match stage(&full, *mode, *mtime, data, hash) {
                Ok(file) => staged.push(Staged {
                    file,
                    full,
                    path: path.clone(),
                }),
                Err(message) => {
                    unstage(&staged);
                    return Err(stopped(done, message));
                }
            }
            continue;
        }
        done += commit(&root, &mut staged, sync).map_err(|(count, path, message)| Stopped {
            done: done + count,
            path,
            message,
        })?;
        apply_other(&full, op).map_err(|message| stopped(done, message))?;
        done += 1;
    }
    done += commit(&root, &mut staged, sync).map_err(|(count, path, message)| Stopped {
        done: done + count,
        path,
        message,
    })?;
    Ok(done)
}

/// A file written and not yet in place.
struct Staged {
    file: StagedFile,
    full: PathBuf,
    path: String,
}

/// Where a staged file's bytes are: an unnamed `O_TMPFILE` (nothing to
/// clean up, even after a kill), or a hidden name beside its place.
enum StagedFile {
    Unnamed(File),
    Named(PathBuf),
}

/// Writes a file, unnamed where the filesystem allows, else under a fresh
/// hidden name beside `full`.
fn stage(
    full: &Path,
    mode: u32,
    mtime: (i64, u32),
    data: &[u8],
    hash: &[u8; 32],
) -> Result<StagedFile, String> {
    if blake3::hash(data).as_bytes() != hash {
        return Err("its content does not match the hash it was sent with".into());
    }
    let dir = full.parent().ok_or("it has no directory")?;
    let (staged, mut file) = match OpenOptions::new()
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(dir)
    {
        Ok(file) => {
            let handle = file.try_clone().map_err(|e| format!("staging it: {e}"))?;
            (StagedFile::Unnamed(handle), file)
        }
        Err(_) => {
            let (name, file) = hidden_beside(full)?;
            (StagedFile::Named(name), file)
        }
    };
    let written = file
        .write_all(data)
        .and_then(|()| file.set_permissions(std::fs::Permissions::from_mode(mode & !0o6000)))
        .and_then(|()| file.set_times(FileTimes::new().set_modified(system_time(mtime))));
    if let Err(error) = written {
        unstage(std::slice::from_ref(&Staged {
            file: staged,
            full: full.to_path_buf(),
            path: String::new(),
        }));
        return Err(format!("writing it: {error}"));
    }
    Ok(staged)
}

/// A new hidden file beside `full`, created exclusively.
fn hidden_beside(full: &Path) -> Result<(PathBuf, File), String> {
    let (dir, name) = dir_and_name(full)?;
    for attempt in 0..100u32 {
        let candidate = dir.join(tree::staged_name(
            &name,
            &format!("{}-{attempt}", std::process::id()),
        ));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&candidate)
        {
            Ok(file) => return Ok((candidate, file)),
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(error) => return Err(format!("creating a file beside it: {error}")),
        }
    }
    Err("no free name beside it".into())
}

/// Flushes the staged files (one `syncfs`) and puts them in place; on
/// failure, how many were placed, and which failed.
fn commit(root: &Path, staged: &mut Vec<Staged>, sync: bool) -> Result<u64, (u64, String, String)> {
    if staged.is_empty() {
        return Ok(0);
    }
    if sync && let Ok(dir) = File::open(root) {
        // SAFETY: syncfs takes an open descriptor and touches no memory of ours.
        unsafe { libc::syncfs(dir.as_raw_fd()) };
    }
    let batch = std::mem::take(staged);
    for (count, item) in batch.iter().enumerate() {
        if let Err(message) = place(item) {
            unstage(&batch[count..]);
            return Err((count as u64, item.path.clone(), message));
        }
    }
    Ok(batch.len() as u64)
}

/// Renames a staged file over its place (linking an unnamed one first).
fn place(item: &Staged) -> Result<(), String> {
    let named = match &item.file {
        StagedFile::Named(name) => name.clone(),
        StagedFile::Unnamed(file) => link_beside(file, &item.full)?,
    };
    if let Ok(meta) = std::fs::symlink_metadata(&item.full)
        && meta.is_dir()
    {
        let _ = std::fs::remove_dir_all(&item.full);
    }
    std::fs::rename(&named, &item.full).map_err(|error| {
        let _ = std::fs::remove_file(&named);
        format!("renaming it into place: {error}")
    })
}

/// Gives an unnamed file a fresh hidden name beside `full`.
fn link_beside(file: &File, full: &Path) -> Result<PathBuf, String> {
    let (dir, name) = dir_and_name(full)?;
    let source = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(|e| e.to_string())?;
    for attempt in 0..100u32 {
        let candidate = dir.join(tree::staged_name(
            &name,
            &format!("{}-{attempt}", std::process::id()),
        ));
        let target = std::ffi::CString::new(candidate.as_os_str().as_encoded_bytes())
            .map_err(|e| e.to_string())?;
        // SAFETY: both paths are NUL-terminated strings alive for the call.
        let linked = unsafe {
            libc::linkat(
                libc::AT_FDCWD,
                source.as_ptr(),
                libc::AT_FDCWD,
                target.as_ptr(),
                libc::AT_SYMLINK_FOLLOW,
            )
        };
        if linked == 0 {
            return Ok(candidate);
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(format!("naming it: {error}"));
        }
    }
    Err("no free name beside it".into())
}

/// The directory an entry is in, and its name.
fn dir_and_name(full: &Path) -> Result<(&Path, String), String> {
    let dir = full.parent().ok_or("it has no directory")?;
    let name = full.file_name().ok_or("it has no name")?;
    Ok((dir, name.to_string_lossy().into_owned()))
}

fn unstage(staged: &[Staged]) {
    for item in staged {
        if let StagedFile::Named(name) = &item.file {
            let _ = std::fs::remove_file(name);
        }
    }
}

fn apply_other(full: &Path, op: Op) -> Result<(), String> {
    match op {
        Op::Dir { mode, .. } => {
            match std::fs::symlink_metadata(full) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => {
                    std::fs::remove_file(full).map_err(|e| format!("replacing it: {e}"))?;
                    std::fs::create_dir(full).map_err(|e| format!("creating it: {e}"))?;
                }
                Err(_) => std::fs::create_dir(full).map_err(|e| format!("creating it: {e}"))?,
            }
            std::fs::set_permissions(full, std::fs::Permissions::from_mode(mode & !0o6000))
                .map_err(|e| format!("setting its mode: {e}"))
        }
        Op::Link { target, .. } => {
            let (dir, name) = dir_and_name(full)?;
            let temporary = dir.join(tree::staged_name(
                &name,
                &format!("link-{}", std::process::id()),
            ));
            let _ = std::fs::remove_file(&temporary);
            std::os::unix::fs::symlink(&target, &temporary)
                .map_err(|e| format!("creating the link: {e}"))?;
            if let Ok(meta) = std::fs::symlink_metadata(full)
                && meta.is_dir()
            {
                let _ = std::fs::remove_dir_all(full);
            }
            std::fs::rename(&temporary, full).map_err(|e| {
                let _ = std::fs::remove_file(&temporary);
                format!("renaming the link into place: {e}")
            })
        }
        Op::Meta { mode, mtime, .. } => {
            let meta = std::fs::symlink_metadata(full).map_err(|e| e.to_string())?;
            if meta.file_type().is_symlink() {
                return Ok(());
            }
            // The mtime first, never through a link and without opening it
            // (a directory's new mode may forbid that), then the mode.
            set_mtime(full, mtime).map_err(|e| format!("setting its mtime: {e}"))?;
            std::fs::set_permissions(full, std::fs::Permissions::from_mode(mode & !0o6000))
                .map_err(|e| format!("setting its mode: {e}"))
        }
        Op::Delete { whole, .. } => {
            let removed = match std::fs::symlink_metadata(full) {
                Ok(meta) if meta.is_dir() && whole => std::fs::remove_dir_all(full),
                // What is left in it was excluded: it stays, and so does it.
                Ok(meta) if meta.is_dir() => match std::fs::remove_dir(full) {
                    Err(error) if error.kind() == std::io::ErrorKind::DirectoryNotEmpty => Ok(()),
                    other => other,
                },
                Ok(_) => std::fs::remove_file(full),
                Err(error) => Err(error),
            };
            match removed {
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                    ) =>
                {
                    Ok(())
                }
                other => other.map_err(|e| format!("removing it: {e}")),
            }
        }
        Op::File { .. } => Err("a file is staged, never applied alone".into()),
    }
}

/// Sets the mtime of `path` itself (`utimensat` with `AT_SYMLINK_NOFOLLOW`).
fn set_mtime(path: &Path, (seconds, nanos): (i64, u32)) -> std::io::Result<()> {
    let name = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(std::io::Error::other)?;
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: seconds as libc::time_t,
            tv_nsec: i64::from(nanos.min(999_999_999)) as libc::c_long,
        },
    ];
    // SAFETY: a NUL-terminated path and an array of two timespecs, both
    // alive for the call.
    let status = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            name.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if status == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn system_time((seconds, nanos): (i64, u32)) -> SystemTime {
    if seconds >= 0 {
        SystemTime::UNIX_EPOCH + Duration::new(seconds as u64, nanos.min(999_999_999))
    } else {
        SystemTime::UNIX_EPOCH - Duration::from_secs(seconds.unsigned_abs())
    }
}

/// Whether `kind` is in place as `entry` already (by size and mtime, or
/// hash when both have one).
pub(crate) fn same_file(source: &Entry, target: &Entry) -> bool {
    if target.kind != Kind::File || source.size != target.size {
        return false;
    }
    match (&source.hash, &target.hash) {
        (Some(a), Some(b)) => a == b,
        _ => source.mtime.0 == target.mtime.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, data: &[u8]) -> Op {
        Op::File {
            path: path.into(),
            mode: 0o640,
            mtime: (1_000_000_000, 0),
            data: data.to_vec(),
            hash: *blake3::hash(data).as_bytes(),
        }
    }

    #[test]
    fn files_land_whole_with_mode_and_mtime() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().display().to_string();
        let ops = vec![
            Op::Dir {
                path: "a".into(),
                mode: 0o750,
            },
            file("a/f", b"hello"),
        ];
        assert_eq!(apply(root.clone(), ops, true).expect("apply"), 2);
        let meta = std::fs::metadata(dir.path().join("a/f")).expect("meta");
        assert_eq!(
            std::fs::read(dir.path().join("a/f")).expect("read"),
            b"hello"
        );
        assert_eq!(meta.permissions().mode() & 0o777, 0o640);
        assert_eq!(mtime_of(&meta).0, 1_000_000_000);
        assert_eq!(
            std::fs::read_dir(dir.path().join("a"))
                .expect("dir")
                .count(),
            1
        );
    }

    #[test]
    fn hostile_names_and_bad_hashes_are_refused_and_leave_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let root_text = root.display().to_string();
        for bad in ["../escape", "/etc/x", "a/../../x"] {
            let stopped = apply(root_text.clone(), vec![file(bad, b"x")], false).expect_err(bad);
            assert_eq!(stopped.path, bad);
        }
        let mut corrupt = file("f", b"x");
        if let Op::File { data, .. } = &mut corrupt {
            data[0] = b'y';
        }
        let stopped = apply(root_text.clone(), vec![file("ok", b"fine"), corrupt], false)
            .expect_err("corrupt");
        assert_eq!((stopped.done, stopped.path.as_str()), (0, "f"));
        assert!(stopped.message.contains("hash"));
        assert_eq!(
            std::fs::read_dir(&root).expect("root").count(),
            0,
            "nothing staged is left"
        );
        assert!(!dir.path().join("escape").exists());
        // A symlinked directory inside the root is never written through.
        std::os::unix::fs::symlink(dir.path(), root.join("link")).expect("link");
        let stopped =
            apply(root_text, vec![file("link/through", b"x")], false).expect_err("through");
        assert!(stopped.message.contains("symlink"), "{}", stopped.message);
        assert!(!dir.path().join("through").exists());
    }
}
