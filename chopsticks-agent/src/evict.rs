//! Old agent payloads beside this one: a transport that leaves one
//! directory per build on a target (`Docker::exec` writes
//! `/.chopsticks/<id>/`) names this agent's directory in
//! `CHOPSTICKS_EVICT`, and the agent removes all but the newest others.
//!
//! Only directories whose names look like payload ids (32 lowercase hex
//! digits) are touched, never through a symbolic link, and never the
//! agent's own. A failure (a read-only or foreign-owned directory) leaves
//! things as they were: eviction is housekeeping, not part of serving.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// How many payload directories stay, this agent's included.
pub(crate) const KEEP: usize = 3;

/// The file whose modification time says when a payload was placed.
const MARKER: &str = "complete";

/// Removes the payload directories beside `own` except the `KEEP - 1`
/// most recently placed others.
pub(crate) fn stale_payloads(own: &Path) {
    let (Some(parent), Some(own_name)) = (own.parent(), own.file_name()) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let mut others: Vec<(SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|entry| entry.file_name() != own_name && is_payload_id(&entry.file_name()))
        .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
        .map(|entry| {
            let placed = std::fs::symlink_metadata(entry.path().join(MARKER))
                .and_then(|metadata| metadata.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            (placed, entry.path())
        })
        .collect();
    others.sort_by_key(|(placed, _)| std::cmp::Reverse(*placed));
    for (_, stale) in others.into_iter().skip(KEEP - 1) {
        let _ = std::fs::remove_dir_all(stale);
    }
}

fn is_payload_id(name: &std::ffi::OsStr) -> bool {
    let name = name.as_encoded_bytes();
    name.len() == 32
        && name
            .iter()
            .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(byte))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn payload(root: &Path, name: &str, age_hours: u64) -> PathBuf {
        let dir = root.join(name);
        std::fs::create_dir_all(dir.join("lib")).expect("dir");
        let marker = std::fs::File::create(dir.join(MARKER)).expect("marker");
        marker
            .set_modified(SystemTime::now() - Duration::from_secs(age_hours * 3600))
            .expect("mtime");
        dir
    }

    #[test]
    fn keeps_its_own_and_the_newest_others_and_nothing_else_is_touched() {
        let root = std::env::temp_dir().join(format!("chopsticks-evict-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let own = payload(&root, &"0".repeat(32), 100);
        let newest = payload(&root, &"1".repeat(32), 1);
        let second = payload(&root, &"2".repeat(32), 2);
        let third = payload(&root, &"3".repeat(32), 3);
        let unmarked = root.join("4".repeat(32));
        std::fs::create_dir_all(&unmarked).expect("dir");
        let foreign = payload(&root, "not-a-payload", 50);
        let link = root.join("5".repeat(32));
        std::os::unix::fs::symlink(&foreign, &link).expect("symlink");
        stale_payloads(&own);
        for kept in [&own, &newest, &second, &foreign, &link] {
            assert!(kept.exists(), "{} was removed", kept.display());
        }
        for removed in [&third, &unmarked] {
            assert!(!removed.exists(), "{} was kept", removed.display());
        }
        assert!(foreign.join(MARKER).exists(), "followed a symbolic link");
        let _ = std::fs::remove_dir_all(&root);
    }
}
