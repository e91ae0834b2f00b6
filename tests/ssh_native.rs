//! The libssh2 transport (`NativeSsh`) against a real `sshd` on loopback.

use std::time::Duration;

use chopsticks::{Error, Group, NativeSsh, SshError, Tunnel};
use chopsticks_testkit::{Sshd, sshd_or_skip};

use crate::support::pending_call_error_after;
use crate::support::ssh_error;

fn native(sshd: &Sshd) -> NativeSsh {
    NativeSsh::new("127.0.0.1")
        .port(sshd.port())
        .user(sshd.user())
        .identity_file(sshd.client_key())
        .known_hosts(sshd.known_hosts())
}

fn tunnel(transport: NativeSsh) -> Tunnel {
    Tunnel::builder(transport)
        .stderr(chopsticks::stderr::discard())
        .build()
}

fn add(a: u64, b: u64) -> u64 {
    a + b
}

#[tokio::test]
async fn calls_files_and_groups_through_libssh2() {
    let Some(sshd) = sshd_or_skip("native", 1) else {
        return;
    };
    let tun = tunnel(native(&sshd));
    assert_eq!(tun.call(add, (40, 2)).await.expect("call"), 42);
    let calls: Vec<_> = (0..200u64).map(|i| tun.call(add, (i, 1))).collect();
    for (i, result) in futures_util::future::join_all(calls)
        .await
        .into_iter()
        .enumerate()
    {
        assert_eq!(result.expect("concurrent call"), i as u64 + 1);
    }

    let dir = crate::support::Scratch::shared("native");
    let data = crate::support::patterned(&dir.path("source"), 2 * 1024 * 1024 + 3);
    tun.put(dir.path("source"), dir.path("remote"))
        .await
        .expect("put");
    let back = tun
        .fetch(dir.path("remote"), dir.path("back"))
        .await
        .expect("fetch");
    assert_eq!(back.size, data.len() as u64);
    assert_eq!(std::fs::read(dir.path("back")).expect("read"), data);

    let group = Group::new((0..4).map(|i| tunnel(native(&sshd).named(format!("native-{i}")))))
        .expect("distinct names");
    let sums = group
        .call(add, (2, 2))
        .await
        .into_result()
        .expect("every host");
    assert_eq!(sums.len(), 4);
}

#[tokio::test]
async fn native_connection_failures_are_distinct() {
    let Some(sshd) = sshd_or_skip("native-failures", 1) else {
        return;
    };
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("port")
        .port();
    let refused = tunnel(native(&sshd).port(closed))
        .connect()
        .await
        .expect_err("closed port");
    assert!(
        matches!(ssh_error(&refused), SshError::Refused { .. }),
        "{refused}"
    );

    let wrong_key = tunnel(
        NativeSsh::new("127.0.0.1")
            .port(sshd.port())
            .user(sshd.user())
            .identity_file(sshd.wrong_key())
            .known_hosts(sshd.known_hosts()),
    )
    .connect()
    .await
    .expect_err("wrong key");
    assert!(
        matches!(ssh_error(&wrong_key), SshError::Authentication { .. }),
        "{wrong_key}"
    );

    let empty = crate::support::Scratch::new("native-known-hosts");
    std::fs::write(empty.path("known_hosts"), "").expect("write");
    let unknown = tunnel(native(&sshd).known_hosts(empty.path("known_hosts")))
        .connect()
        .await
        .expect_err("unknown host key");
    assert!(
        matches!(ssh_error(&unknown), SshError::HostKey { .. }),
        "{unknown}"
    );
    assert!(unknown.to_string().contains("127.0.0.1"), "{unknown}");

    let hostile = tunnel(NativeSsh::new("-oProxyCommand=touch /tmp/x").port(sshd.port()))
        .connect()
        .await
        .expect_err("hostile name");
    assert!(
        matches!(ssh_error(&hostile), SshError::Resolve { .. }),
        "{hostile}"
    );
}

#[tokio::test]
async fn the_chosen_ciphers_are_the_ones_offered() {
    let Some(sshd) = sshd_or_skip("native-ciphers", 1) else {
        return;
    };
    // Unknown names are dropped; what is left is offered and accepted.
    let chosen = tunnel(native(&sshd).ciphers("no-such-cipher,aes128-ctr"));
    assert_eq!(chosen.call(add, (1, 2)).await.expect("aes128-ctr"), 3);

    // A cipher libssh2 knows but this sshd does not allow: the offer
    // reached the server, which refuses it.
    let refused = tunnel(native(&sshd).ciphers("aes256-cbc"))
        .connect()
        .await
        .expect_err("a cipher the server does not allow");
    assert!(
        matches!(ssh_error(&refused), SshError::Negotiation { .. }),
        "{refused}"
    );

    let unknown = tunnel(native(&sshd).ciphers("no-such-cipher"))
        .connect()
        .await
        .expect_err("no cipher libssh2 knows");
    assert!(
        matches!(
            ssh_error(&unknown),
            SshError::Native {
                phase: chopsticks::NativePhase::ChoosingCiphers,
                ..
            }
        ),
        "{unknown}"
    );
    assert!(unknown.to_string().contains("127.0.0.1"), "{unknown}");
}

#[tokio::test]
async fn a_killed_sshd_fails_native_calls_fast() {
    let Some(mut sshd) = sshd_or_skip("native-killed", 1) else {
        return;
    };
    let tun = tunnel(native(&sshd));
    let (error, after_kill) = pending_call_error_after(&tun, || sshd.kill()).await;
    assert!(matches!(error, Error::Disconnected { .. }), "{error:?}");
    assert!(after_kill < Duration::from_secs(5));
    // No exit status came over the broken connection, and none is made up.
    let text = error.to_string();
    assert!(!text.contains("status 0"), "{text}");
    assert!(text.contains("ssh connection broke"), "{text}");
}

#[tokio::test]
async fn a_host_without_any_c_library_runs_the_bundled_agent_through_libssh2() {
    let Some(root) = chopsticks_testkit::require(
        crate::support::ChrootRoot::without_c_library("libcless-native"),
        "a host without a C library over libssh2",
    ) else {
        return;
    };
    let Some(sshd) = chopsticks_testkit::require(
        Sshd::start_chrooted("libcless-native", 1, root.path()),
        "a host without a C library over libssh2",
    ) else {
        return;
    };
    let tun = Tunnel::builder(native(&sshd))
        .stderr(chopsticks::stderr::discard())
        .bundle_libraries(true)
        .build();
    crate::support::exercise_without_c_library(&tun, &root, "through libssh2\n").await;
    tun.close().await.expect("close");
}
