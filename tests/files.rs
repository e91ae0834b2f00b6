//! `put` and `fetch` against real agents and real files: round trips, modes,
//! atomic replacement, and every failure leaving the target as it was.

use std::future::IntoFuture;
use std::io::ErrorKind;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chopsticks::progress::ProgressEvent;
use chopsticks::{Direction, Error, Local, Sudo, Tunnel};

use crate::support::{Corrupting, Scratch, entries, is_root, patterned};
use chopsticks_testkit::peak_resident_kib;

fn tunnel() -> Tunnel {
    Tunnel::new(Local::new())
}

fn transfer_error(error: &Error) -> (Direction, ErrorKind, String) {
    match error {
        Error::Transfer {
            direction,
            kind,
            message,
            ..
        } => (*direction, *kind, error.to_string() + " / " + message),
        other => panic!("expected a transfer error, got {other:?}"),
    }
}

#[tokio::test]
async fn put_and_fetch_round_trip_with_checksums() {
    let dir = Scratch::new("round-trip");
    let data = patterned(&dir.path("source"), 5 * 1024 * 1024 + 17);
    let tun = tunnel();
    let sent = tun
        .put(dir.path("source"), dir.path("remote"))
        .await
        .expect("put");
    assert_eq!(sent.size, data.len() as u64);
    assert_eq!(sent.checksum, blake3::hash(&data).to_hex().as_str());
    assert_eq!(sent.remote_path, dir.path("remote"));
    assert_eq!(std::fs::read(dir.path("remote")).expect("read"), data);

    let back = tun
        .fetch(dir.path("remote"), dir.path("back"))
        .await
        .expect("fetch");
    assert_eq!(back.checksum, sent.checksum);
    assert_eq!(std::fs::read(dir.path("back")).expect("read"), data);
    assert_eq!(dir.entries(), ["back", "remote", "source"]);

    // Empty files too.
    std::fs::write(dir.path("empty"), b"").expect("write");
    let empty = tun
        .put(dir.path("empty"), dir.path("empty-remote"))
        .await
        .expect("empty put");
    assert_eq!(empty.size, 0);
    let fetched = tun
        .fetch(dir.path("empty-remote"), dir.path("empty-back"))
        .await
        .expect("empty fetch");
    assert_eq!(fetched.checksum, blake3::hash(b"").to_hex().as_str());
    assert_eq!(
        std::fs::metadata(dir.path("empty-back"))
            .expect("meta")
            .len(),
        0
    );
}

#[tokio::test]
async fn modes_mtimes_and_parent_directories() {
    let dir = Scratch::new("modes");
    patterned(&dir.path("script"), 1000);
    std::fs::set_permissions(dir.path("script"), std::fs::Permissions::from_mode(0o750))
        .expect("chmod");
    let old = std::time::UNIX_EPOCH + Duration::from_secs(1_234_567_890);
    std::fs::File::options()
        .write(true)
        .open(dir.path("script"))
        .and_then(|file| file.set_modified(old))
        .expect("set mtime");
    let tun = tunnel();

    tun.put(dir.path("script"), dir.path("default"))
        .await
        .expect("put");
    let umask = chopsticks_core::__private::files::umask();
    let default = std::fs::metadata(dir.path("default")).expect("meta");
    assert_eq!(default.mode() & 0o777, 0o750 & !umask);
    assert_ne!(default.mtime(), 1_234_567_890);

    tun.put(dir.path("script"), dir.path("a/b/c/explicit"))
        .mode(0o604)
        .create_dirs(true)
        .preserve_mtime(true)
        .await
        .expect("put with options");
    let explicit = std::fs::metadata(dir.path("a/b/c/explicit")).expect("meta");
    assert_eq!(explicit.mode() & 0o777, 0o604);
    assert_eq!(explicit.mtime(), 1_234_567_890);

    tun.fetch(dir.path("a/b/c/explicit"), dir.path("x/y/fetched"))
        .create_dirs(true)
        .preserve_mtime(true)
        .mode(0o600)
        .await
        .expect("fetch with options");
    let fetched = std::fs::metadata(dir.path("x/y/fetched")).expect("meta");
    assert_eq!(fetched.mode() & 0o777, 0o600);
    assert_eq!(fetched.mtime(), 1_234_567_890);
}

