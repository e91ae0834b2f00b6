//! The OpenSSH transport against a real `sshd` on loopback (chopsticks-testkit).

use std::time::{Duration, Instant};

use chopsticks::{Error, Group, Ssh, SshError, Tunnel};
use chopsticks_testkit::{Sshd, sshd_or_skip};

use crate::support::{pending_call_error_after, ssh_error};

pub fn tunnel(sshd: &Sshd, alias: &str) -> Tunnel {
    Tunnel::builder(Ssh::new(alias).config_file(sshd.client_config()))
        .stderr(chopsticks::stderr::discard())
        .build()
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default()
}

fn add(a: u64, b: u64) -> u64 {
    a + b
}

#[tokio::test]
async fn calls_and_files_over_a_real_sshd() {
    let Some(sshd) = sshd_or_skip("calls", 1) else {
        return;
    };
    let tun = tunnel(&sshd, sshd.alias(0));
    assert_eq!(tun.call(add, (40, 2)).await.expect("call"), 42);
    assert_eq!(tun.call(hostname, ()).await.expect("hostname"), hostname());
    assert_ne!(tun.agent_pid(), Some(std::process::id()));

    let calls: Vec<_> = (0..200u64).map(|i| tun.call(add, (i, 1))).collect();
    let results = futures_util::future::join_all(calls).await;
    for (i, result) in results.into_iter().enumerate() {
        assert_eq!(result.expect("concurrent call"), i as u64 + 1);
    }

    let dir = crate::support::Scratch::shared("ssh");
    let data = crate::support::patterned(&dir.path("source"), 3 * 1024 * 1024 + 1);
    let sent = tun
        .put(dir.path("source"), dir.path("remote"))
        .await
        .expect("put");
    let back = tun
        .fetch(dir.path("remote"), dir.path("back"))
        .await
        .expect("fetch");
    assert_eq!(sent.checksum, back.checksum);
    assert_eq!(std::fs::read(dir.path("back")).expect("read"), data);
}

#[tokio::test]
async fn a_group_spans_several_servers() {
    let (Some(first), Some(second)) = (sshd_or_skip("group-a", 3), sshd_or_skip("group-b", 2))
    else {
        return;
    };
    let mut tunnels = Vec::new();
    for sshd in [&first, &second] {
        for alias in sshd.aliases() {
            tunnels.push(tunnel(sshd, alias));
        }
    }
    let group = Group::new(tunnels).expect("distinct aliases");
    let sums = group
        .call(add, (1, 1))
        .await
        .into_result()
        .expect("every host");
    assert_eq!(sums.len(), 5);
    assert!(sums.values().all(|sum| *sum == 2));
}

#[tokio::test]
async fn connection_failures_are_distinct_and_name_the_host() {
    let Some(sshd) = sshd_or_skip("failures", 1) else {
        return;
    };
    let refused = tunnel(&sshd, &sshd.closed_port_alias())
        .connect()
        .await
        .expect_err("closed port");
    assert!(
        matches!(ssh_error(&refused), SshError::Refused { .. }),
        "{refused}"
    );
    assert!(refused.to_string().contains("closed-port"), "{refused}");

    let wrong_key = tunnel(&sshd, &sshd.wrong_key_alias())
        .connect()
        .await
        .expect_err("wrong key");
    assert!(
        matches!(ssh_error(&wrong_key), SshError::Authentication { .. }),
        "{wrong_key}"
    );
    assert!(wrong_key.to_string().contains("wrong-key"), "{wrong_key}");

    let unknown = tunnel(&sshd, &sshd.unknown_host_alias())
        .connect()
        .await
        .expect_err("unknown host key");
    assert!(
        matches!(ssh_error(&unknown), SshError::HostKey { .. }),
        "{unknown}"
    );
    assert!(
        unknown
            .to_string()
            .contains("never turns host-key checking off")
    );

    let unresolvable = tunnel(&sshd, "chopsticks-no-such-host.invalid")
        .connect()
        .await
        .expect_err("no such host");
    assert!(
        matches!(ssh_error(&unresolvable), SshError::Resolve { .. }),
        "{unresolvable}"
    );

    // A cipher the client offers but this sshd does not allow. ssh reports
    // it at its default LogLevel, INFO; the test kit's config is quieter.
    let no_common_cipher = Tunnel::builder(
        Ssh::new(sshd.alias(0))
            .config_file(sshd.client_config())
            .option("LogLevel", "INFO")
            .option("Ciphers", "aes256-cbc"),
    )
    .stderr(chopsticks::stderr::discard())
    .build()
    .connect()
    .await
    .expect_err("no common cipher");
    assert!(
        matches!(ssh_error(&no_common_cipher), SshError::Negotiation { .. }),
        "{no_common_cipher}"
    );
    assert!(
        no_common_cipher.to_string().contains(sshd.alias(0)),
        "{no_common_cipher}"
    );
}

