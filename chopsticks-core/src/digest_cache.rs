//! The SHA-256 of this program, remembered across runs.
//!
//! The shell bootstrap names the agent by the SHA-256 of this program's
//! file. A debug build is 40–70 MB, and unoptimised SHA-256 takes most of a
//! second over that, in every run. The digest is therefore kept in the
//! controller's cache directory (`$XDG_CACHE_HOME/chopsticks`, else
//! `~/.cache/chopsticks` when `HOME` is a directory), one small file per
//! program path, keyed by the file's device, inode, size, modification and
//! change times (`ctime` cannot be set back by anyone). Any difference is a
//! miss and the file is hashed again.
//!
//! The directory must be a real directory owned by this user with no group
//! or other access, and an entry a regular file owned by this user; anything
//! else is not trusted (and not written). Entries are written to a fresh
//! temporary file and renamed into place. A wrong digest could not smuggle
//! anything in anyway: the target hashes what it receives and runs only a
//! file whose hash it checked.

use std::fs::{File, Metadata};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The controller's cache directory, if the environment names one.
pub(crate) fn directory() -> Option<PathBuf> {
    if let Some(cache) = std::env::var_os("XDG_CACHE_HOME").filter(|dir| !dir.is_empty()) {
        let cache = PathBuf::from(cache);
        return cache.is_absolute().then(|| cache.join("chopsticks"));
    }
    let home = PathBuf::from(std::env::var_os("HOME").filter(|home| !home.is_empty())?);
    (home.is_absolute() && home.is_dir()).then(|| home.join(".cache").join("chopsticks"))
}

/// What identifies one version of a file: a change to its content changes
/// at least one of these.
fn key(metadata: &Metadata) -> String {
    format!(
        "v1 {} {} {} {}.{} {}.{}",
        metadata.dev(),
        metadata.ino(),
        metadata.size(),
        metadata.mtime(),
        metadata.mtime_nsec(),
        metadata.ctime(),
        metadata.ctime_nsec()
    )
}

/// The entry for the program at `program` in `cache`.
fn entry(cache: &Path, program: &Path) -> PathBuf {
    let name = blake3::hash(program.as_os_str().as_encoded_bytes()).to_hex();
    cache.join(format!("digest-{}", &name[..32]))
}

/// Whether `cache` is a directory only this user can use.
fn trusted(cache: &Path) -> bool {
    std::fs::symlink_metadata(cache).is_ok_and(|metadata| {
        metadata.is_dir() && metadata.uid() == effective_uid() && metadata.mode() & 0o077 == 0
    })
}

fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The remembered SHA-256 of the file `program` (opened as `file`), or
/// `None` when nothing trustworthy is remembered for this version of it.
pub(crate) fn recall(cache: &Path, program: &Path, file: &File) -> Option<String> {
    let metadata = file.metadata().ok()?;
    if !trusted(cache) {
        return None;
    }
    let entry = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(entry(cache, program))
        .ok()?;
    let entry_metadata = entry.metadata().ok()?;
    if !entry_metadata.is_file() || entry_metadata.uid() != effective_uid() {
        return None;
    }
    let mut text = String::new();
    entry.take(512).read_to_string(&mut text).ok()?;
    let (stored_key, digest) = text.trim_end().rsplit_once(' ')?;
    let valid = digest.len() == 64
        && digest
            .bytes()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte));
    (valid && stored_key == key(&metadata)).then(|| digest.to_string())
}

/// Remembers `digest` as the SHA-256 of this version of `program`
/// (opened as `file`). Failure is silent: the cache only saves time.
pub(crate) fn remember(cache: &Path, program: &Path, file: &File, digest: &str) {
    let Ok(metadata) = file.metadata() else {
        return;
    };
    if !cache.exists() {
        let _ = std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(cache);
    }
    if !trusted(cache) {
        return;
    }
    let target = entry(cache, program);
    let mut name = target.clone().into_os_string();
    name.push(format!(".{}.tmp", std::process::id()));
    let temporary = PathBuf::from(name);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)
        .and_then(|mut out| writeln!(out, "{} {digest}", key(&metadata)))
        .and_then(|()| std::fs::rename(&temporary, &target));
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn scratch(name: &str) -> Dir {
        let dir =
            std::env::temp_dir().join(format!("chopsticks-digest-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch");
        Dir(dir)
    }

    const DIGEST: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn a_remembered_digest_is_recalled_until_the_file_changes() {
        let scratch = scratch("recall");
        let cache = scratch.0.join("cache/chopsticks");
        let program = scratch.0.join("program");
        std::fs::write(&program, b"version one").expect("program");
        let file = File::open(&program).expect("open");
        assert_eq!(recall(&cache, &program, &file), None, "an empty cache");
        remember(&cache, &program, &file, DIGEST);
        let mode = std::fs::metadata(&cache)
            .expect("cache")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        assert_eq!(recall(&cache, &program, &file).as_deref(), Some(DIGEST));
        // Another program's entry is another file.
        let other = scratch.0.join("other");
        std::fs::write(&other, b"version one").expect("other");
        assert_eq!(
            recall(&cache, &other, &File::open(&other).expect("open")),
            None
        );
        // Rewritten in place (same inode, same size): the times differ.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&program, b"version two").expect("rewrite");
        let file = File::open(&program).expect("open");
        assert_eq!(recall(&cache, &program, &file), None, "a changed file");
    }

    #[test]
    fn an_open_cache_directory_or_a_linked_entry_is_not_trusted() {
        let scratch = scratch("trust");
        let cache = scratch.0.join("cache");
        let program = scratch.0.join("program");
        std::fs::write(&program, b"program").expect("program");
        let file = File::open(&program).expect("open");
        remember(&cache, &program, &file, DIGEST);
        assert_eq!(recall(&cache, &program, &file).as_deref(), Some(DIGEST));
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777)).expect("chmod");
        assert_eq!(recall(&cache, &program, &file), None, "a shared directory");
        std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        let entry = entry(&cache, &program);
        let planted = scratch.0.join("planted");
        std::fs::rename(&entry, &planted).expect("move the entry away");
        std::os::unix::fs::symlink(&planted, &entry).expect("link");
        assert_eq!(recall(&cache, &program, &file), None, "a linked entry");
    }

    #[test]
    fn garbage_in_an_entry_is_a_miss() {
        let scratch = scratch("garbage");
        let cache = scratch.0.join("cache");
        let program = scratch.0.join("program");
        std::fs::write(&program, b"program").expect("program");
        let file = File::open(&program).expect("open");
        remember(&cache, &program, &file, DIGEST);
        let entry = entry(&cache, &program);
        let text = std::fs::read_to_string(&entry).expect("entry");
        for garbage in [
            text.replace(DIGEST, "not hex at all"),
            text.replace(DIGEST, &DIGEST.to_uppercase()),
            String::new(),
            "\u{0}".repeat(600),
        ] {
            std::fs::write(&entry, garbage).expect("plant");
            assert_eq!(recall(&cache, &program, &file), None);
        }
    }
}