#[tokio::test]
async fn a_missing_directory_is_a_clear_error_that_changes_nothing() {
    let dir = Scratch::new("missing-dir");
    patterned(&dir.path("source"), 300_000);
    let tun = tunnel();
    let error = tun
        .put(dir.path("source"), dir.path("nowhere/target"))
        .await
        .expect_err("no directory");
    let (direction, kind, text) = transfer_error(&error);
    assert_eq!(direction, Direction::Put);
    assert_eq!(kind, ErrorKind::NotFound, "{text}");
    assert!(text.contains("local") && text.contains("nowhere"), "{text}");
    assert_eq!(dir.entries(), ["source"]);

    let error = tun
        .fetch(dir.path("source"), dir.path("nowhere/copy"))
        .await
        .expect_err("no local directory");
    assert_eq!(transfer_error(&error).1, ErrorKind::NotFound);
    assert_eq!(dir.entries(), ["source"]);
    // The tunnel is still fine.
    assert_eq!(tun.call(|| 7u8, ()).await.expect("call"), 7);
}

#[tokio::test]
async fn fetching_a_missing_file_creates_nothing() {
    let dir = Scratch::new("fetch-missing");
    std::fs::write(dir.path("existing"), b"keep me").expect("write");
    let tun = tunnel();
    let error = tun
        .fetch(dir.path("absent"), dir.path("existing"))
        .await
        .expect_err("missing remote file");
    let (direction, kind, text) = transfer_error(&error);
    assert_eq!(direction, Direction::Fetch);
    assert_eq!(kind, ErrorKind::NotFound);
    assert!(text.contains("absent") && text.contains("local"), "{text}");
    assert_eq!(dir.entries(), ["existing"]);
    assert_eq!(
        std::fs::read(dir.path("existing")).expect("read"),
        b"keep me"
    );
}

#[tokio::test]
async fn directories_are_refused_clearly() {
    let dir = Scratch::new("dirs");
    std::fs::create_dir(dir.path("folder")).expect("mkdir");
    patterned(&dir.path("file"), 10);
    let tun = tunnel();
    let put_dir = tun
        .put(dir.path("folder"), dir.path("copy"))
        .await
        .expect_err("put a directory");
    assert_eq!(transfer_error(&put_dir).1, ErrorKind::IsADirectory);
    let onto_dir = tun
        .put(dir.path("file"), dir.path("folder"))
        .await
        .expect_err("put onto a directory");
    let (_, kind, text) = transfer_error(&onto_dir);
    assert_eq!(kind, ErrorKind::IsADirectory, "{text}");
    let fetch_dir = tun
        .fetch(dir.path("folder"), dir.path("copy"))
        .await
        .expect_err("fetch a directory");
    assert_eq!(transfer_error(&fetch_dir).1, ErrorKind::IsADirectory);
    assert_eq!(dir.entries(), ["file", "folder"]);
    assert!(entries(&dir.path("folder")).is_empty());
}

#[tokio::test]
async fn an_existing_target_is_replaced_only_when_complete() {
    let dir = Scratch::new("replace");
    std::fs::write(dir.path("target"), b"old version").expect("write");
    let data = patterned(&dir.path("source"), 3 * 1024 * 1024);
    let tun = tunnel();
    // A reader polling the target sees the old file or the whole new one, never a part.
    let target = dir.path("target");
    let watcher = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen_new = false;
        while Instant::now() < deadline && !seen_new {
            let content = std::fs::read(&target).expect("target always exists");
            assert!(
                content == b"old version" || content.len() == 3 * 1024 * 1024,
                "saw a partial file of {} bytes",
                content.len()
            );
            seen_new = content.len() == 3 * 1024 * 1024;
        }
        seen_new
    });
    tun.put(dir.path("source"), dir.path("target"))
        .await
        .expect("put");
    assert!(watcher.await.expect("watcher"));
    assert_eq!(std::fs::read(dir.path("target")).expect("read"), data);
    assert_eq!(dir.entries(), ["source", "target"]);
}

