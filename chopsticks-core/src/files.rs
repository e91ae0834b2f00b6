//! Files that appear whole or not at all: the receiving half of `put` and `fetch`.
//!
//! An [`AtomicFile`] collects the bytes of a transfer beside its target, in a
//! file nobody else can see: an unnamed `O_TMPFILE` where the filesystem
//! supports it, so that not even a killed process leaves anything behind,
//! else an exclusively created hidden file that is removed on drop. Every
//! byte is hashed as it is written. [`AtomicFile::commit`] checks size and
//! BLAKE3 checksum, applies mode and mtime, syncs the data, and only then
//! renames the file over its target, so a reader sees the old file or the
//! whole new one, never a part.
//!
//! ```
//! use chopsticks_core::__private::files::{AtomicFile, Expected, checksum_hex};
//!
//! let dir = std::env::temp_dir().join(format!("chopsticks-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let target = dir.join("greeting.txt");
//! let mut file = AtomicFile::create(&target, false).unwrap();
//! file.write(b"hello").unwrap();
//! let expected = Expected { size: 5, checksum: *blake3::hash(b"hello").as_bytes() };
//! let done = file.commit(&expected, 0o644, None).unwrap();
//! assert_eq!(std::fs::read(&target).unwrap(), b"hello");
//! assert_eq!(checksum_hex(&done.checksum), blake3::hash(b"hello").to_hex().as_str());
//! # std::fs::remove_dir_all(&dir).unwrap();
//! ```

use std::ffi::{CString, OsStr};
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// A BLAKE3 digest.
pub type Checksum = [u8; 32];

/// What the sender says it sent: the receiver's file must match both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expected {
    /// The size in bytes.
    pub size: u64,
    /// The BLAKE3 digest of the content.
    pub checksum: Checksum,
}

/// A modification time, seconds and nanoseconds since the Unix epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileTime {
    /// Whole seconds (negative before 1970).
    pub seconds: i64,
    /// Nanoseconds within the second.
    pub nanos: u32,
}

impl FileTime {
    /// The modification time of `metadata`.
    pub fn modified(metadata: &std::fs::Metadata) -> FileTime {
        use std::os::unix::fs::MetadataExt;
        FileTime {
            seconds: metadata.mtime(),
            nanos: metadata.mtime_nsec().clamp(0, 999_999_999) as u32,
        }
    }
}

/// What a committed file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// Its size in bytes.
    pub size: u64,
    /// The BLAKE3 digest of its content.
    pub checksum: Checksum,
}

/// A file failure with the operation and path it is about, for error messages.
#[derive(Debug)]
pub struct FileError {
    /// What was being done, e.g. "creating a temporary file in".
    pub operation: &'static str,
    /// The path it was done to.
    pub path: PathBuf,
    /// The system's error.
    pub source: io::Error,
}

impl FileError {
    /// A failure of `operation` on `path`.
    pub fn new(operation: &'static str, path: &Path, source: io::Error) -> FileError {
        FileError {
            operation,
            path: path.to_path_buf(),
            source,
        }
    }
}

impl std::fmt::Display for FileError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {}",
            self.operation,
            self.path.display(),
            self.source
        )
    }
}

impl std::error::Error for FileError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

type FileResult<T> = Result<T, FileError>;

/// How the content of an [`AtomicFile`] is held until commit.
#[derive(Debug)]
enum Staging {
    /// An `O_TMPFILE`: no name until it is linked at commit.
    Unnamed,
    /// A hidden file created with `O_EXCL`, removed unless committed.
    Named(PathBuf),
}

/// The receiving end of a transfer: hashed as written, invisible until committed.
#[derive(Debug)]
pub struct AtomicFile {
    file: File,
    target: PathBuf,
    directory: PathBuf,
    staging: Staging,
    hasher: blake3::Hasher,
    written: u64,
    /// Where the last early writeback started; see [`WRITEBACK_STEP`].
    written_back: u64,
    /// Whether the content and the rename reach the disk before commit returns.
    durable: bool,
}

