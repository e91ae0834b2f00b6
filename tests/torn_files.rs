//! Sources that change while they are sent, peers that send other than
//! they announced, and files that are not files: every case fails with an
//! error naming the path, and nothing is committed.

use std::io::{ErrorKind, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use chopsticks::progress::ProgressEvent;
use chopsticks::{Direction, Error, Local, Tunnel};
use chopsticks_core::__private::protocol::{FileSummary, Message, Payload, encode_value};
use chopsticks_core::__private::wire::OutFrame;

use crate::support::FakeAgent;
use crate::support::Scratch;

fn tunnel() -> Tunnel {
    Tunnel::builder(Local::named("torn"))
        .stderr(chopsticks::stderr::discard())
        .build()
}

/// How a source is changed while it is read.
#[derive(Debug, Clone, Copy)]
enum Change {
    Truncate,
    Append,
    Rewrite,
}

impl Change {
    fn apply(self, path: &Path) {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .expect("open the source");
        match self {
            Change::Truncate => file.set_len(1 << 20).expect("truncate"),
            Change::Append => {
                use std::io::Seek;
                file.seek(std::io::SeekFrom::End(0)).expect("seek");
                file.write_all(&[7; 4096]).expect("append");
            }
            Change::Rewrite => file.write_all(&[7; 4096]).expect("rewrite at the start"),
        }
    }
}

/// A progress reporter that applies `change` to `path` once `after` bytes have moved.
fn change_after(path: &Path, after: u64, change: Change) -> impl Fn(&ProgressEvent<'_>) + use<> {
    let path = Mutex::new(Some(path.to_path_buf()));
    move |event: &ProgressEvent<'_>| {
        if let ProgressEvent::Advanced { done, .. } = event
            && *done >= after
            && let Some(path) = path.lock().expect("lock").take()
        {
            change.apply(&path);
        }
    }
}

fn a_pattern(path: &Path, len: usize) {
    let block: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
    let mut file = std::fs::File::create(path).expect("create");
    for _ in 0..len >> 20 {
        file.write_all(&block).expect("write");
    }
}

fn expect_changed(error: &Error, direction: Direction, path: &Path) {
    let Error::Transfer {
        direction: was,
        kind,
        ..
    } = error
    else {
        panic!("expected a transfer error, got {error:?}");
    };
    let text = error.to_string();
    assert_eq!(*was, direction, "{text}");
    assert_eq!(*kind, ErrorKind::ResourceBusy, "{text}");
    assert!(text.contains("while it was read"), "{text}");
    assert!(text.contains(&path.display().to_string()), "{text}");
}

#[tokio::test]
async fn a_source_changed_mid_put_fails_and_the_old_target_stays() {
    let dir = Scratch::new("torn-put");
    let tun = tunnel();
    for change in [Change::Truncate, Change::Append, Change::Rewrite] {
        a_pattern(&dir.path("source"), 64 << 20);
        std::fs::write(dir.path("target"), b"old").expect("old target");
        let error = tun
            .put(dir.path("source"), dir.path("target"))
            .progress(change_after(&dir.path("source"), 8 << 20, change))
            .await
            .expect_err(&format!("{change:?} mid-put must fail"));
        expect_changed(&error, Direction::Put, &dir.path("source"));
        assert_eq!(std::fs::read(dir.path("target")).expect("read"), b"old");
        assert_eq!(dir.entries(), ["source", "target"], "{change:?}");
    }
}

#[tokio::test]
async fn a_source_changed_mid_fetch_fails_and_nothing_is_committed() {
    let dir = Scratch::new("torn-fetch");
    let tun = tunnel();
    for change in [Change::Truncate, Change::Append, Change::Rewrite] {
        a_pattern(&dir.path("source"), 256 << 20);
        let error = tun
            .fetch(dir.path("source"), dir.path("copy"))
            .progress(change_after(&dir.path("source"), 8 << 20, change))
            .await
            .expect_err(&format!("{change:?} mid-fetch must fail"));
        expect_changed(&error, Direction::Fetch, &dir.path("source"));
        assert_eq!(dir.entries(), ["source"], "{change:?}");
    }
}