#[tokio::test]
async fn corruption_on_the_way_is_caught_and_nothing_is_replaced() {
    let dir = Scratch::new("corrupt");
    patterned(&dir.path("source"), 1024 * 1024);
    std::fs::write(dir.path("target"), b"intact").expect("write");
    // Flips one byte the controller writes, inside the first chunk of the put.
    let tun = Tunnel::new(Corrupting::stdin_at(4096));
    let error = tun
        .put(dir.path("source"), dir.path("target"))
        .await
        .expect_err("corrupted put");
    let (_, kind, text) = transfer_error(&error);
    assert_eq!(kind, ErrorKind::InvalidData, "{text}");
    assert!(text.contains("checksum mismatch"), "{text}");
    assert_eq!(std::fs::read(dir.path("target")).expect("read"), b"intact");
    assert_eq!(dir.entries(), ["source", "target"]);

    // Flips one byte the agent writes, inside the first chunk of the fetch.
    let tun = Tunnel::new(Corrupting::stdout_at(4096));
    let error = tun
        .fetch(dir.path("source"), dir.path("target"))
        .await
        .expect_err("corrupted fetch");
    let (_, kind, text) = transfer_error(&error);
    assert_eq!(kind, ErrorKind::InvalidData, "{text}");
    assert!(text.contains("checksum mismatch"), "{text}");
    assert_eq!(std::fs::read(dir.path("target")).expect("read"), b"intact");
    assert_eq!(dir.entries(), ["source", "target"]);
}

#[tokio::test]
async fn unsynced_transfers_are_still_verified_and_replace_whole() {
    let dir = Scratch::new("unsynced");
    // Past the early-writeback step, which an unsynced transfer skips.
    let data = patterned(&dir.path("source"), 9 * 1024 * 1024 + 5);
    std::fs::write(dir.path("target"), b"old").expect("write");
    let tun = tunnel();
    let put = tun
        .put(dir.path("source"), dir.path("target"))
        .sync(false)
        .await
        .expect("unsynced put");
    assert_eq!(std::fs::read(dir.path("target")).expect("read"), data);
    let fetched = tun
        .fetch(dir.path("target"), dir.path("back"))
        .sync(false)
        .await
        .expect("unsynced fetch");
    assert_eq!(fetched.checksum, put.checksum);
    assert_eq!(std::fs::read(dir.path("back")).expect("read"), data);
    assert_eq!(dir.entries(), ["back", "source", "target"]);

    // Verification does not depend on syncing.
    let tun = Tunnel::new(Corrupting::stdin_at(4096));
    let error = tun
        .put(dir.path("source"), dir.path("back"))
        .sync(false)
        .await
        .expect_err("corrupted put");
    let (_, kind, text) = transfer_error(&error);
    assert_eq!(kind, ErrorKind::InvalidData, "{text}");
    assert_eq!(std::fs::read(dir.path("back")).expect("read"), data);
    assert_eq!(dir.entries(), ["back", "source", "target"]);
}