#[tokio::test]
async fn hostile_host_names_stay_host_names() {
    let Some(sshd) = sshd_or_skip("hostile", 1) else {
        return;
    };
    let marker = std::env::temp_dir().join(format!("chopsticks-pwned-{}", std::process::id()));
    let hostile = [
        format!("-oProxyCommand=touch {}", marker.display()),
        format!("x;touch {}", marker.display()),
        format!("$(touch {})", marker.display()),
        "-V".to_string(),
    ];
    for host in &hostile {
        let error = tunnel(&sshd, host).connect().await.expect_err(host);
        assert!(
            matches!(error, Error::Spawn { .. } | Error::Bootstrap { .. }),
            "{error:?}"
        );
        assert!(!marker.exists(), "{host} ran a command");
    }
}

#[tokio::test]
async fn a_killed_sshd_fails_pending_calls_fast() {
    let Some(mut sshd) = sshd_or_skip("killed", 1) else {
        return;
    };
    let tun = tunnel(&sshd, sshd.alias(0));
    let (error, after_kill) = pending_call_error_after(&tun, || sshd.kill()).await;
    assert!(error.is_disconnected(), "{error:?}");
    assert!(after_kill < Duration::from_secs(5), "took {after_kill:?}");
}

/// The cached agent's metadata once no upload is in flight: other tests
/// connecting as the same user at the same time may each have found the
/// cache empty and still be uploading (`.agent-HASH.XXXXXX`), and their
/// rename replaces the file.
async fn settled(cached: &std::path::Path) -> std::fs::Metadata {
    use std::os::unix::fs::MetadataExt;
    let name = cached
        .file_name()
        .expect("name")
        .to_string_lossy()
        .to_string();
    let dir = cached.parent().expect("cache dir");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let uploading = std::fs::read_dir(dir)
            .expect("read cache dir")
            .flatten()
            .any(|entry| {
                entry
                    .file_name()
                    .to_string_lossy()
                    .starts_with(&format!(".{name}."))
            });
        let before = std::fs::metadata(cached).expect("the agent is cached");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let after = std::fs::metadata(cached).expect("the agent is cached");
        if !uploading && before.ino() == after.ino() {
            return after;
        }
        assert!(
            Instant::now() < deadline,
            "uploads into {} never settled",
            dir.display()
        );
    }
}

#[tokio::test]
async fn a_second_connect_reuses_the_cached_agent() {
    let Some(sshd) = sshd_or_skip("cache", 1) else {
        return;
    };
    let tun = tunnel(&sshd, sshd.alias(0));
    let home: String = tun
        .call(|| std::env::var("HOME").unwrap_or_default(), ())
        .await
        .expect("home");
    let hash = &chopsticks_core::__private::identity::agent_file()
        .expect("hash")
        .sha256;
    let cached = std::path::Path::new(&home).join(format!(".cache/chopsticks/agent-{hash}"));
    let before = settled(&cached).await;
    tun.close().await.expect("close");
    let started = Instant::now();
    assert_eq!(tun.call(add, (2, 3)).await.expect("reconnect"), 5);
    let reconnect = started.elapsed();
    let after = std::fs::metadata(&cached).expect("still cached");
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        before.ino(),
        after.ino(),
        "the cached agent was not replaced"
    );
    assert_eq!(before.mtime(), after.mtime());
    assert!(reconnect < Duration::from_secs(10), "{reconnect:?}");
}

#[tokio::test]
async fn control_persist_shares_one_connection_across_reconnects() {
    let Some(sshd) = sshd_or_skip("control", 1) else {
        return;
    };
    let tun = Tunnel::builder(
        Ssh::new(sshd.alias(0))
            .config_file(sshd.client_config())
            .control_persist(Duration::from_secs(30)),
    )
    .stderr(chopsticks::stderr::discard())
    .build();
    assert_eq!(tun.call(add, (1, 1)).await.expect("first connect"), 2);
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let dir = std::env::temp_dir().join(format!("chopsticks-ssh-{uid}"));
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    assert_eq!(
        std::fs::metadata(&dir)
            .expect("control dir")
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    let sockets = std::fs::read_dir(&dir)
        .expect("read control dir")
        .flatten()
        .filter(|entry| {
            entry
                .file_type()
                .map(|kind| kind.is_socket())
                .unwrap_or(false)
        })
        .count();
    assert!(sockets >= 1, "a control master socket exists");
    let before = client_ports(sshd.port());
    assert_eq!(before.len(), 1, "one connection to sshd: {before:?}");
    tun.close().await.expect("close");
    assert_eq!(
        tun.call(add, (2, 2))
            .await
            .expect("reconnect through the master"),
        4
    );
    // Through the master there is no new TCP connection (and no key
    // exchange): the reconnect rides the master's connection, the same
    // client port, where a fresh ssh would open another.
    assert_eq!(
        client_ports(sshd.port()),
        before,
        "the reconnect opened its own connection instead of using the master"
    );
    let _ = std::process::Command::new("ssh")
        .arg("-F")
        .arg(sshd.client_config())
        .args([
            "-o",
            &format!("ControlPath={}/%C", dir.display()),
            "-O",
            "exit",
        ])
        .arg(sshd.alias(0))
        .output();
}

/// The local ports of the established TCP connections to `port`, as the
/// kernel lists them in /proc/net/tcp and tcp6.
fn client_ports(port: u16) -> Vec<u16> {
    let mut ports = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let port_of = |field: &str| {
                field
                    .rsplit(':')
                    .next()
                    .and_then(|hex| u16::from_str_radix(hex, 16).ok())
            };
            // State 01 is ESTABLISHED.
            if fields.len() > 3 && fields[3] == "01" && port_of(fields[2]) == Some(port) {
                ports.extend(port_of(fields[1]));
            }
        }
    }
    ports.sort_unstable();
    ports
}