fn frames(messages: &[Message]) -> Vec<u8> {
    messages
        .iter()
        .flat_map(|message| OutFrame::message(message).to_bytes())
        .collect()
}

/// A fake agent that answers the first request (a fetch, id 1) with a head
/// announcing `announced` bytes, then `sent` bytes, then a summary of what it sent.
fn lying_agent(dir: &Scratch, announced: u64, sent: usize) -> Tunnel {
    let data = vec![9u8; sent];
    let mut bytes = frames(&[crate::support::our_hello_message()]);
    std::fs::write(dir.path("hello"), &bytes).expect("write");
    bytes = frames(&[Message::FetchHead {
        id: 1,
        size: announced,
    }]);
    for chunk in data.chunks(chopsticks_core::__private::wire::CHUNK_LEN) {
        bytes.extend(OutFrame::chunk(1, bytes::Bytes::copy_from_slice(chunk)).to_bytes());
    }
    let summary = FileSummary {
        size: sent as u64,
        checksum: blake3::hash(&data).as_bytes().to_vec(),
        mode: 0o644,
        mtime: chopsticks_core::__private::protocol::FileTime {
            seconds: 0,
            nanos: 0,
        },
    };
    bytes.extend(frames(&[Message::Return {
        id: 1,
        value: Payload::Inline(encode_value(&summary).expect("encode")),
    }]));
    std::fs::write(dir.path("reply"), &bytes).expect("write");
    // The hello, then (once the fetch has had time to arrive) the reply.
    let script = format!(
        "cat '{hello}'; head -c 1 > /dev/null; sleep 0.3; cat '{reply}'; cat > /dev/null",
        hello = dir.path("hello").display(),
        reply = dir.path("reply").display()
    );
    Tunnel::builder(FakeAgent { script })
        .stderr(chopsticks::stderr::discard())
        .build()
}

#[tokio::test]
async fn a_peer_sending_other_than_it_announced_gets_nothing_committed() {
    let dir = Scratch::new("lying-peer");
    for (announced, sent) in [(10, 10 << 20), (10 << 20, 10)] {
        let tun = lying_agent(&dir, announced, sent);
        let error = tokio::time::timeout(
            Duration::from_secs(10),
            tun.fetch("/remote/file", dir.path("copy")).into_future(),
        )
        .await
        .expect("no hang")
        .expect_err("a size other than announced must fail");
        let text = error.to_string();
        assert!(
            matches!(&error, Error::Transfer { kind, .. } if *kind == ErrorKind::InvalidData),
            "{error:?}"
        );
        assert!(text.contains("announced"), "{text}");
        assert!(
            !dir.path("copy").exists(),
            "{announced} / {sent}: committed"
        );
    }
}

#[tokio::test]
async fn fifos_are_refused_at_once_both_ways() {
    let dir = Scratch::new("fifo");
    let fifo = dir.path("fifo");
    let path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: mkfifo with a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let tun = tunnel();
    let put = tokio::time::timeout(
        Duration::from_secs(5),
        tun.put(&fifo, dir.path("target")).into_future(),
    )
    .await
    .expect("a put of a FIFO must not block")
    .expect_err("a FIFO is not a regular file");
    let fetch = tokio::time::timeout(
        Duration::from_secs(5),
        tun.fetch(&fifo, dir.path("copy")).into_future(),
    )
    .await
    .expect("a fetch of a FIFO must not block")
    .expect_err("a FIFO is not a regular file");
    for error in [put, fetch] {
        let text = error.to_string();
        assert!(text.contains("not a regular file"), "{text}");
        assert!(text.contains(&fifo.display().to_string()), "{text}");
    }
    assert_eq!(dir.entries(), ["fifo"]);
    // The tunnel still works: no pool thread is stuck in open(2).
    assert_eq!(tun.call(|| 7u8, ()).await.expect("call"), 7);
}