#[tokio::test]
async fn a_killed_agent_mid_put_leaves_the_old_target_and_no_temp_file() {
    let dir = Scratch::new("killed");
    patterned(&dir.path("source"), 256 * 1024 * 1024);
    std::fs::write(dir.path("target"), b"previous").expect("write");
    let tun = tunnel();
    tun.connect().await.expect("connect");
    let pid = tun.agent_pid().expect("pid");
    let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let kill_once = killed.clone();
    let killed_at = Arc::new(std::sync::Mutex::new(None::<std::time::Instant>));
    let kill_time = killed_at.clone();
    let error = tun
        .put(dir.path("source"), dir.path("target"))
        .progress(move |event: &ProgressEvent<'_>| {
            if let ProgressEvent::Advanced { done, .. } = event
                && *done > 16 * 1024 * 1024
                && !kill_once.swap(true, Ordering::Relaxed)
            {
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                *kill_time.lock().expect("kill time") = Some(std::time::Instant::now());
            }
        })
        .await
        .expect_err("the agent died");
    if let Some(at) = *killed_at.lock().expect("kill time") {
        crate::support::figure("a killed agent mid-put: error after the kill", at.elapsed());
    }
    let (_, kind, text) = transfer_error(&error);
    assert_eq!(kind, ErrorKind::ConnectionAborted, "{text}");
    assert!(
        text.contains("signal 9") || text.contains("disconnected"),
        "{text}"
    );
    assert_eq!(
        std::fs::read(dir.path("target")).expect("read"),
        b"previous"
    );
    assert_eq!(dir.entries(), ["source", "target"]);
    // The next transfer starts a new agent.
    let again = tun
        .put(dir.path("target"), dir.path("copy"))
        .await
        .expect("reconnect");
    assert_eq!(again.size, 8);
}

#[tokio::test]
async fn a_cancelled_fetch_leaves_nothing_and_the_tunnel_works() {
    let dir = Scratch::new("cancelled");
    patterned(&dir.path("source"), 128 * 1024 * 1024);
    let tun = tunnel();
    tun.connect().await.expect("connect");
    let error = tun
        .fetch(dir.path("source"), dir.path("copy"))
        .timeout(Duration::from_millis(30))
        .await
        .expect_err("timed out");
    assert_eq!(transfer_error(&error).1, ErrorKind::TimedOut);
    let error = tun
        .put(dir.path("source"), dir.path("copy"))
        .timeout(Duration::from_millis(30))
        .await
        .expect_err("timed out");
    assert_eq!(transfer_error(&error).1, ErrorKind::TimedOut);
    assert_eq!(tun.call(|| 5u8, ()).await.expect("call"), 5);
    // The agent has dropped the put's staged data; nothing was ever visible.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(dir.entries(), ["source"]);
}

#[tokio::test]
async fn calls_answer_during_a_large_transfer() {
    let dir = Scratch::new("interleave");
    patterned(&dir.path("source"), 256 * 1024 * 1024);
    let tun = tunnel();
    tun.connect().await.expect("connect");
    let put = tun.put(dir.path("source"), dir.path("copy"));
    let mut transfer = std::pin::pin!(put.into_future());
    // Calls complete while the put is still moving. (How fast is
    // `benches/latency.rs`.)
    let mut calls = 0;
    loop {
        tokio::select! {
            result = &mut transfer => {
                result.expect("put");
                break;
            }
            value = tokio::time::timeout(
                crate::support::EVENT_BOUND,
                tun.call(|x: u32| x + 1, (calls,)),
            ) => {
                assert_eq!(value.expect("a call answered").expect("call"), calls + 1);
                calls += 1;
            }
        }
    }
    assert!(calls >= 10, "only {calls} calls completed during the put");
}

#[tokio::test]
async fn progress_reports_every_byte_in_order() {
    let dir = Scratch::new("progress");
    patterned(&dir.path("source"), 2 * 1024 * 1024 + 5);
    let tun = tunnel();
    let last = Arc::new(AtomicU64::new(0));
    let events = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (seen_last, seen_events) = (last.clone(), events.clone());
    tun.put(dir.path("source"), dir.path("copy"))
        .progress(move |event: &ProgressEvent<'_>| match event {
            ProgressEvent::Advanced { done, total, .. } => {
                assert!(*done > seen_last.swap(*done, Ordering::Relaxed));
                assert_eq!(*total, Some(2 * 1024 * 1024 + 5));
            }
            ProgressEvent::Started { .. } => seen_events.lock().expect("lock").push("started"),
            ProgressEvent::Finished { ok, .. } => {
                assert!(*ok);
                seen_events.lock().expect("lock").push("finished")
            }
            _ => {}
        })
        .await
        .expect("put");
    assert_eq!(last.load(Ordering::Relaxed), 2 * 1024 * 1024 + 5);
    assert_eq!(*events.lock().expect("lock"), ["started", "finished"]);
}

