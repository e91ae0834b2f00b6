//! The operator kit (`chopsticks::ops`): commands and facts against real
//! agents, locally, over the test kit's sshd and in a `FROM scratch`
//! container.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chopsticks::ops::{Cmd, CmdError, GroupOps, OutputKind, TunnelOps};
use chopsticks::{Group, Local, Tunnel};

use crate::support::capture_stderr;

fn local(name: &str) -> Tunnel {
    Tunnel::builder(Local::named(name))
        .stderr(chopsticks::stderr::discard())
        .build()
}

/// Processes whose argv holds `word`.
fn processes_with(word: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let argv = std::fs::read(entry.path().join("cmdline")).ok()?;
            let text = String::from_utf8_lossy(&argv).replace('\0', " ");
            text.contains(word).then_some(pid)
        })
        .filter(|pid| *pid != std::process::id())
        .collect()
}

async fn until_none_with(word: &str, bound: Duration) -> Vec<u32> {
    let started = Instant::now();
    loop {
        let left = processes_with(word);
        if left.is_empty() || started.elapsed() > bound {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Exit codes, signals, `check`, and the bad-input errors, on `tun`.
async fn statuses_and_refusals(tun: &Tunnel) {
    let host = tun.host().to_string();
    let ok = tun.run(Cmd::new("true")).await.expect("true");
    assert!(ok.status.success());
    let seven = tun
        .run(Cmd::shell("echo out; echo err >&2; exit 7"))
        .await
        .expect("exit 7");
    assert_eq!(
        (seven.status.code(), seven.status.signal()),
        (Some(7), None)
    );
    assert_eq!(
        (seven.stdout_text(), seven.stderr_text()),
        ("out\n".into(), "err\n".into())
    );
    let killed = tun.run(Cmd::shell("kill -TERM $$")).await.expect("killed");
    assert_eq!(
        (killed.status.code(), killed.status.signal()),
        (None, Some(15))
    );
    assert!(!killed.status.success());

    let error = tun
        .run(Cmd::shell("echo 'disk full' >&2; exit 4").check())
        .await
        .expect_err("checked");
    let text = error.to_string();
    assert!(matches!(error, CmdError::Failed { .. }), "{error:?}");
    for part in [host.as_str(), "exit 4", "exit status 4", "disk full"] {
        assert!(text.contains(part), "{part:?} missing from {text}");
    }

    let error = tun
        .run(Cmd::new("chopsticks-no-such-program"))
        .await
        .expect_err("missing");
    assert!(
        matches!(&error, CmdError::NotFound { program, .. } if program == "chopsticks-no-such-program"),
        "{error:?}"
    );
    assert_eq!(error.host(), host);
    let error = tun
        .run(Cmd::new("true").current_dir("/chopsticks/no/such/dir"))
        .await
        .expect_err("bad dir");
    assert!(
        matches!(&error, CmdError::BadDirectory { dir, .. } if dir == "/chopsticks/no/such/dir"),
        "{error:?}"
    );
    let error = tun
        .run(Cmd::new("true").stdin(vec![b'x'; 1 << 20]))
        .await
        .expect_err("stdin never read");
    assert!(
        matches!(&error, CmdError::StdinNotRead { unread, .. } if *unread > 0),
        "{error:?}"
    );
    assert!(error.to_string().contains("stdin"), "{error}");
}

/// Lines as they come, in order across both outputs, and the echo.
async fn live_lines(tun: &Tunnel, lines: &Arc<Mutex<Vec<String>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let into = seen.clone();
    let output = tun
        .run(
            Cmd::shell(
                "for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 0.05; done; printf tail",
            )
            .echo(true)
            .on_line(move |line| {
                into.lock().expect("lock").push((
                    line.host.to_string(),
                    line.kind,
                    line.text_lossy().into_owned(),
                    line.complete,
                ));
            }),
        )
        .await
        .expect("run");
    let host = tun.host().to_string();
    let expected: Vec<(String, OutputKind, String, bool)> = [
        (OutputKind::Stdout, "out1", true),
        (OutputKind::Stderr, "err1", true),
        (OutputKind::Stdout, "out2", true),
        (OutputKind::Stderr, "err2", true),
        (OutputKind::Stdout, "out3", true),
        (OutputKind::Stderr, "err3", true),
        (OutputKind::Stdout, "tail", false),
    ]
    .into_iter()
    .map(|(kind, text, complete)| (host.clone(), kind, text.to_string(), complete))
    .collect();
    assert_eq!(*seen.lock().expect("lock"), expected);
    assert_eq!(output.stdout_text(), "out1\nout2\nout3\ntail");
    let echoed = lines.lock().expect("lock").clone();
    assert!(
        echoed.contains(&format!("[{host}] out: out2")),
        "{echoed:?}"
    );
    assert!(
        echoed.contains(&format!("[{host}] err: err3")),
        "{echoed:?}"
    );
}

/// A timeout kills the whole tree, and a dropped run kills its command.
async fn timeouts_and_drops(tun: &Tunnel, marker: &str) {
    let started = Instant::now();
    let error = tun
        .run(
            Cmd::shell(format!("echo started; sleep {marker} & sleep {marker}"))
                .timeout(Duration::from_millis(800)),
        )
        .await
        .expect_err("timed out");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    match &error {
        CmdError::TimedOut { output, after, .. } => {
            assert_eq!(*after, Duration::from_millis(800));
            assert_eq!(output.stdout_text(), "started\n");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        error.to_string().contains("process group was killed"),
        "{error}"
    );
    assert_eq!(
        until_none_with(marker, Duration::from_secs(3)).await,
        Vec::<u32>::new()
    );

    let run = tun.run(Cmd::new("sleep").arg(marker));
    assert!(
        tokio::time::timeout(Duration::from_millis(500), run)
            .await
            .is_err()
    );
    assert_eq!(
        until_none_with(marker, Duration::from_secs(3)).await,
        Vec::<u32>::new()
    );
}

#[tokio::test]
async fn commands_locally() {
    let (sink, lines) = capture_stderr();
    let tun = Tunnel::builder(Local::named("ops-local"))
        .stderr(sink)
        .build();
    statuses_and_refusals(&tun).await;
    live_lines(&tun, &lines).await;
    timeouts_and_drops(&tun, "100.4711").await;
}

#[tokio::test]
async fn a_dropped_quiet_flood_is_stopped_and_a_background_holder_does_not_hold_the_run() {
    let tun = local("ops-flood-drop");
    // Quiet: nothing crosses while it prints, yet the drop is seen.
    let run = tun.run(Cmd::new("yes").arg("100.4713"));
    assert!(
        tokio::time::timeout(Duration::from_millis(500), run)
            .await
            .is_err()
    );
    assert_eq!(
        until_none_with("100.4713", Duration::from_secs(3)).await,
        Vec::<u32>::new()
    );

    // A process left behind with the pipes: the run ends soon after the command.
    let started = Instant::now();
    let output = tun
        .run(Cmd::shell("sleep 100.4714 & echo started"))
        .await
        .expect("run");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(output.stdout_text(), "started\n");
    for pid in processes_with("100.4714") {
        // SAFETY: kill has no memory-safety preconditions.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

#[tokio::test]
async fn hostile_words_stay_words() {
    let tun = local("ops-words");
    let dir = tempfile::tempdir().expect("tempdir");
    let touched = dir.path().join("touched");
    let words = [
        format!("$(touch {})", touched.display()),
        ";".to_string(),
        "'\"".to_string(),
        format!("`touch {}`", touched.display()),
        "a b".to_string(),
    ];
    let output = tun
        .run(Cmd::new("printf").arg("%s|").args(words.clone()))
        .await
        .expect("printf");
    assert_eq!(output.stdout_text(), format!("{}|", words.join("|")));
    assert!(!touched.exists());
}

#[tokio::test]
async fn stdin_from_bytes_and_from_a_stream() {
    let tun = local("ops-stdin");
    let output = tun.run(Cmd::new("cat").stdin("hello")).await.expect("cat");
    assert_eq!(output.stdout, b"hello");
    let pieces =
        futures_util::stream::iter((0..1000).map(|_| bytes::Bytes::from(vec![b'z'; 1024])));
    let output = tun
        .run(Cmd::new("wc").arg("-c").stdin_stream(pieces))
        .await
        .expect("wc");
    assert_eq!(output.stdout_text().trim(), "1024000");
}

#[tokio::test]
async fn a_hundred_megabytes_of_output_keeps_head_and_tail_in_bounded_memory() {
    let tun = local("ops-flood");
    tun.connect().await.expect("connect");
    let agent = tun.agent_pid().expect("pid");
    let script = "printf HEAD; head -c 100000000 /dev/zero | tr '\\0' x; printf TAIL";
    let (output, largest) = crate::support::largest_allocation(async {
        tun.run(Cmd::shell(script).capture_limit(1 << 20)).await
    })
    .await;
    let output = output.expect("quiet");
    assert!(output.stdout.starts_with(b"HEADxxx"));
    assert!(output.stdout.ends_with(b"xxxTAIL"));
    assert_eq!(output.dropped(OutputKind::Stdout), 100_000_008 - (1 << 20));
    assert!(
        output.stdout.len() < (1 << 20) + 200,
        "{}",
        output.stdout.len()
    );
    assert!(
        largest < 8 << 20,
        "the controller allocated {largest} bytes at once"
    );

    // Live: every piece crosses, in lines of at most 64 KiB, and the
    // capture stays bounded on the controller.
    let pieces = Arc::new(Mutex::new((0u64, 0usize)));
    let count = pieces.clone();
    let (output, largest) = crate::support::largest_allocation(async {
        tun.run(
            Cmd::shell(script)
                .capture_limit(1 << 20)
                .on_line(move |line| {
                    let mut count = count.lock().expect("lock");
                    count.0 += line.text.len() as u64;
                    count.1 = count.1.max(line.text.len());
                }),
        )
        .await
    })
    .await;
    let output = output.expect("live");
    assert!(output.stdout.ends_with(b"xxxTAIL"));
    let (total, longest) = *pieces.lock().expect("lock");
    assert_eq!(total, 100_000_008);
    assert_eq!(longest, chopsticks::ops::DEFAULT_MAX_LINE);
    assert!(
        largest < 8 << 20,
        "the controller allocated {largest} bytes at once"
    );
    let peak = std::fs::read_to_string(format!("/proc/{agent}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|value| {
            value
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .expect("VmHWM");
    assert!(peak < 64 * 1024, "the agent's peak RSS was {peak} KiB");
}

#[tokio::test]
async fn a_command_as_another_user() {
    if !crate::support::is_root() {
        assert!(!chopsticks_testkit::in_ci(), "the user switch needs root");
        eprintln!("SKIPPED ops::a_command_as_another_user: not root");
        return;
    }
    let tun = local("ops-user");
    let output = tun
        .run(Cmd::shell("id -un; echo $HOME").user("nobody"))
        .await
        .expect("as nobody");
    assert_eq!(output.stdout_text(), "nobody\n/nonexistent\n");
    let error = tun
        .run(Cmd::new("true").user("chopsticks-no-such-user"))
        .await
        .expect_err("no such user");
    assert!(matches!(error, CmdError::NoSuchUser { .. }), "{error:?}");
}

#[tokio::test]
async fn commands_run_as_root_through_become() {
    let Some(()) = chopsticks_testkit::require(
        chopsticks_testkit::sudoers::prepare(),
        "ops::commands_run_as_root_through_become",
    ) else {
        return;
    };
    let as_operator = chopsticks::Become::sudo(Local::named("ops-become"))
        .user(chopsticks_testkit::sudoers::OPERATOR);
    let tun = Tunnel::builder(chopsticks::Become::sudo(as_operator))
        .stderr(chopsticks::stderr::discard())
        .build();
    let output = tun
        .run(Cmd::new("id").arg("-u").check())
        .await
        .expect("id as root");
    assert_eq!(output.stdout_text(), "0\n");
}

#[tokio::test]
async fn a_group_runs_everywhere_with_lines_tagged_by_host() {
    let tunnels = (0..3).map(|i| local(&format!("ops-group-{i}")));
    let group = Group::new(tunnels).expect("group");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let into = seen.clone();
    let results = group
        .run(Cmd::shell("echo one; echo two").on_line(move |line| {
            into.lock()
                .expect("lock")
                .push(format!("{} {}", line.host, line.text_lossy()));
        }))
        .await
        .into_result()
        .expect("every host");
    assert_eq!(results.len(), 3);
    for output in results.values() {
        assert_eq!(output.stdout_text(), "one\ntwo\n");
    }
    let mut seen = seen.lock().expect("lock").clone();
    seen.sort();
    assert_eq!(seen.len(), 6);
    assert_eq!(seen[0], "ops-group-0 one");
    let failures = group.run(Cmd::new("false").check()).await;
    assert_eq!(failures.failures().count(), 3);
    let streamed = group
        .run(Cmd::new("cat").stdin_stream(futures_util::stream::empty()))
        .await;
    assert!(failures_are_all(&streamed, |error| matches!(
        error,
        CmdError::StreamForGroup
    )));
}

fn failures_are_all(
    results: &chopsticks::GroupResult<chopsticks::ops::Output, CmdError>,
    check: impl Fn(&CmdError) -> bool,
) -> bool {
    results.failures().count() == results.len() && results.failures().all(|(_, error)| check(error))
}

#[tokio::test]
async fn facts_of_this_machine() {
    let tun = local("ops-facts");
    let facts = tun.facts().await.expect("facts");
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    assert_eq!(facts.hostname.as_deref(), Some(hostname.trim()));
    assert_eq!(facts.architecture.as_deref(), Some(std::env::consts::ARCH));
    assert!(facts.kernel_release.is_some() && facts.boot_id.is_some());
    assert!(facts.cpu_count.is_some_and(|count| count >= 1));
    assert!(facts.memory_total.is_some_and(|total| total > 0));
    assert!(facts.uptime.is_some());
    assert_eq!(facts.libc_family.as_deref(), Some("glibc"));
    assert!(facts.libc_version.is_some(), "{facts:?}");
    assert!(
        facts.os_id.is_some() && facts.init_system.is_some(),
        "{facts:?}"
    );
    let lo = facts
        .interfaces
        .iter()
        .find(|i| i.name == "lo")
        .expect("lo");
    assert!(
        lo.addresses
            .contains(&("127.0.0.1".parse().expect("ip"), 8)),
        "{lo:?}"
    );
    let group = Group::new([local("facts-a"), local("facts-b")]).expect("group");
    let all = group.facts().await.into_result().expect("group facts");
    assert_eq!(all.len(), 2);
}

#[cfg(feature = "ssh")]
#[tokio::test]
async fn commands_and_facts_over_ssh() {
    let Some(sshd) = chopsticks_testkit::sshd_or_skip("ops", 1) else {
        return;
    };
    let (sink, lines) = capture_stderr();
    let tun =
        Tunnel::builder(chopsticks::Ssh::new(sshd.alias(0)).config_file(sshd.client_config()))
            .stderr(sink)
            .build();
    statuses_and_refusals(&tun).await;
    live_lines(&tun, &lines).await;
    timeouts_and_drops(&tun, "100.4712").await;
    let facts = tun.facts().await.expect("facts");
    assert!(facts.hostname.is_some() && facts.kernel_release.is_some());
}

#[cfg(feature = "docker")]
#[tokio::test]
async fn facts_in_a_scratch_container() {
    use chopsticks_testkit::docker;
    let Some(()) = docker::docker_or_skip() else {
        return;
    };
    let tun = Tunnel::builder(
        chopsticks::Docker::new("chopsticks-ops-facts").image(docker::SCRATCH_IMAGE),
    )
    .stderr(chopsticks::stderr::discard())
    .build();
    let facts = tun.facts().await.expect("facts in scratch");
    assert_eq!(facts.os_id, None);
    assert_eq!(facts.libc_family, None);
    assert_eq!(facts.machine_id, None);
    assert_eq!(facts.container.as_deref(), Some("docker"));
    assert!(facts.kernel_release.is_some());
    tun.close().await.expect("close");
}

/// `put_dir` and `fetch_dir`.
mod dirs {
    use super::*;
    use chopsticks::ops::{DirError, SyncSummary};
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::Path;

    /// A tree: `files` small files over nested directories, modes, and
    /// symlinks (relative, inside the tree).
    fn make_tree(root: &Path, files: usize) {
        for index in 0..files {
            let dir = root.join(format!("d{}/e{}", index % 10, index % 7));
            std::fs::create_dir_all(&dir).expect("dir");
            let path = dir.join(format!("f{index}"));
            std::fs::write(&path, format!("file {index}\n").repeat(index % 5 + 1)).expect("write");
            let mode = if index % 3 == 0 { 0o600 } else { 0o644 };
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("mode");
        }
        std::fs::set_permissions(root.join("d1"), std::fs::Permissions::from_mode(0o750))
            .expect("dir mode");
        std::os::unix::fs::symlink("d1/e1/f1", root.join("to-f1")).expect("link");
        std::os::unix::fs::symlink("../d2", root.join("d1/to-d2")).expect("link");
    }

    /// Every entry under `root`: path, kind, mode, mtime (s), content or target.
    fn describe(root: &Path) -> Vec<(String, String)> {
        let mut found = Vec::new();
        let mut pending = vec![root.to_path_buf()];
        while let Some(dir) = pending.pop() {
            for entry in std::fs::read_dir(&dir).expect("read_dir").flatten() {
                let path = entry.path();
                let meta = std::fs::symlink_metadata(&path).expect("meta");
                let name = path
                    .strip_prefix(root)
                    .expect("inside")
                    .display()
                    .to_string();
                let what = if meta.file_type().is_symlink() {
                    format!(
                        "link {}",
                        std::fs::read_link(&path).expect("link").display()
                    )
                } else if meta.is_dir() {
                    pending.push(path.clone());
                    format!("dir {:o}", meta.mode() & 0o7777)
                } else {
                    format!(
                        "file {:o} {} {}",
                        meta.mode() & 0o7777,
                        meta.mtime(),
                        blake3::hash(&std::fs::read(&path).expect("read")).to_hex()
                    )
                };
                found.push((name, what));
            }
        }
        found.sort();
        found
    }

    fn remote_root(dir: &Path) -> String {
        dir.join("remote").display().to_string()
    }

    #[tokio::test]
    async fn ten_thousand_files_sync_then_nothing_then_one_byte_then_deletes() {
        let tun = local("dirs-local");
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("source");
        make_tree(&source, 10_000);
        let remote = remote_root(dir.path());
        let progress = Arc::new(Mutex::new(Vec::new()));
        let seen = progress.clone();
        let first = tun
            .put_dir(&source, &remote)
            .progress(move |step| seen.lock().expect("lock").push(step.files_done))
            .await
            .expect("first sync");
        assert_eq!(first.files_sent, 10_000);
        assert_eq!(first.links, 2);
        assert!(first.bytes_sent > 0);
        assert_eq!(describe(&source), describe(Path::new(&remote)));
        assert_eq!(progress.lock().expect("lock").last(), Some(&10_000));

        let again = tun.put_dir(&source, &remote).await.expect("second sync");
        assert_eq!(
            (again.files_sent, again.bytes_sent, again.files_unchanged),
            (0, 0, 10_000)
        );

        // One byte changed, same size; its mtime moves.
        let edited = source.join("d3/e3/f3");
        let mut bytes = std::fs::read(&edited).expect("read");
        bytes[0] = b'F';
        std::fs::write(&edited, &bytes).expect("write");
        let bump = std::fs::File::options()
            .write(true)
            .open(&edited)
            .expect("open");
        bump.set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
            .expect("mtime");
        let one = tun.put_dir(&source, &remote).await.expect("one byte");
        assert_eq!((one.files_sent, one.bytes_sent), (1, bytes.len() as u64));
        assert_eq!(describe(&source), describe(Path::new(&remote)));

        // The same size and mtime: only checksum mode sees it.
        let before = std::fs::metadata(&edited)
            .expect("meta")
            .modified()
            .expect("mtime");
        bytes[1] = b'X';
        std::fs::write(&edited, &bytes).expect("write");
        std::fs::File::options()
            .write(true)
            .open(&edited)
            .expect("open")
            .set_modified(before)
            .expect("mtime");
        let quick = tun.put_dir(&source, &remote).await.expect("quick");
        assert_eq!(quick.files_sent, 0);
        let checked = tun
            .put_dir(&source, &remote)
            .checksum(true)
            .await
            .expect("checksum");
        assert_eq!(checked.files_sent, 1);
        assert_eq!(describe(&source), describe(Path::new(&remote)));

        // Delete mode, and excluded names left alone.
        std::fs::remove_dir_all(source.join("d9")).expect("rm");
        std::fs::write(Path::new(&remote).join("keep.log"), "remote only").expect("log");
        let kept = tun.put_dir(&source, &remote).await.expect("no delete");
        assert_eq!(kept.deleted, 0);
        let deleted = tun
            .put_dir(&source, &remote)
            .delete(true)
            .exclude("*.log")
            .await
            .expect("delete");
        // With an exclude, entries go one by one (a directory only once empty).
        assert!(deleted.deleted > 1000, "{}", deleted.deleted);
        assert!(!Path::new(&remote).join("d9").exists());
        assert!(Path::new(&remote).join("keep.log").exists());
        std::fs::remove_file(Path::new(&remote).join("keep.log")).expect("rm log");
        assert_eq!(describe(&source), describe(Path::new(&remote)));

        // And back the other way.
        let back = dir.path().join("back");
        let fetched = tun.fetch_dir(&remote, &back).await.expect("fetch");
        assert_eq!(fetched.files_sent, 9_000);
        assert_eq!(describe(&source), describe(&back));
        let refetched = tun.fetch_dir(&remote, &back).await.expect("refetch");
        assert_eq!(refetched.files_sent, 0);
    }

    #[tokio::test]
    async fn large_files_go_through_put_and_fetch() {
        let tun = local("dirs-large");
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("source");
        std::fs::create_dir_all(&source).expect("dir");
        crate::support::patterned(&source.join("big"), 5 << 20);
        std::fs::set_permissions(source.join("big"), std::fs::Permissions::from_mode(0o640))
            .expect("mode");
        let remote = remote_root(dir.path());
        let summary = tun.put_dir(&source, &remote).await.expect("put");
        assert_eq!((summary.files_sent, summary.bytes_sent), (1, 5 << 20));
        assert_eq!(describe(&source), describe(Path::new(&remote)));
        let back = dir.path().join("back");
        tun.fetch_dir(&remote, &back).await.expect("fetch");
        assert_eq!(describe(&source), describe(&back));
    }

    #[tokio::test]
    async fn unsafe_entries_are_refused_by_name_and_specials_skipped() {
        let tun = local("dirs-hostile");
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("source");
        std::fs::create_dir_all(source.join("a")).expect("dir");
        std::fs::write(source.join("a/f"), "x").expect("write");
        std::os::unix::fs::symlink("../../outside", source.join("a/escape")).expect("link");
        let remote = remote_root(dir.path());
        let error = tun
            .put_dir(&source, &remote)
            .await
            .expect_err("escaping link");
        assert!(
            matches!(&error, DirError::Refused { entry, .. } if entry == "a/escape"),
            "{error:?}"
        );
        assert!(!Path::new(&remote).join("a").exists(), "nothing was sent");
        // fetch_dir refuses it too, from the far side.
        std::fs::create_dir_all(&remote).expect("remote");
        std::os::unix::fs::symlink("/etc", Path::new(&remote).join("abs")).expect("link");
        let error = tun
            .fetch_dir(&remote, dir.path().join("back"))
            .await
            .expect_err("abs link");
        assert!(
            matches!(&error, DirError::Refused { entry, .. } if entry == "abs"),
            "{error:?}"
        );

        std::fs::remove_file(source.join("a/escape")).expect("rm");
        let fifo = std::ffi::CString::new(source.join("a/pipe").display().to_string()).expect("c");
        // SAFETY: mkfifo takes a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let other = dir.path().join("other");
        let summary: SyncSummary = tun
            .put_dir(&source, other.display().to_string())
            .await
            .expect("skips");
        assert_eq!(summary.skipped, ["a/pipe"]);
        let error = tun
            .put_dir(&source, other.display().to_string())
            .refuse_special(true)
            .await
            .expect_err("refused");
        assert!(
            matches!(&error, DirError::Refused { entry, .. } if entry == "a/pipe"),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn a_killed_agent_leaves_every_file_old_or_new() {
        let tun = local("dirs-killed");
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("source");
        let remote = remote_root(dir.path());
        std::fs::create_dir_all(&source).expect("dir");
        std::fs::create_dir_all(&remote).expect("dir");
        for index in 0..400 {
            std::fs::write(source.join(format!("f{index}")), vec![b'n'; 200 << 10]).expect("new");
            std::fs::write(Path::new(&remote).join(format!("f{index}")), b"old").expect("old");
        }
        tun.connect().await.expect("connect");
        let agent = tun.agent_pid().expect("pid");
        let killed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let kill = killed.clone();
        let error = tun
            .put_dir(&source, &remote)
            .sync(false)
            .progress(move |step| {
                if step.files_done > 0 && !kill.swap(true, std::sync::atomic::Ordering::SeqCst) {
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(agent as i32, libc::SIGKILL) };
                }
            })
            .await
            .expect_err("the agent was killed");
        assert!(killed.load(std::sync::atomic::Ordering::SeqCst));
        let reported = match &error {
            DirError::Stopped {
                summary,
                cause: Some(_),
                entry,
                ..
            } => {
                assert!(entry.starts_with('f'), "{error}");
                summary.files_sent
            }
            other => panic!("{other:?}"),
        };
        let (mut old, mut new, mut staged) = (0, 0, 0);
        for entry in std::fs::read_dir(&remote).expect("remote").flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                // Staged under a name (where the filesystem has no
                // O_TMPFILE, or named and not yet renamed when the kill
                // came): hidden, and removed by the next sync.
                assert!(name.contains(".chopsticks-"), "{name}");
                staged += 1;
                continue;
            }
            let content = std::fs::read(entry.path()).expect("read");
            if content == b"old" {
                old += 1;
            } else {
                assert_eq!(
                    content,
                    vec![b'n'; 200 << 10],
                    "{name} is neither old nor new"
                );
                new += 1;
            }
        }
        assert_eq!(old + new, 400);
        assert!(new > 0 && old > 0, "new {new}, old {old}");
        // What the summary counts as sent is there (a batch whose answer the
        // kill cut off may be there too).
        assert!(
            reported > 0 && new >= reported,
            "reported {reported}, new {new}"
        );
        // A second sync finishes the job and leaves nothing staged.
        let summary = tun.put_dir(&source, &remote).await.expect("again");
        assert_eq!(summary.files_sent, old, "{staged} were staged");
        let names: Vec<String> = std::fs::read_dir(&remote)
            .expect("remote")
            .flatten()
            .map(|entry| entry.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 400, "{names:?}");
        assert!(names.iter().all(|name| !name.starts_with('.')));
    }

    #[cfg(feature = "ssh")]
    #[tokio::test]
    async fn over_ssh_both_ways() {
        let Some(sshd) = chopsticks_testkit::sshd_or_skip("dirs", 1) else {
            return;
        };
        let tun =
            Tunnel::builder(chopsticks::Ssh::new(sshd.alias(0)).config_file(sshd.client_config()))
                .stderr(chopsticks::stderr::discard())
                .build();
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("source");
        make_tree(&source, 500);
        let remote = format!("/home/{}/dirs-{}", sshd.user(), std::process::id());
        let _ = std::fs::remove_dir_all(&remote);
        let first = tun.put_dir(&source, &remote).await.expect("put over ssh");
        assert_eq!(first.files_sent, 500);
        assert_eq!(
            tun.put_dir(&source, &remote)
                .await
                .expect("again")
                .files_sent,
            0
        );
        let back = dir.path().join("back");
        tun.fetch_dir(&remote, &back).await.expect("fetch over ssh");
        assert_eq!(describe(&source), describe(&back));
        let _ = std::fs::remove_dir_all(&remote);
    }

    #[tokio::test]
    async fn a_group_gets_one_tree_on_every_host() {
        let Some(roots) = chopsticks_testkit::require(
            (0..2)
                .map(|index| crate::support::ChrootRoot::with_tools(&format!("dirs-group-{index}")))
                .collect::<Result<Vec<_>, _>>(),
            "ops::dirs::a_group_gets_one_tree_on_every_host",
        ) else {
            return;
        };
        let tunnels = roots.iter().enumerate().map(|(index, root)| {
            Tunnel::builder(
                chopsticks::Exec::new(["chroot".to_string(), root.path().display().to_string()])
                    .named(format!("jail-{index}")),
            )
            .stderr(chopsticks::stderr::discard())
            .build()
        });
        let group = Group::new(tunnels).expect("group");
        let dir = tempfile::tempdir().expect("tempdir");
        let source = dir.path().join("source");
        make_tree(&source, 50);
        let results = group
            .put_dir(&source, "/tmp/tree")
            .await
            .into_result()
            .expect("every host");
        assert_eq!(results.len(), 2);
        for root in &roots {
            assert_eq!(describe(&source), describe(&root.path().join("tmp/tree")));
        }
    }
}
