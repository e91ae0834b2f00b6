//! A tree's entries, walked the same way on both ends, and the checks that
//! keep every name inside its root.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum Kind {
    Dir,
    File,
    Symlink,
    /// A socket, FIFO or device: never sent.
    Special,
}

/// One entry of a tree, by its path relative to the root (`/`-separated).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Entry {
    pub(crate) path: String,
    pub(crate) kind: Kind,
    /// Permission bits (and setuid, setgid, sticky).
    pub(crate) mode: u32,
    /// Seconds and nanoseconds since the epoch.
    pub(crate) mtime: (i64, u32),
    pub(crate) size: u64,
    /// A symlink's target, as it is written.
    pub(crate) target: Option<String>,
    /// BLAKE3 of a file's content, in checksum mode.
    pub(crate) hash: Option<[u8; 32]>,
}

/// Which names a walk leaves out, as glob patterns: a pattern with a `/`
/// matches the whole relative path, one without also any single name.
#[derive(Debug, Clone)]
pub(crate) struct Excludes {
    whole: globset::GlobSet,
    names: globset::GlobSet,
}

impl Excludes {
    pub(crate) fn new(patterns: &[String]) -> Result<Excludes, String> {
        let mut whole = globset::GlobSetBuilder::new();
        let mut names = globset::GlobSetBuilder::new();
        for pattern in patterns {
            let glob = globset::GlobBuilder::new(pattern)
                .literal_separator(true)
                .build()
                .map_err(|error| format!("the exclude pattern {pattern:?}: {error}"))?;
            if pattern.contains('/') {
                whole.add(glob);
            } else {
                names.add(glob);
            }
        }
        Ok(Excludes {
            whole: whole.build().map_err(|error| error.to_string())?,
            names: names.build().map_err(|error| error.to_string())?,
        })
    }

    pub(crate) fn excludes(&self, path: &str) -> bool {
        let name = path.rsplit('/').next().unwrap_or(path);
        self.whole.is_match(path) || self.names.is_match(name)
    }
}

/// Checks that `path` is a plain relative path inside a root: no `..`, no
/// absolute part, no empty or `.` component, no NUL.
pub(crate) fn checked_relative(path: &str) -> Result<&str, String> {
    if path.is_empty() || path.contains('\0') || path.starts_with('/') {
        return Err(format!("{path:?} is not a relative name inside the tree"));
    }
    if path
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(format!(
            "{path:?} leaves the tree or is not plain (`..`, `.`, `//`)"
        ));
    }
    Ok(path)
}

/// Whether a symlink at `path` with `target` stays inside the tree.
pub(crate) fn link_stays_inside(path: &str, target: &str) -> bool {
    if target.is_empty() || target.starts_with('/') || target.contains('\0') {
        return false;
    }
    // Depth of the link's directory, then each step of the target.
    let mut depth = path.split('/').count() as i64 - 1;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => depth += 1,
        }
    }
    true
}

/// Whether a link at `path` to `target` steps through a name the tree
/// holds as a symlink (`d/up -> ..` then `esc -> d/up/..`), which the text
/// of the target alone cannot keep inside.
pub(crate) fn link_passes_links(
    path: &str,
    target: &str,
    kinds: &std::collections::HashMap<&str, Kind>,
) -> bool {
    let mut at: Vec<&str> = path.split('/').collect();
    at.pop();
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                at.pop();
            }
            name => {
                at.push(name);
                if kinds.get(at.join("/").as_str()) == Some(&Kind::Symlink) {
                    return true;
                }
            }
        }
    }
    false
}

/// A name for a file staged beside `name`: hidden, and short enough for
/// any filesystem's name limit.
pub(crate) fn staged_name(name: &str, tag: &str) -> String {
    let mut end = name.len().min(200);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    format!(".{}.chopsticks-{tag}", &name[..end])
}