/// Every message of an error and its causes, as a cause-chain printer
/// (anyhow's `{:#}`) shows them.
fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        text.push_str(": ");
        text.push_str(&next.to_string());
        cause = next.source();
    }
    text
}

#[tokio::test]
async fn a_missing_ssh_client_is_named_once_in_the_cause_chain() {
    let tun = Tunnel::new(Ssh::new("web1").program("/nonexistent/ssh-client"));
    let error = tun.connect().await.expect_err("no such client");
    let SshError::ClientMissing { program, .. } = ssh_error(&error) else {
        panic!("{error:?}");
    };
    assert_eq!(program, "/nonexistent/ssh-client");
    let printed = chain(&error);
    // The reason (ENOENT) and the advice each appear exactly once.
    assert_eq!(
        printed.matches("No such file or directory").count(),
        1,
        "{printed}"
    );
    assert_eq!(
        printed.matches("install openssh-client").count(),
        1,
        "{printed}"
    );
    assert!(printed.contains("web1"), "{printed}");
}

/// `Group::ssh_with` gives every host the settings of one builder (here the
/// test kit's client config, without which no alias resolves).
#[tokio::test]
async fn a_group_shares_one_set_of_ssh_settings() {
    let Some(sshd) = sshd_or_skip("shared-settings", 2) else {
        return;
    };
    use chopsticks::SshGroup;
    let settings = Ssh::new("unused").config_file(sshd.client_config());
    let group = Group::ssh_with(sshd.aliases().iter().cloned(), &settings).expect("group");
    let sums = group
        .call(add, (2, 3))
        .await
        .into_result()
        .expect("every host, through the shared config");
    let hosts: Vec<&str> = sums.keys().map(String::as_str).collect();
    let mut aliases: Vec<&str> = sshd.aliases().iter().map(String::as_str).collect();
    aliases.sort();
    assert_eq!(hosts, aliases);
    assert!(sums.values().all(|sum| *sum == 5));
}

/// A session root without any C library, served by an sshd whose sessions
/// are chrooted into it: a host that cannot run this program's libc.
fn libcless_sshd(name: &str) -> Option<(crate::support::ChrootRoot, Sshd)> {
    let root = chopsticks_testkit::require(
        crate::support::ChrootRoot::without_c_library(name),
        "a host without a C library over ssh",
    )?;
    let sshd = chopsticks_testkit::require(
        Sshd::start_chrooted(name, 1, root.path()),
        "a host without a C library over ssh",
    )?;
    Some((root, sshd))
}

#[tokio::test]
async fn a_host_without_any_c_library_runs_the_bundled_agent_over_ssh() {
    let Some((root, sshd)) = libcless_sshd("libcless-ssh") else {
        return;
    };
    let tun = Tunnel::builder(Ssh::new(sshd.alias(0)).config_file(sshd.client_config()))
        .stderr(chopsticks::stderr::discard())
        .bundle_libraries(true)
        .build();
    crate::support::exercise_without_c_library(&tun, &root, "over ssh\n").await;
    tun.close().await.expect("close");

    let alone = Tunnel::builder(Ssh::new(sshd.alias(0)).config_file(sshd.client_config()))
        .stderr(chopsticks::stderr::discard())
        .bundle_libraries(false)
        .build();
    let error = alone.call(add, (1, 1)).await.expect_err("no loader there");
    let text = error.to_string();
    assert!(text.contains(sshd.alias(0)), "{text}");
    assert!(
        text.contains("ld-linux") && text.contains("bundle_libraries"),
        "{text}"
    );
}