#[tokio::test]
async fn the_agent_moves_large_files_in_constant_memory() {
    let dir = Scratch::new("memory");
    patterned(&dir.path("source"), 256 * 1024 * 1024);
    let tun = tunnel();
    tun.put(dir.path("source"), dir.path("copy"))
        .await
        .expect("put");
    tun.fetch(dir.path("copy"), dir.path("back"))
        .await
        .expect("fetch");
    let peak = tun.call(peak_resident_kib, ()).await.expect("peak");
    assert!(
        peak < 32 * 1024,
        "the agent peaked at {peak} KiB moving 256 MiB each way"
    );
}

/// Sets up a small tmpfs at `dir/small`, or says why it cannot.
fn small_filesystem(dir: &Scratch) -> Option<PathBuf> {
    let mount_point = dir.path("small");
    std::fs::create_dir(&mount_point).expect("mkdir");
    let mounted = if !is_root() {
        Err("the full-disk tests must run as root to mount a tmpfs".to_string())
    } else {
        match std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "chopsticks-full"])
            .arg(&mount_point)
            .output()
        {
            Ok(output) if output.status.success() => Ok(mount_point),
            Ok(output) => Err(String::from_utf8_lossy(&output.stderr).into_owned()),
            Err(error) => Err(error.to_string()),
        }
    };
    chopsticks_testkit::require(mounted, "the full-disk test")
}

#[tokio::test]
async fn a_full_disk_fails_the_transfer_and_keeps_the_old_file() {
    let dir = Scratch::new("full");
    let Some(small) = small_filesystem(&dir) else {
        return;
    };
    patterned(&dir.path("big"), 4 * 1024 * 1024);
    std::fs::write(small.join("target"), b"the old one").expect("write");
    let tun = tunnel();
    let error = tun
        .put(dir.path("big"), small.join("target"))
        .await
        .expect_err("disk full");
    let (_, kind, text) = transfer_error(&error);
    assert_eq!(kind, ErrorKind::StorageFull, "{text}");
    assert!(text.contains("target"), "{text}");
    assert_eq!(
        std::fs::read(small.join("target")).expect("read"),
        b"the old one"
    );
    assert_eq!(entries(&small), ["target"]);

    let error = tun
        .fetch(dir.path("big"), small.join("target"))
        .await
        .expect_err("local disk full");
    let (_, kind, text) = transfer_error(&error);
    assert_eq!(kind, ErrorKind::StorageFull, "{text}");
    assert!(text.contains("this machine"), "{text}");
    assert_eq!(
        std::fs::read(small.join("target")).expect("read"),
        b"the old one"
    );
    assert_eq!(entries(&small), ["target"]);
    assert_eq!(tun.call(|| 1u8, ()).await.expect("still usable"), 1);
}

#[tokio::test]
async fn permission_denied_on_the_host_names_host_and_path() {
    let Some(_) = crate::support::sudo_user() else {
        return;
    };
    let dir = Scratch::new("permission");
    std::fs::set_permissions(dir.dir(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    patterned(&dir.path("source"), 1000);
    std::fs::set_permissions(dir.path("source"), std::fs::Permissions::from_mode(0o644))
        .expect("chmod");
    std::fs::write(dir.path("target"), b"root's").expect("write");
    let tun = Tunnel::builder(Sudo::new(crate::support::USER))
        .stderr(chopsticks::stderr::discard())
        .build();
    let error = tun
        .put(dir.path("source"), dir.path("target"))
        .await
        .expect_err("not writable by the user");
    let (_, kind, text) = transfer_error(&error);
    assert_eq!(kind, ErrorKind::PermissionDenied, "{text}");
    assert!(text.contains("sudo:chopsticks-test"), "{text}");
    assert!(
        text.contains(&dir.path("target").display().to_string()),
        "{text}"
    );
    assert_eq!(std::fs::read(dir.path("target")).expect("read"), b"root's");
    assert_eq!(dir.entries(), ["source", "target"]);
}
