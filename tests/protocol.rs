//! Fake agents, real processes: garbage, oversized frames, a wrong protocol version or binary.
//! Every case ends in a clear error, never a panic or a hang.

use std::time::Duration;

use chopsticks::{Error, Tunnel};
use chopsticks_core::__private::protocol::{Message, PROTOCOL_VERSION};
use chopsticks_core::__private::wire::OutFrame;

use crate::support::FakeAgent;

fn hello(protocol: u32, binary_id: Vec<u8>) -> Vec<u8> {
    OutFrame::message(&crate::support::hello_message(protocol, binary_id)).to_bytes()
}

fn our_hello() -> Vec<u8> {
    OutFrame::message(&crate::support::our_hello_message()).to_bytes()
}

/// A fake agent that writes `bytes` to stdout and then waits for its stdin to close.
fn speaking(dir: &tempfile::TempDir, bytes: &[u8]) -> Tunnel {
    let path = dir.path().join("frames");
    std::fs::write(&path, bytes).expect("write frames");
    let script = format!("cat '{}'; cat > /dev/null", path.display());
    Tunnel::builder(FakeAgent { script })
        .connect_timeout(Duration::from_secs(5))
        .stderr(chopsticks::stderr::discard())
        .build()
}

fn ping() -> u8 {
    1
}

#[tokio::test]
async fn garbage_instead_of_hello_is_a_handshake_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tun = speaking(&dir, b"\x00\x00\x00\x05\x7fhello, I am not an agent\n");
    let error = tun.connect().await.expect_err("must fail");
    assert!(matches!(error, Error::Handshake { .. }), "{error:?}");
    assert!(error.to_string().contains("fake"), "{error}");
}

#[tokio::test]
async fn an_oversized_frame_is_refused_without_allocating() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bytes = our_hello();
    bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0xf0, 0x01]);
    let tun = speaking(&dir, &bytes);
    let (outcome, largest) = crate::support::largest_allocation(tun.call(ping, ())).await;
    let error = outcome.expect_err("must fail");
    assert!(matches!(error, Error::Protocol { .. }), "{error:?}");
    assert!(error.to_string().contains("frame"), "{error}");
    // The frame claimed 4 GiB; nothing near that was asked for (but the
    // reader's allocations were seen).
    assert!(largest > 0, "no allocation was tracked");
    assert!(
        largest < 16 << 20,
        "the controller allocated {largest} bytes for the claim"
    );
}

#[tokio::test]
async fn malformed_frames_after_hello_close_the_tunnel_with_protocol_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: Vec<Vec<u8>> = vec![
        vec![0, 0, 0, 3, 0x01, 0xff, 0xff], // undecodable CBOR
        vec![0, 0, 0, 1, 0x09],             // unknown tag
        vec![0, 0, 0, 0],                   // empty frame
        OutFrame::message(&Message::Shutdown).to_bytes(), // a controller-only message
    ];
    for case in cases {
        let mut bytes = our_hello();
        bytes.extend_from_slice(&case);
        let tun = speaking(&dir, &bytes);
        let error = tun.call(ping, ()).await.expect_err("must fail");
        assert!(
            matches!(error, Error::Protocol { .. }),
            "{case:?}: {error:?}"
        );
    }
}

#[tokio::test]
async fn a_wrong_protocol_version_is_a_handshake_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tun = speaking(
        &dir,
        &hello(
            PROTOCOL_VERSION + 1,
            chopsticks_core::__private::identity::binary_id().to_vec(),
        ),
    );
    let error = tun.connect().await.expect_err("must fail");
    assert!(matches!(error, Error::Handshake { .. }), "{error:?}");
    assert!(error.to_string().contains("protocol version"), "{error}");
}

#[tokio::test]
async fn a_different_binary_is_a_handshake_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tun = speaking(&dir, &hello(PROTOCOL_VERSION, vec![0xde, 0xad, 0xbe, 0xef]));
    let error = tun.connect().await.expect_err("must fail");
    assert!(matches!(error, Error::Handshake { .. }), "{error:?}");
    assert!(error.to_string().contains("different program"), "{error}");
    assert!(error.to_string().contains("deadbeef"), "{error}");
}

#[tokio::test]
async fn an_agent_that_dies_before_hello_reports_status_and_stderr() {
    let tun = Tunnel::builder(FakeAgent {
        script: "echo 'Permission denied (publickey)' >&2; exit 255".into(),
    })
    .stderr(chopsticks::stderr::discard())
    .build();
    let error = tun.connect().await.expect_err("must fail");
    let text = error.to_string();
    assert!(matches!(error, Error::Bootstrap { .. }), "{error:?}");
    assert!(text.contains("status 255"), "{text}");
    assert!(text.contains("Permission denied (publickey)"), "{text}");
}

