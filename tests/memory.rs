//! Memory: an idle agent stays small, and returns to small after moving a
//! large payload; its pipes are large only while bulk data moves.

use std::time::Duration;

use chopsticks::{Local, Tunnel};

/// The agent's own resident memory: anonymous pages from `smaps_rollup`
/// (transparent huge pages included). File-backed pages are left out: they
/// are the code of this test program, which is large (a debug build linking
/// every transport) and grows with the project, not memory the agent holds.
/// `benches/memory.rs` reports the whole RSS of a release program.
fn resident_kib(pid: u32) -> u64 {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    rollup
        .lines()
        .find_map(|line| line.strip_prefix("Anonymous:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(u64::MAX)
}

fn byte_len(data: Vec<u8>) -> usize {
    data.len()
}

const TEN_MB_IN_KIB: u64 = 10_000_000 / 1024;

#[tokio::test]
async fn an_idle_agent_holds_under_ten_megabytes_even_after_a_large_call() {
    let tun = Tunnel::new(Local::new());
    tun.connect().await.expect("connect");
    let agent = tun.agent_pid().expect("pid");
    let idle = resident_kib(agent);
    assert!(idle < TEN_MB_IN_KIB, "idle agent uses {idle} KiB");

    assert_eq!(
        tun.call(byte_len, (vec![1u8; 32 << 20],))
            .await
            .expect("call"),
        32 << 20
    );
    let busy = resident_kib(agent);
    assert!(
        busy > 32 * 1024,
        "the payload buffer is kept for reuse right after a call ({busy} KiB)"
    );
    tokio::time::sleep(
        chopsticks_core::__private::buffer::SPARE_IDLE * 2 + Duration::from_millis(500),
    )
    .await;
    let after = resident_kib(agent);
    assert!(
        after < TEN_MB_IN_KIB,
        "the agent still uses {after} KiB after idling"
    );
}

/// The largest kernel buffer among this process's pipes.
fn largest_pipe() -> usize {
    let entries = std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd");
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .map(|fd| {
            // SAFETY: F_GETPIPE_SZ only reads; it fails on anything but a pipe.
            unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) }
        })
        .filter_map(|size| usize::try_from(size).ok())
        .max()
        .unwrap_or(0)
}

#[tokio::test]
async fn the_agents_pipes_are_large_only_while_bulk_data_moves() {
    let tun = Tunnel::new(Local::new());
    let before = tun.call(largest_pipe, ()).await.expect("call");
    let chunk = chopsticks_core::__private::wire::CHUNK_LEN;
    assert!(
        before < chunk,
        "an agent that moved no bulk data holds a {before}-byte pipe"
    );
    // A streamed argument and a streamed result: chunks both ways.
    let echoed = tun
        .call(std::convert::identity::<Vec<u8>>, (vec![7u8; 4 << 20],))
        .await
        .expect("bulk call");
    assert_eq!(echoed.len(), 4 << 20);
    let busy = tun.call(largest_pipe, ()).await.expect("call");
    assert_eq!(
        busy, chunk,
        "after bulk data the largest pipe holds {busy} bytes, not one chunk"
    );
    // The idle task gives the pages back a tick after bulk data stops.
    tokio::time::sleep(
        chopsticks_core::__private::buffer::SPARE_IDLE * 2 + Duration::from_millis(500),
    )
    .await;
    let after = tun.call(largest_pipe, ()).await.expect("call");
    assert_eq!(after, before, "the pipes went back to their size");
}

/// The frames of a fake agent that streams `chunks` chunks of a result it
/// announced as twice as large, and then says nothing more.
fn half_streamed_result(path: &std::path::Path, chunks: usize) {
    use chopsticks_core::__private::protocol::{Message, Payload};
    use chopsticks_core::__private::wire::{CHUNK_LEN, OutFrame};
    use std::io::Write;
    std::fs::write(
        path.with_extension("hello"),
        OutFrame::message(&crate::support::our_hello_message()).to_bytes(),
    )
    .expect("write the hello");
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).expect("create"));
    let head = Message::Return {
        id: 1,
        value: Payload::Streamed {
            len: (2 * chunks * CHUNK_LEN) as u64,
        },
    };
    out.write_all(&OutFrame::message(&head).to_bytes())
        .expect("write");
    let chunk = OutFrame::chunk(1, bytes::Bytes::from(vec![7u8; CHUNK_LEN])).to_bytes();
    for _ in 0..chunks {
        out.write_all(&chunk).expect("write");
    }
    out.flush().expect("flush");
}

fn small() -> u8 {
    1
}

/// Runs on agent A, the controller under test: calls a fake agent that
/// streams half of a large result and stalls, gives the call up after a
/// timeout, and returns A's anonymous memory (KiB) before the call, while
/// the partial result was held, and after the timeout.
async fn give_up_on_a_half_streamed_result(frames: std::path::PathBuf) -> (u64, u64, u64) {
    let tunnel = Tunnel::builder(crate::support::FakeAgent {
        script: crate::support::speaks_after_the_call(&frames.with_extension("hello"), &frames),
    })
    .stderr(chopsticks::stderr::discard())
    .build();
    let me = std::process::id();
    let before = resident_kib(me);
    // The most held while the call waits: sampled until most of the
    // partial result is in, or shortly before the timeout (a loaded machine
    // may take seconds to move it).
    let (outcome, during) = tokio::join!(
        tunnel.call(small, ()).timeout(Duration::from_secs(4)),
        async {
            let mut most = 0;
            for _ in 0..35 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                most = most.max(resident_kib(me));
                if most > before + 155 * 1024 {
                    break;
                }
            }
            most
        }
    );
    assert!(outcome.is_err(), "the stalled call must time out");
    tokio::time::sleep(Duration::from_millis(300)).await;
    (before, during, resident_kib(me))
}

/// A call given up (here by its timeout) while its large result streams in
/// frees what arrived at once, not when the connection closes.
#[tokio::test]
async fn a_timed_out_calls_partial_result_is_freed_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let frames = dir.path().join("frames");
    half_streamed_result(&frames, 640); // 160 MiB of a 320 MiB result
    let controller = Tunnel::builder(Local::named("a"))
        .stderr(chopsticks::stderr::discard())
        .build();
    let (before, during, after) = controller
        .call_async(give_up_on_a_half_streamed_result, (frames,))
        .await
        .expect("agent A");
    assert!(
        during > before + 150 * 1024,
        "the partial result was never held ({before} → {during} KiB), so this test proves nothing"
    );
    crate::support::figure(
        "a timed-out call: controller memory held by its partial result (KiB), \
         while streaming / after the timeout",
        (during.saturating_sub(before), after.saturating_sub(before)),
    );
    assert!(
        after < before + 32 * 1024,
        "{} KiB still held after the call was given up ({before} → {during} → {after} KiB)",
        after.saturating_sub(before)
    );
}
