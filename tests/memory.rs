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
    tokio::time::sleep(chopsticks::buffer::SPARE_IDLE * 2 + Duration::from_millis(500)).await;
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
    assert!(
        before < 1 << 20,
        "an agent that moved no bulk data holds a {before}-byte pipe"
    );
    // A streamed argument and a streamed result: chunks both ways.
    let echoed = tun
        .call(std::convert::identity::<Vec<u8>>, (vec![7u8; 4 << 20],))
        .await
        .expect("bulk call");
    assert_eq!(echoed.len(), 4 << 20);
    let busy = tun.call(largest_pipe, ()).await.expect("call");
    assert!(
        busy >= 1 << 20,
        "after bulk data the largest pipe holds {busy} bytes"
    );
    // The idle task gives the pages back a tick after bulk data stops.
    tokio::time::sleep(chopsticks::buffer::SPARE_IDLE * 2 + Duration::from_millis(500)).await;
    let after = tun.call(largest_pipe, ()).await.expect("call");
    assert_eq!(after, before, "the pipes went back to their size");
}