#[tokio::test]
async fn truncated_stream_mid_frame_is_a_disconnect_not_a_hang() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bytes = our_hello();
    bytes.extend_from_slice(&[0, 0, 1, 0, 0x01, 0xa1]);
    let path = dir.path().join("frames");
    std::fs::write(&path, &bytes).expect("write");
    let tun = Tunnel::builder(FakeAgent {
        script: format!("cat '{}'", path.display()),
    })
    .stderr(chopsticks::stderr::discard())
    .build();
    let result = tokio::time::timeout(Duration::from_secs(5), tun.call(ping, ())).await;
    let error = result.expect("no hang").expect_err("must fail");
    assert!(error.is_disconnected(), "{error:?}");
}

/// The longest error a hostile agent may cause: the bounded peer text and ours around it.
const LONGEST_ERROR: usize = 6 * 1024;

#[tokio::test]
async fn a_huge_binary_id_in_a_hello_gives_an_error_of_bounded_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tun = speaking(&dir, &hello(PROTOCOL_VERSION, vec![0xab; 100_000]));
    let error = tun.connect().await.expect_err("must fail");
    let text = error.to_string();
    assert!(matches!(error, Error::Handshake { .. }), "{error:?}");
    assert!(
        text.len() < LONGEST_ERROR,
        "{} bytes: {text:.300}",
        text.len()
    );
    assert!(text.contains("100000 bytes"), "{text}");
}

fn fail_frame(id: u64, message: String, backtrace: String) -> Vec<u8> {
    OutFrame::message(&Message::Fail {
        id,
        failure: chopsticks_core::__private::protocol::Failure {
            kind: chopsticks_core::__private::protocol::FailureKind::Panic,
            message,
            backtrace: Some(backtrace),
        },
    })
    .to_bytes()
}

#[tokio::test]
async fn a_huge_failure_message_is_elided_in_the_middle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let message = format!("START{}END", "x".repeat(200_000));
    let backtrace = format!("TOP{}BOTTOM", "y".repeat(100_000));
    // The failure answers the call, so it comes after the call.
    let (hello, rest) = (dir.path().join("hello"), dir.path().join("rest"));
    std::fs::write(&hello, our_hello()).expect("write the hello");
    std::fs::write(&rest, fail_frame(1, message, backtrace)).expect("write the failure");
    let tun = Tunnel::builder(FakeAgent {
        script: crate::support::speaks_after_the_call(&hello, &rest),
    })
    .stderr(chopsticks::stderr::discard())
    .build();
    let error = tun
        .call(ping, ())
        .timeout(Duration::from_secs(10))
        .await
        .expect_err("must fail");
    let Error::Remote {
        message, backtrace, ..
    } = &error
    else {
        panic!("{error:?}");
    };
    assert!(message.len() < LONGEST_ERROR, "{} bytes", message.len());
    assert!(message.starts_with("panicked: START") && message.ends_with("END"));
    assert!(message.contains("bytes elided"), "{message:.300}");
    let backtrace = backtrace.as_deref().expect("backtrace");
    assert!(backtrace.len() <= 33 * 1024, "{} bytes", backtrace.len());
    assert!(backtrace.starts_with("TOP") && backtrace.ends_with("BOTTOM"));
}

/// A violation from an agent that stays alive: the error names the message
/// kind (never its content), comes at once, the process is killed, and
/// `close` does not wait for an agent that can no longer hear it.
#[tokio::test]
async fn a_protocol_violation_fails_at_once_and_kills_the_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut bytes = our_hello();
    bytes.extend(
        OutFrame::message(&Message::Put {
            id: 1,
            request: chopsticks_core::__private::protocol::PutRequest {
                path: b"/etc/some/path/\xff/".repeat(10_000),
                size: 1,
                mode: 0o600,
                apply_umask: false,
                sync: false,
                create_dirs: false,
                mtime: None,
                owner: None,
                group: None,
            },
        })
        .to_bytes(),
    );
    let frames = dir.path().join("frames");
    std::fs::write(&frames, &bytes).expect("write frames");
    let pid_file = dir.path().join("pid");
    let tun = Tunnel::builder(FakeAgent {
        script: format!(
            "echo $$ > '{}'; cat '{}'; cat > /dev/null",
            pid_file.display(),
            frames.display()
        ),
    })
    .stderr(chopsticks::stderr::discard())
    .build();
    tun.connect().await.expect("hello");
    let started = std::time::Instant::now();
    let error = tun.call(ping, ()).await.expect_err("must fail");
    let failed_after = started.elapsed();
    let text = error.to_string();
    assert!(matches!(error, Error::Protocol { .. }), "{error:?}");
    crate::support::figure("a protocol violation: error after", failed_after);
    assert!(text.contains("a Put"), "{text}");
    assert!(text.len() < 512, "{text}");
    assert!(failed_after < Duration::from_secs(2), "{failed_after:?}");
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    assert!(
        crate::support::wait_gone(pid, Duration::from_secs(5)).await,
        "the violating agent {pid} is still running"
    );
    crate::support::figure(
        "a protocol violation: agent process gone after",
        started.elapsed(),
    );
    let closing = std::time::Instant::now();
    tun.close().await.expect("close");
    assert!(
        closing.elapsed() < Duration::from_secs(5),
        "close took {:?}",
        closing.elapsed()
    );
}