/// Every this many bytes, writeback of the bytes before is started, so the
/// disk works while the transfer goes on and the final sync is short.
const WRITEBACK_STEP: u64 = 8 << 20;

impl AtomicFile {
    /// Starts a file that will replace `target` on commit. With `create_dirs`,
    /// missing parent directories are created first (mode 0777 minus umask).
    pub fn create(target: &Path, create_dirs: bool) -> FileResult<AtomicFile> {
        let name = target
            .file_name()
            .ok_or_else(|| {
                FileError::new(
                    "naming a file at",
                    target,
                    io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"),
                )
            })?
            .to_os_string();
        let directory = match target.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if create_dirs {
            std::fs::create_dir_all(&directory)
                .map_err(|error| FileError::new("creating the directory", &directory, error))?;
        }
        match std::fs::metadata(target) {
            Ok(metadata) if metadata.is_dir() => {
                return Err(FileError::new(
                    "replacing",
                    target,
                    io::Error::new(
                        io::ErrorKind::IsADirectory,
                        "it is a directory; name the file to write instead",
                    ),
                ));
            }
            _ => {}
        }
        let (file, staging) = open_unnamed(&directory)
            .map(|file| (file, Staging::Unnamed))
            .or_else(|_| open_named(&directory, &name))?;
        Ok(AtomicFile {
            file,
            target: target.to_path_buf(),
            directory,
            staging,
            hasher: blake3::Hasher::new(),
            written: 0,
            written_back: 0,
            durable: true,
        })
    }

    /// Whether [`commit`](Self::commit) syncs the file and its directory
    /// (default: yes). Without, the file still appears whole or not at all to
    /// readers, but a crash or power loss soon after may lose it.
    pub fn set_durable(&mut self, durable: bool) {
        self.durable = durable;
    }

    /// Appends `data`, hashing it on the way.
    pub fn write(&mut self, data: &[u8]) -> FileResult<()> {
        self.hasher.update(data);
        self.file
            .write_all(data)
            .map_err(|error| FileError::new("writing a temporary file for", &self.target, error))?;
        self.written += data.len() as u64;
        if self.durable && self.written - self.written_back >= WRITEBACK_STEP {
            // SAFETY: sync_file_range on an open descriptor only starts writeback.
            unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    self.written_back as libc::off64_t,
                    (self.written - self.written_back) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
            self.written_back = self.written;
        }
        Ok(())
    }

    /// Gives the file (still staged) the owner and group asked for, so
    /// that the target never appears with another; a refusal (`EPERM` for
    /// an agent that is not root) fails before any data moves.
    pub fn set_owner(&self, owner: crate::accounts::Ownership) -> FileResult<()> {
        if owner.is_empty() {
            return Ok(());
        }
        let keep = u32::MAX; // chown's -1: leave as it is
        // SAFETY: fchown on an open descriptor has no memory-safety preconditions.
        let changed = unsafe {
            libc::fchown(
                self.file.as_raw_fd(),
                owner.uid.unwrap_or(keep),
                owner.gid.unwrap_or(keep),
            )
        };
        if changed == 0 {
            Ok(())
        } else {
            Err(FileError::new(
                "setting the owner of",
                &self.target,
                io::Error::last_os_error(),
            ))
        }
    }

