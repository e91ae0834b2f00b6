//! Input streams against real agents, locally and over the test-kit sshd:
//! items and raw bytes fed while the function runs, a slow function holding
//! the feeding stream back, an early return, and hostile controllers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use chopsticks::{ByteReceiver, Local, Receiver, Tunnel};
use futures_util::StreamExt;

fn count_matching(lines: Receiver<String>, needle: String) -> usize {
    lines.filter(|line| line.contains(&needle)).count()
}

async fn sum_async(mut numbers: Receiver<u64>) -> u64 {
    let mut sum = 0;
    while let Some(n) = numbers.recv().await {
        sum += n;
    }
    sum
}

/// The BLAKE3 of everything fed, and how many bytes.
fn hash_input(mut input: ByteReceiver) -> (u64, String) {
    let mut hasher = blake3::Hasher::new();
    let len = std::io::copy(&mut input, &mut hasher).expect("read the input");
    (len, hasher.finalize().to_hex().to_string())
}

/// Takes `n` items, slowly, and returns them.
fn take_slowly(numbers: Receiver<u64>, n: usize) -> Vec<u64> {
    numbers
        .take(n)
        .inspect(|_| std::thread::sleep(Duration::from_millis(20)))
        .collect()
}

/// A filter: the lines that contain `needle`, upper-cased, as they come.
fn grep_upper(lines: Receiver<String>, needle: String) -> impl Iterator<Item = String> {
    lines
        .filter(move |line| line.contains(&needle))
        .map(|line| line.to_uppercase())
}

fn local() -> Tunnel {
    Tunnel::builder(Local::new())
        .stderr(chopsticks::stderr::discard())
        .build()
}

/// `total` bytes in chunks of 256 KiB, the same pattern as `expected_hash`.
fn patterned(total: u64) -> impl futures_util::Stream<Item = Bytes> + Send {
    let chunk = Bytes::from(
        (0..256 * 1024u32)
            .map(|i| (i * 7 + 3) as u8)
            .collect::<Vec<_>>(),
    );
    let count = total / chunk.len() as u64;
    futures_util::stream::iter((0..count).map(move |_| chunk.clone()))
}

fn expected_hash(total: u64) -> String {
    let chunk: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 7 + 3) as u8).collect();
    let mut hasher = blake3::Hasher::new();
    for _ in 0..total / chunk.len() as u64 {
        hasher.update(&chunk);
    }
    hasher.finalize().to_hex().to_string()
}

async fn items_in(tun: &Tunnel) {
    let lines = futures_util::stream::iter(
        (0..10_000).map(|i| format!("line {i} {}", if i % 3 == 0 { "ERROR" } else { "ok" })),
    );
    let count = tun
        .call_with_input(count_matching, ("ERROR".to_string(),), lines)
        .await
        .expect("call");
    assert_eq!(count, 3334);
    let numbers = futures_util::stream::iter(1..=1000u64);
    let sum = tun
        .call_async_with_input(sum_async, (), numbers)
        .await
        .expect("async call");
    assert_eq!(sum, 500_500);
    let empty = futures_util::stream::iter(Vec::<String>::new());
    let none = tun
        .call_with_input(count_matching, ("x".to_string(),), empty)
        .await
        .expect("empty input");
    assert_eq!(none, 0);
}

