//! Fake agents, real processes: garbage, oversized frames, a wrong protocol version or binary.
//! Every case ends in a clear error, never a panic or a hang.

use std::time::Duration;

use chopsticks::protocol::{Hello, Message, PROTOCOL_VERSION};
use chopsticks::wire::OutFrame;
use chopsticks::{Error, Tunnel};

use crate::support::FakeAgent;

fn hello(protocol: u32, binary_id: Vec<u8>) -> Vec<u8> {
    OutFrame::message(&Message::Hello(Hello {
        protocol,
        binary_id,
        pid: 1,
        os: "Linux".into(),
        arch: std::env::consts::ARCH.into(),
        depth: 1,
    }))
    .to_bytes()
}

fn our_hello() -> Vec<u8> {
    hello(PROTOCOL_VERSION, chopsticks::identity::binary_id().to_vec())
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
    let error = tun.call(ping, ()).await.expect_err("must fail");
    assert!(matches!(error, Error::Protocol { .. }), "{error:?}");
    assert!(error.to_string().contains("frame"), "{error}");
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
            chopsticks::identity::binary_id().to_vec(),
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
    assert!(error.is_disconnect(), "{error:?}");
}