/// Walks the tree at `root` (missing: empty), leaving out `excludes`,
/// without following symlinks; hashes files when `hashes`. A destination's
/// walk (`clean`) also removes files a sync that died had staged.
pub(crate) fn walk(
    root: &Path,
    excludes: &Excludes,
    hashes: bool,
    clean: bool,
) -> Result<Vec<Entry>, String> {
    let mut entries = Vec::new();
    match std::fs::symlink_metadata(root) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(entries),
        Err(error) => return Err(format!("{}: {error}", root.display())),
        Ok(meta) if !meta.is_dir() => {
            return Err(format!("{} is not a directory", root.display()));
        }
        Ok(_) => {}
    }
    let mut pending: Vec<PathBuf> = vec![PathBuf::new()];
    while let Some(relative) = pending.pop() {
        let dir = root.join(&relative);
        let listing =
            std::fs::read_dir(&dir).map_err(|error| format!("{}: {error}", dir.display()))?;
        let mut names = Vec::new();
        for item in listing {
            let item = item.map_err(|error| format!("{}: {error}", dir.display()))?;
            names.push(item.file_name());
        }
        names.sort();
        for name in names {
            let child = relative.join(&name);
            let path = child
                .to_str()
                .ok_or_else(|| {
                    format!(
                        "{} is not UTF-8, which a tree sync cannot carry",
                        child.display()
                    )
                })?
                .to_string();
            if excludes.excludes(&path) {
                continue;
            }
            let full = root.join(&child);
            if let Some(owner) = staged_by(&name.to_string_lossy()) {
                // A file being placed by a sync: left alone while its
                // process runs, removed from a destination once that
                // process is gone (a kill between naming it and renaming it
                // leaves one behind).
                if clean && !process_alive(owner) {
                    let _ = std::fs::remove_file(&full);
                }
                continue;
            }
            let meta = std::fs::symlink_metadata(&full)
                .map_err(|error| format!("{}: {error}", full.display()))?;
            let file_type = meta.file_type();
            let kind = if file_type.is_dir() {
                Kind::Dir
            } else if file_type.is_file() {
                Kind::File
            } else if file_type.is_symlink() {
                Kind::Symlink
            } else {
                Kind::Special
            };
            let target = if kind == Kind::Symlink {
                let target = std::fs::read_link(&full)
                    .map_err(|error| format!("{}: {error}", full.display()))?;
                Some(target.to_str().map(str::to_string).ok_or_else(|| {
                    format!(
                        "the link {} points at a name that is not UTF-8",
                        full.display()
                    )
                })?)
            } else {
                None
            };
            let hash = if hashes && kind == Kind::File {
                Some(hash_file(&full)?)
            } else {
                None
            };
            if kind == Kind::Dir {
                pending.push(child);
            }
            entries.push(Entry {
                path,
                kind,
                mode: meta.permissions().mode() & 0o7777,
                mtime: (meta.mtime(), u32::try_from(meta.mtime_nsec()).unwrap_or(0)),
                size: if kind == Kind::File { meta.len() } else { 0 },
                target,
                hash,
            });
        }
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(entries)
}

/// The process that staged a file named `.NAME.chopsticks-PID-N` or
/// `.NAME.chopsticks-link-PID` (see `apply`), when the name is one.
pub(crate) fn staged_by(name: &str) -> Option<u32> {
    if !name.starts_with('.') {
        return None;
    }
    let (_, suffix) = name.rsplit_once(".chopsticks-")?;
    let pid = match suffix.strip_prefix("link-") {
        Some(pid) => pid,
        None => {
            let (pid, attempt) = suffix.split_once('-')?;
            attempt.parse::<u32>().ok()?;
            pid
        }
    };
    pid.parse().ok()
}

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks that the process exists.
    let status = unsafe { libc::kill(pid, 0) };
    status == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

pub(crate) fn hash_file(path: &Path) -> Result<[u8; 32], String> {
    let mut file =
        std::fs::File::open(path).map_err(|error| format!("{}: {error}", path.display()))?;
    let mut hasher = blake3::Hasher::new();
    std::io::copy(&mut file, &mut hasher)
        .map_err(|error| format!("{}: {error}", path.display()))?;
    Ok(*hasher.finalize().as_bytes())
}

/// `root` joined with a checked relative `path`, refusing any existing
/// ancestor inside the root that is a symlink (a write would follow it out).
pub(crate) fn inside(root: &Path, path: &str) -> Result<PathBuf, String> {
    let path = checked_relative(path)?;
    let relative = Path::new(path);
    let mut at = root.to_path_buf();
    let parts: Vec<Component<'_>> = relative.components().collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        at.push(part);
        if let Ok(meta) = std::fs::symlink_metadata(&at)
            && meta.file_type().is_symlink()
        {
            return Err(format!(
                "{} is a symlink; nothing is written through it",
                at.display()
            ));
        }
    }
    Ok(root.join(relative))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_inside() {
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../../x",
            "a//b",
            "./a",
            "a/.",
            "a\0b",
        ] {
            assert!(checked_relative(bad).is_err(), "{bad:?}");
        }
        assert!(checked_relative("a/b.c/d").is_ok());
    }

    #[test]
    fn links_stay_inside() {
        assert!(link_stays_inside("a/link", "../b"));
        assert!(link_stays_inside("link", "b/c"));
        assert!(!link_stays_inside("link", "../outside"));
        assert!(!link_stays_inside("a/link", "../../outside"));
        assert!(!link_stays_inside("a/link", "/etc/passwd"));
        assert!(!link_stays_inside("a/link", "b/../../../x"));
    }

    #[test]
    fn staged_names_are_known() {
        assert_eq!(staged_by(".f1.chopsticks-123-0"), Some(123));
        assert_eq!(staged_by(".a.b.chopsticks-link-77"), Some(77));
        assert_eq!(staged_by("f1.chopsticks-123-0"), None);
        assert_eq!(staged_by(".f1.chopsticks-x-0"), None);
        assert_eq!(staged_by(".plain"), None);
    }

    #[test]
    fn excludes_match_names_and_paths() {
        let excludes = Excludes::new(&["*.log".into(), "build/**".into()]).expect("globs");
        assert!(excludes.excludes("x.log"));
        assert!(excludes.excludes("deep/dir/x.log"));
        assert!(excludes.excludes("build/out/a.o"));
        assert!(!excludes.excludes("src/build.rs"));
    }
}