async fn filtered(tun: &Tunnel) {
    let lines = futures_util::stream::iter((0..20_000).map(|i| format!("line {i} {}", i % 7)));
    let matching: Vec<String> = tun
        .call_stream_with_input(grep_upper, ("3".to_string(),), lines)
        .map(|line| line.expect("line"))
        .collect()
        .await;
    let expected: Vec<String> = (0..20_000)
        .map(|i| format!("line {i} {}", i % 7))
        .filter(|line| line.contains('3'))
        .map(|line| line.to_uppercase())
        .collect();
    assert_eq!(matching, expected);
    // An endless input, the output taken slowly: both ends held back, and
    // dropping the stream stops both.
    let pulled = Arc::new(AtomicU64::new(0));
    let counter = pulled.clone();
    let endless = futures_util::stream::iter(0u64..).map(move |i| {
        counter.fetch_add(1, Ordering::SeqCst);
        format!("{i}")
    });
    let mut stream = tun.call_stream_with_input(grep_upper, (String::new(),), endless);
    for expected in 0..100u64 {
        assert_eq!(
            stream.next().await.expect("line").expect("ok"),
            expected.to_string()
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = pulled.load(Ordering::SeqCst);
    drop(stream);
    // A window each way, of items of at least 5 bytes, and the unsent parts.
    assert!(
        held < 400_000,
        "the controller pulled {held} items of an endless input"
    );
    let lines = futures_util::stream::iter(["x".to_string()]);
    assert_eq!(
        tun.call_with_input(count_matching, ("x".to_string(),), lines)
            .await
            .expect("the tunnel serves on"),
        1
    );
}

#[tokio::test]
async fn a_filter_streams_out_what_is_fed_in_both_held_back() {
    filtered(&local()).await;
}

async fn bytes_in(tun: &Tunnel, total: u64) {
    let started = std::time::Instant::now();
    let (len, hash) = tun
        .call_with_input(hash_input, (), patterned(total))
        .await
        .expect("hash");
    crate::support::figure(
        &format!("{} MiB of input hashed on {}", total >> 20, tun.host()),
        started.elapsed(),
    );
    assert_eq!(len, total);
    assert_eq!(hash, expected_hash(total));
}

#[tokio::test]
async fn items_fed_from_a_stream_reach_blocking_and_async_functions() {
    items_in(&local()).await;
}

#[tokio::test]
async fn a_gibibyte_of_bytes_is_fed_and_hashed_on_the_agent() {
    bytes_in(&local(), 1 << 30).await;
}

#[tokio::test]
async fn a_slow_function_holds_the_feeding_stream_back_and_an_early_return_stops_it() {
    let tun = local();
    let pulled = Arc::new(AtomicU64::new(0));
    let counter = pulled.clone();
    let endless = futures_util::stream::iter(0u64..).inspect(move |_| {
        counter.fetch_add(1, Ordering::SeqCst);
    });
    let taken = tokio::time::timeout(
        Duration::from_secs(30),
        tun.call_with_input(take_slowly, (20,), endless),
    )
    .await
    .expect("the function returns")
    .expect("call");
    assert_eq!(taken, (0..20).collect::<Vec<_>>());
    // A u64 item is at least 5 bytes: the window and the unsent buffer
    // hold at most about 115,000 of them.
    let bound = (chopsticks_core::__private::flow::WINDOW
        + chopsticks_core::__private::flow::BUFFERED_LEN as u64)
        / 5;
    let pulled = pulled.load(Ordering::SeqCst);
    assert!(
        pulled < 20 + bound + 1000,
        "the controller pulled {pulled} items of an endless stream"
    );
    // The tunnel goes on serving after the feeding stopped.
    let lines = futures_util::stream::iter(["x".to_string()]);
    assert_eq!(
        tun.call_with_input(count_matching, ("x".to_string(),), lines)
            .await
            .expect("call"),
        1
    );
}

#[tokio::test]
async fn a_dropped_call_drops_its_input_and_the_tunnel_serves_on() {
    let tun = local();
    let endless = futures_util::stream::iter(0u64..);
    let call = tun.call_with_input(take_slowly, (1_000_000,), endless);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), call)
            .await
            .is_err()
    );
    eprintln!("dropped");
    let numbers = futures_util::stream::iter(1..=10u64);
    assert_eq!(
        tokio::time::timeout(
            Duration::from_secs(10),
            tun.call_async_with_input(sum_async, (), numbers)
        )
        .await
        .expect("the next call answers")
        .expect("call"),
        55
    );
}

/// Hostile controllers: input beyond the window, or the end of an input
/// never opened, make a real agent exit with status 2.
#[tokio::test]
async fn a_real_agent_refuses_input_beyond_its_window_and_unopened_ends() {
    use chopsticks_core::__private::flow::WINDOW;
    use chopsticks_core::__private::protocol::Message;
    use chopsticks_core::__private::wire::{OutFrame, STREAM_FRAME_LEN};
    let mut flood = OutFrame::message(&Message::Input { id: 1 }).to_bytes();
    let mut sent = 0;
    while sent <= WINDOW as usize {
        flood.extend(OutFrame::stream(1, Bytes::from(vec![0; STREAM_FRAME_LEN])).to_bytes());
        sent += STREAM_FRAME_LEN;
    }
    let unopened = OutFrame::message(&Message::InputEnd { id: 5 }).to_bytes();
    let twice = [
        OutFrame::message(&Message::Input { id: 2 }).to_bytes(),
        OutFrame::message(&Message::Input { id: 2 }).to_bytes(),
    ]
    .concat();
    for case in [flood, unopened, twice] {
        let mut agent = crate::support::RawAgent::start().await;
        agent.send(&case).await;
        let status = agent.exit_status(Duration::from_secs(10)).await;
        assert_eq!(status.code(), Some(2), "{status:?}");
    }
}

#[cfg(feature = "ssh")]
#[tokio::test]
async fn inputs_over_a_real_sshd() {
    let Some(sshd) = chopsticks_testkit::sshd_or_skip("inputs", 1) else {
        return;
    };
    let tun = crate::ssh::tunnel(&sshd, sshd.alias(0));
    items_in(&tun).await;
    filtered(&tun).await;
    bytes_in(&tun, 64 << 20).await;
}