    /// How many bytes were written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// The path this file replaces on commit.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Checks the content against `expected`, applies `mode` (permission
    /// bits) and `mtime`, syncs, and renames the file over the target.
    pub fn commit(
        mut self,
        expected: &Expected,
        mode: u32,
        mtime: Option<FileTime>,
    ) -> FileResult<Committed> {
        let checksum = *self.hasher.finalize().as_bytes();
        if self.written != expected.size {
            return Err(FileError::new(
                "checking",
                &self.target,
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "received {} bytes but {} were sent",
                        self.written, expected.size
                    ),
                ),
            ));
        }
        if checksum != expected.checksum {
            return Err(FileError::new(
                "checking",
                &self.target,
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "checksum mismatch: the sender's BLAKE3 is {} but the received bytes hash to {}; \
                         the data was corrupted on the way",
                        checksum_hex(&expected.checksum),
                        checksum_hex(&checksum)
                    ),
                ),
            ));
        }
        let target = self.target.clone();
        let target = &target;
        let fail = |operation| move |error| FileError::new(operation, target, error);
        self.file
            .set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))
            .map_err(fail("setting the mode of"))?;
        if let Some(mtime) = mtime {
            set_mtime(&self.file, mtime).map_err(fail("setting the modification time of"))?;
        }
        if self.durable {
            self.file.sync_all().map_err(fail("syncing"))?;
        }
        let staged = match &self.staging {
            Staging::Named(path) => path.clone(),
            Staging::Unnamed => {
                let path = self.link_unnamed()?;
                self.staging = Staging::Named(path.clone());
                path
            }
        };
        std::fs::rename(&staged, &self.target).map_err(fail("renaming a temporary file onto"))?;
        self.staging = Staging::Unnamed;
        // The rename is durable once the directory is synced.
        if self.durable
            && let Ok(directory) = File::open(&self.directory)
        {
            let _ = directory.sync_all();
        }
        Ok(Committed {
            size: self.written,
            checksum,
        })
    }

    /// Gives the unnamed file a hidden name in its directory, for the rename.
    fn link_unnamed(&self) -> FileResult<PathBuf> {
        let source = CString::new(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
            .map_err(|error| FileError::new("naming", &self.target, io::Error::other(error)))?;
        let name = self.target.file_name().unwrap_or(OsStr::new("file"));
        loop {
            let staged = self.directory.join(hidden_name(name));
            let destination = CString::new(staged.as_os_str().as_bytes())
                .map_err(|error| FileError::new("naming", &self.target, io::Error::other(error)))?;
            // SAFETY: both paths are NUL-terminated strings that outlive the call.
            let linked = unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    source.as_ptr(),
                    libc::AT_FDCWD,
                    destination.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            };
            if linked == 0 {
                return Ok(staged);
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::AlreadyExists {
                return Err(FileError::new(
                    "linking a temporary file beside",
                    &self.target,
                    error,
                ));
            }
        }
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if let Staging::Named(path) = &self.staging {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// An unnamed file in `directory`, if the filesystem and `/proc` allow linking it later.
fn open_unnamed(directory: &Path) -> io::Result<File> {
    if !Path::new("/proc/self/fd").is_dir() {
        return Err(io::Error::from(io::ErrorKind::Unsupported));
    }
    OpenOptions::new()
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE | libc::O_CLOEXEC)
        .open(directory)
}

/// A hidden file beside the target, created exclusively (never through a symlink).
fn open_named(directory: &Path, name: &OsStr) -> FileResult<(File, Staging)> {
    loop {
        let path = directory.join(hidden_name(name));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
        {
            Ok(file) => return Ok((file, Staging::Named(path))),
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(error) => {
                return Err(FileError::new(
                    "creating a temporary file in",
                    directory,
                    error,
                ));
            }
        }
    }
}

/// `.NAME.chopsticks-UNIQUE`: hidden, recognisable, and unique to this process.
fn hidden_name(name: &OsStr) -> std::ffi::OsString {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.subsec_nanos())
        .unwrap_or(0);
    let unique = format!(
        ".chopsticks-{}-{}-{nanos:x}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    // Long names are cut so that the hidden name stays within NAME_MAX.
    let name = name.as_bytes();
    let name = &name[..name.len().min(255 - 1 - unique.len())];
    let mut hidden = std::ffi::OsString::from(".");
    hidden.push(OsStr::from_bytes(name));
    hidden.push(unique);
    hidden
}

fn set_mtime(file: &File, mtime: FileTime) -> io::Result<()> {
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: mtime.seconds as libc::time_t,
            tv_nsec: libc::c_long::from(mtime.nanos.min(999_999_999) as i32),
        },
    ];
    // SAFETY: `times` is an array of two timespecs, as futimens requires.
    if unsafe { libc::futimens(file.as_raw_fd(), times.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// This process's file-creation mask, read from `/proc/self/status` (0o022 if unreadable).
pub fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Umask:"))
                .and_then(|value| u32::from_str_radix(value.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

/// A checksum as lowercase hex, as [`Transfer::checksum`](crate::Transfer) reports it.
pub fn checksum_hex(checksum: &Checksum) -> String {
    crate::identity::hex(checksum)
}

/// A regular file being sent: read chunk by chunk and hashed, and checked
/// at the end to be the file it was when it was opened.
///
/// Opening never blocks (a FIFO would block in `open(2)` until a writer
/// came): the file is opened with `O_NONBLOCK`, and anything that is not a
/// regular file is refused before a byte is read. The size announced to the
/// receiver is the size at opening; exactly that many bytes are sent. A
/// file that shrinks, grows or is rewritten while it is read (its size,
/// modification or change time, or inode differ at the end) fails with
/// [`io::ErrorKind::ResourceBusy`], naming the path, and the receiver
/// commits nothing, as rsync warns of a file that "changed as we read it".
#[derive(Debug)]
pub struct Source {
    file: File,
    path: PathBuf,
    metadata: std::fs::Metadata,
    hasher: blake3::Hasher,
    read: u64,
}

impl Source {
    /// Opens `path`, refusing directories and other non-regular files with a clear error.
    pub fn open(path: &Path) -> FileResult<Source> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
            .open(path)
            .map_err(|error| FileError::new("opening", path, error))?;
        let metadata = file
            .metadata()
            .map_err(|error| FileError::new("reading the metadata of", path, error))?;
        if metadata.is_dir() {
            return Err(FileError::new(
                "sending",
                path,
                io::Error::new(
                    io::ErrorKind::IsADirectory,
                    "it is a directory; put and fetch move one regular file",
                ),
            ));
        }
        if !metadata.is_file() {
            return Err(FileError::new(
                "sending",
                path,
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "it is not a regular file (a FIFO, socket or device); put and fetch move one \
                     regular file",
                ),
            ));
        }
        // SAFETY: F_GETFL/F_SETFL on an open descriptor have no memory-safety preconditions.
        unsafe {
            let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
            if flags >= 0 {
                libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
            }
        }
        Ok(Source {
            file,
            path: path.to_path_buf(),
            metadata,
            hasher: blake3::Hasher::new(),
            read: 0,
        })
    }

    /// The file's metadata when it was opened.
    pub fn metadata(&self) -> &std::fs::Metadata {
        &self.metadata
    }

    /// The size announced to the receiver: the file's size when it was opened.
    pub fn len(&self) -> u64 {
        self.metadata.len()
    }

    /// Whether the file was empty when it was opened.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes read so far.
    pub fn read_so_far(&self) -> u64 {
        self.read
    }

    /// Reads up to `max` more bytes into `chunk` (cleared first), hashing
    /// them. Returns false once all [`len`](Self::len) bytes were read and
    /// the file is found unchanged; fails if it ended early or changed.
    pub fn read_chunk(&mut self, chunk: &mut Vec<u8>, max: usize) -> FileResult<bool> {
        use std::io::Read;
        chunk.clear();
        let want = (self.len() - self.read).min(max as u64);
        if want == 0 {
            self.check_unchanged()?;
            return Ok(false);
        }
        let read = (&mut self.file)
            .take(want)
            .read_to_end(chunk)
            .map_err(|error| FileError::new("reading", &self.path, error))?;
        if read == 0 {
            return Err(self.changed(format!(
                "it shrank to {} bytes while it was read ({} expected)",
                self.read,
                self.len()
            )));
        }
        self.hasher.update(chunk);
        self.read += read as u64;
        Ok(true)
    }

    /// The BLAKE3 digest of what was read.
    pub fn checksum(&self) -> Checksum {
        *self.hasher.finalize().as_bytes()
    }

    fn check_unchanged(&self) -> FileResult<()> {
        use std::os::unix::fs::MetadataExt;
        let now = self
            .file
            .metadata()
            .map_err(|error| FileError::new("reading the metadata of", &self.path, error))?;
        let before = &self.metadata;
        let identity = |m: &std::fs::Metadata| {
            (
                m.dev(),
                m.ino(),
                m.size(),
                (m.mtime(), m.mtime_nsec()),
                (m.ctime(), m.ctime_nsec()),
            )
        };
        if identity(before) == identity(&now) {
            return Ok(());
        }
        let what = if before.size() != now.size() {
            format!(
                "its size went from {} to {} bytes while it was read",
                before.size(),
                now.size()
            )
        } else {
            "it was modified while it was read".to_string()
        };
        Err(self.changed(what))
    }

    fn changed(&self, what: String) -> FileError {
        FileError::new(
            "sending",
            &self.path,
            io::Error::new(
                io::ErrorKind::ResourceBusy,
                format!(
                    "{what}, so what was read is neither its old content nor its new; nothing was committed"
                ),
            ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(directory: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(directory)
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

    /// A scratch directory, removed when dropped, also when a test panics.
    struct Scratch(PathBuf);

    impl std::ops::Deref for Scratch {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(name: &str) -> Scratch {
        let directory =
            std::env::temp_dir().join(format!("chopsticks-files-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&directory);
        std::fs::create_dir_all(&directory).expect("mkdir");
        Scratch(directory)
    }

    #[test]
    fn uncommitted_files_leave_nothing_and_keep_the_old_target() {
        let directory = scratch("drop");
        let target = directory.join("data");
        std::fs::write(&target, b"old").expect("write");
        let mut file = AtomicFile::create(&target, false).expect("create");
        file.write(b"new content").expect("write");
        drop(file);
        assert_eq!(entries(&directory), vec!["data".to_string()]);
        assert_eq!(std::fs::read(&target).expect("read"), b"old");
    }

    #[test]
    fn checksum_mismatch_is_refused() {
        let directory = scratch("mismatch");
        let target = directory.join("data");
        let mut file = AtomicFile::create(&target, false).expect("create");
        file.write(b"abc").expect("write");
        let expected = Expected {
            size: 3,
            checksum: *blake3::hash(b"abd").as_bytes(),
        };
        let error = file.commit(&expected, 0o644, None).expect_err("mismatch");
        assert_eq!(error.source.kind(), io::ErrorKind::InvalidData);
        assert!(error.to_string().contains("checksum mismatch"), "{error}");
        assert!(entries(&directory).is_empty());
    }

    #[test]
    fn named_staging_is_hidden_and_removed() {
        let directory = scratch("named");
        let (file, staging) = open_named(&directory, OsStr::new("x")).expect("named");
        drop(file);
        let Staging::Named(path) = staging else {
            panic!("named staging has a path")
        };
        let name = path
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned();
        assert!(name.starts_with(".x.chopsticks-"), "{name}");
    }

    #[test]
    fn mode_and_mtime_are_applied() {
        use std::os::unix::fs::MetadataExt;
        let directory = scratch("mode");
        let target = directory.join("data");
        let mut file = AtomicFile::create(&target, false).expect("create");
        file.write(b"x").expect("write");
        let expected = Expected {
            size: 1,
            checksum: *blake3::hash(b"x").as_bytes(),
        };
        let mtime = FileTime {
            seconds: 1_000_000_000,
            nanos: 5,
        };
        file.commit(&expected, 0o640, Some(mtime)).expect("commit");
        let metadata = std::fs::metadata(&target).expect("metadata");
        assert_eq!(metadata.mode() & 0o7777, 0o640);
        assert_eq!(FileTime::modified(&metadata), mtime);
    }
}
