//! Streaming calls against real agents, locally and over the test-kit sshd:
//! order, first item before the end, flow control, cancellation both ways,
//! failures mid-stream, large items, thousands of streams, and hostile peers.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chopsticks::{Error, Local, Tunnel};
use futures_util::{Stream, StreamExt};

/// Items produced so far by this agent's producers.
static PRODUCED: AtomicU64 = AtomicU64::new(0);
/// Set when a producer of this agent was dropped.
static DROPPED: AtomicBool = AtomicBool::new(false);

fn produced() -> u64 {
    PRODUCED.load(Ordering::SeqCst)
}

fn dropped() -> bool {
    DROPPED.load(Ordering::SeqCst)
}

/// Counts up from 0 for ever, counting what it produced; marks its drop.
struct Counter(u64);

impl Iterator for Counter {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        PRODUCED.fetch_add(1, Ordering::SeqCst);
        self.0 += 1;
        Some(self.0 - 1)
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        DROPPED.store(true, Ordering::SeqCst);
    }
}

fn count_forever() -> Counter {
    Counter(0)
}

fn range(n: u64) -> std::ops::Range<u64> {
    0..n
}

/// Yields `first`, then blocks for `hold_ms` before it ends.
fn first_then_hold(first: String, hold_ms: u64) -> impl Iterator<Item = String> {
    std::iter::once(first).chain(std::iter::from_fn(move || {
        std::thread::sleep(Duration::from_millis(hold_ms));
        None
    }))
}

fn panics_after(n: u64) -> impl Iterator<Item = u64> {
    (0..).inspect(move |&i| assert!(i < n, "the producer gave up at {i}"))
}

fn big_items(count: usize, len: usize) -> impl Iterator<Item = Vec<u8>> {
    (0..count).map(move |i| vec![i as u8; len])
}

/// One item every `every_ms` for ever.
fn slowly(every_ms: u64) -> impl Iterator<Item = u64> {
    (0..).inspect(move |_| std::thread::sleep(Duration::from_millis(every_ms)))
}

/// An async stream of `n` items, one per millisecond; marks its drop.
fn ticks(n: u64) -> impl Stream<Item = u64> {
    struct Marker;
    impl Drop for Marker {
        fn drop(&mut self) {
            DROPPED.store(true, Ordering::SeqCst);
        }
    }
    futures_util::stream::unfold((0, Marker), move |(i, marker)| async move {
        if i == n {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        PRODUCED.fetch_add(1, Ordering::SeqCst);
        Some((i, (i + 1, marker)))
    })
}

fn three_words() -> impl Stream<Item = String> {
    futures_util::stream::iter(["a", "b", "c"].map(String::from))
}

/// Waits (at most 10 s) until the agent of `tun` has dropped a producer.
async fn until_dropped(tun: &Tunnel) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !tun.call(dropped, ()).await.expect("dropped") {
        assert!(Instant::now() < deadline, "the producer was never dropped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn local() -> Tunnel {
    Tunnel::builder(Local::new())
        .stderr(chopsticks::stderr::discard())
        .build()
}

async fn within<F: std::future::Future>(bound: Duration, what: &str, work: F) -> F::Output {
    tokio::time::timeout(bound, work)
        .await
        .unwrap_or_else(|_| panic!("{what} took over {bound:?}"))
}

async fn items_in_order(tun: &Tunnel) {
    let items: Vec<u64> = tun
        .call_stream(range, (10_000,))
        .map(|item| item.expect("item"))
        .collect()
        .await;
    assert_eq!(items, (0..10_000).collect::<Vec<_>>());
    let empty: Vec<u64> = tun
        .call_stream(range, (0,))
        .map(|item| item.expect("item"))
        .collect()
        .await;
    assert!(empty.is_empty());
    let words: Vec<String> = tun
        .call_stream_async(three_words, ())
        .map(|item| item.expect("item"))
        .collect()
        .await;
    assert_eq!(words, ["a", "b", "c"]);
}

async fn first_item_before_the_end(tun: &Tunnel) {
    let started = Instant::now();
    let mut stream = tun.call_stream(first_then_hold, ("first".to_string(), 60_000));
    let first = within(Duration::from_secs(20), "the first item", stream.next()).await;
    assert_eq!(first.expect("an item").expect("ok"), "first");
    assert!(started.elapsed() < Duration::from_secs(30));
    // Still running on the agent; other calls on the tunnel answer meanwhile.
    let answered = Instant::now();
    assert!(!tun.call(dropped, ()).await.expect("call"));
    assert!(answered.elapsed() < Duration::from_secs(2));
}

async fn a_panic_mid_stream_names_host_function_and_count(tun: &Tunnel) {
    let mut stream = tun.call_stream(panics_after, (3,));
    for expected in 0..3 {
        assert_eq!(stream.next().await.expect("item").expect("ok"), expected);
    }
    let error = stream
        .next()
        .await
        .expect("the failure")
        .expect_err("a panic");
    assert!(matches!(error, Error::Remote { .. }), "{error:?}");
    let text = error.to_string();
    assert!(text.contains(tun.host()), "{text}");
    assert!(text.contains("panics_after"), "{text}");
    assert!(text.contains("gave up at 3"), "{text}");
    assert!(text.contains("after 3 items"), "{text}");
    assert!(stream.next().await.is_none(), "nothing after the error");
    assert_eq!(tun.call(produced, ()).await.expect("still serving"), 0);
}

#[tokio::test]
async fn items_arrive_in_order_and_the_first_before_the_function_ends() {
    let tun = local();
    items_in_order(&tun).await;
    first_item_before_the_end(&tun).await;
}

#[tokio::test]
async fn a_panic_mid_stream_ends_it_with_an_error_naming_what_came_before() {
    a_panic_mid_stream_names_host_function_and_count(&local()).await;
}

#[tokio::test]
async fn a_slow_consumer_holds_an_infinite_producer_back() {
    held_back(&local()).await;
}

async fn held_back(tun: &Tunnel) {
    let mut stream = tun.call_stream(count_forever, ());
    for expected in 0..1000 {
        assert_eq!(stream.next().await.expect("item").expect("ok"), expected);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let held = tun.call(produced, ()).await.expect("produced");
    let pid = tun.agent_pid().expect("connected");
    let rss_before = rss_kib(pid);
    // Reading one item per millisecond: the producer only keeps pace.
    for expected in 1000..3000 {
        assert_eq!(stream.next().await.expect("item").expect("ok"), expected);
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = tun.call(produced, ()).await.expect("produced");
    let rss_after = rss_kib(pid);
    // A u64 item takes 5 to 13 bytes: the window and the unsent buffer
    // hold at most about 600 KiB of them.
    let bound = (chopsticks_core::__private::flow::WINDOW
        + chopsticks_core::__private::flow::BUFFERED_LEN as u64)
        / 5;
    assert!(held < 1000 + bound, "produced {held} with 1000 taken");
    assert!(later < 3000 + bound, "produced {later} with 3000 taken");
    assert!(
        later - held <= 2000 + 2 * bound / 10,
        "the producer ran ahead: {held} then {later}"
    );
    crate::support::figure(
        "agent RSS with a held infinite producer (KiB)",
        (rss_before, rss_after),
    );
    assert!(
        rss_after < rss_before + 8 * 1024,
        "the agent grew from {rss_before} KiB to {rss_after} KiB"
    );
    // Calls still answer at once while the stream is held.
    let started = Instant::now();
    assert_eq!(tun.call(range_len, (5,)).await.expect("call"), 5);
    assert!(started.elapsed() < Duration::from_secs(1));
}

fn range_len(n: u64) -> u64 {
    range(n).count() as u64
}

#[tokio::test]
async fn dropping_the_stream_stops_and_drops_the_producer() {
    let tun = local();
    let mut stream = tun.call_stream(count_forever, ());
    assert_eq!(stream.next().await.expect("item").expect("ok"), 0);
    drop(stream);
    until_dropped(&tun).await;
    let stopped = tun.call(produced, ()).await.expect("produced");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        tun.call(produced, ()).await.expect("produced"),
        stopped,
        "the iterator was advanced after the drop"
    );
}

#[tokio::test]
async fn dropping_an_async_stream_aborts_it() {
    let tun = local();
    let mut stream = tun.call_stream_async(ticks, (1_000_000,));
    for expected in 0..5 {
        assert_eq!(stream.next().await.expect("item").expect("ok"), expected);
    }
    drop(stream);
    until_dropped(&tun).await;
    let stopped = tun.call(produced, ()).await.expect("produced");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(tun.call(produced, ()).await.expect("produced"), stopped);
    let all: Vec<u64> = tun
        .call_stream_async(ticks, (20,))
        .map(|item| item.expect("item"))
        .collect()
        .await;
    assert_eq!(all, (0..20).collect::<Vec<_>>());
}

#[tokio::test]
async fn cancel_races_leave_the_tunnel_serving() {
    let tun = local();
    for round in 0..50u64 {
        // Dropped before the first item: polled once, then gone.
        let mut early = tun.call_stream(range, (1000,));
        let _ = tokio::time::timeout(Duration::ZERO, early.next()).await;
        drop(early);
        // Dropped during the last item.
        let mut late = tun.call_stream(range, (3,));
        for expected in 0..3 {
            assert_eq!(late.next().await.expect("item").expect("ok"), expected);
        }
        drop(late);
        // Never polled: nothing was sent.
        drop(tun.call_stream(range, (5,)));
        assert_eq!(tun.call(range_len, (round,)).await.expect("call"), round);
    }
}

#[tokio::test]
async fn a_killed_agent_ends_the_stream_with_disconnected() {
    killed_mid_stream(&local()).await;
}

async fn killed_mid_stream(tun: &Tunnel) {
    let mut stream = tun.call_stream(slowly, (5,));
    assert_eq!(stream.next().await.expect("item").expect("ok"), 0);
    let pid = tun.agent_pid().expect("connected");
    // SAFETY: kill has no memory-safety preconditions; pid is our agent.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let error = within(Duration::from_secs(10), "the end of the stream", async {
        loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                Some(Err(error)) => return error,
                None => panic!("the stream ended without an error"),
            }
        }
    })
    .await;
    assert!(matches!(error, Error::Disconnected { .. }), "{error:?}");
    assert!(stream.next().await.is_none());
}

#[tokio::test]
async fn items_larger_than_the_window_and_the_frame_arrive_whole() {
    let tun = local();
    let len = 3 << 20;
    let items: Vec<Vec<u8>> = tun
        .call_stream(big_items, (4, len))
        .map(|item| item.expect("item"))
        .collect()
        .await;
    assert_eq!(items.len(), 4);
    for (i, item) in items.iter().enumerate() {
        assert!(item.len() == len && item.iter().all(|&byte| byte == i as u8));
    }
}

/// `count` pieces of `len` bytes, piece `i` filled with `i`.
fn pieces(count: usize, len: usize) -> impl Iterator<Item = Vec<u8>> {
    (0..count).map(move |i| vec![i as u8; len])
}

#[tokio::test]
async fn a_byte_stream_arrives_whole_and_in_order_as_raw_bytes() {
    let tun = local();
    let mut received = Vec::new();
    let mut stream = tun.call_byte_stream(pieces, (40, 100_003));
    while let Some(piece) = stream.next().await {
        received.extend_from_slice(&piece.expect("piece"));
    }
    let expected: Vec<u8> = pieces(40, 100_003).flatten().collect();
    assert_eq!(received.len(), expected.len());
    assert!(received == expected, "the bytes differ");
    // Dropped mid-stream, it stops the iterator like any stream.
    let mut endless = tun.call_byte_stream(count_forever_bytes, ());
    assert!(!endless.next().await.expect("piece").expect("ok").is_empty());
    drop(endless);
    until_dropped(&tun).await;
}

fn count_forever_bytes() -> impl Iterator<Item = String> {
    count_forever().map(|n| format!("{n}\n"))
}

#[tokio::test]
async fn thousands_of_streams_run_at_once_on_one_tunnel() {
    let tun = local();
    let streams = (0..2000u64).map(|i| {
        tun.call_stream_async(ticks, (3,))
            .map(move |item| (i, item.expect("item")))
            .collect::<Vec<_>>()
    });
    let all = within(
        Duration::from_secs(60),
        "2000 streams",
        futures_util::future::join_all(streams),
    )
    .await;
    for (i, items) in all.into_iter().enumerate() {
        assert_eq!(items, vec![(i as u64, 0), (i as u64, 1), (i as u64, 2)]);
    }
}

/// A number the controller's side accepts only below 3 (its Deserialize checks).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "u64", into = "u64")]
struct Small(u64);

impl TryFrom<u64> for Small {
    type Error = String;
    fn try_from(value: u64) -> Result<Small, String> {
        if value < 3 {
            Ok(Small(value))
        } else {
            Err(format!("{value} is not small"))
        }
    }
}

impl From<Small> for u64 {
    fn from(small: Small) -> u64 {
        small.0
    }
}

fn not_all_small() -> impl Iterator<Item = Small> {
    (0..5).map(Small)
}

#[tokio::test]
async fn an_item_that_does_not_decode_is_a_value_error_naming_it() {
    let tun = local();
    let mut stream = tun.call_stream(not_all_small, ());
    for expected in 0..3 {
        assert_eq!(stream.next().await.expect("item").expect("ok").0, expected);
    }
    let error = stream
        .next()
        .await
        .expect("an item")
        .expect_err("not small");
    match &error {
        Error::Value { what, .. } => assert_eq!(*what, chopsticks::ValuePart::Item(3)),
        other => panic!("{other:?}"),
    }
    assert!(error.to_string().contains("3 is not small"), "{error}");
    assert!(stream.next().await.is_none(), "nothing after the error");
}

/// How this agent behaves in `paced`: 0 fast, 1 slow, 2 dies.
static BEHAVIOUR: AtomicU64 = AtomicU64::new(0);

fn behave(how: u64) {
    BEHAVIOUR.store(how, Ordering::SeqCst);
}

/// `count` items; a slow agent holds after the first, a dying one exits.
fn paced(count: u64) -> impl Iterator<Item = u64> {
    (0..count).inspect(|&i| {
        if i == 1 {
            match BEHAVIOUR.load(Ordering::SeqCst) {
                1 => std::thread::sleep(Duration::from_secs(120)),
                2 => std::process::exit(9),
                _ => {}
            }
        }
    })
}

#[tokio::test]
async fn a_group_stream_merges_64_hosts_and_one_slow_or_dead_host_stalls_none() {
    let names: Vec<String> = (0..64).map(|i| format!("h{i:02}")).collect();
    let group = chopsticks::Group::new(names.iter().map(|name| {
        Tunnel::builder(Local::named(name.as_str()))
            .stderr(chopsticks::stderr::discard())
            .build()
    }))
    .expect("group");
    let slow = group.get("h07").expect("h07");
    slow.call(behave, (1,)).await.expect("slow");
    let dying = group.get("h13").expect("h13");
    dying.call(behave, (2,)).await.expect("dying");
    let started = Instant::now();
    let mut stream = group.call_stream(paced, (5,));
    let mut items: std::collections::BTreeMap<&str, Vec<u64>> = Default::default();
    let mut failures = Vec::new();
    let fast_done = |items: &std::collections::BTreeMap<&str, Vec<u64>>| {
        names
            .iter()
            .filter(|name| !["h07", "h13"].contains(&name.as_str()))
            .all(|name| items.get(name.as_str()).is_some_and(|got| got.len() == 5))
    };
    within(Duration::from_secs(60), "the fast hosts' items", async {
        while !(fast_done(&items) && failures.len() == 1 && items.contains_key("h07")) {
            match stream.next().await {
                Some((host, Ok(item))) => items.entry(host).or_default().push(item),
                Some((host, Err(error))) => failures.push((host, error)),
                None => panic!("the merged stream ended early"),
            }
        }
    })
    .await;
    crate::support::figure(
        "64 hosts streamed, one slow and one dead, in",
        started.elapsed(),
    );
    for (host, got) in &items {
        match *host {
            "h07" => assert_eq!(got, &[0], "the slow host"),
            "h13" => assert!(got.len() <= 1, "the dead host: {got:?}"),
            _ => assert_eq!(got, &[0, 1, 2, 3, 4], "{host}"),
        }
    }
    let (host, error) = &failures[0];
    assert_eq!(*host, "h13");
    assert!(matches!(error, Error::Disconnected { .. }), "{error:?}");
    assert_eq!(error.host(), "h13");
    drop(stream);
}

#[cfg(feature = "ssh")]
mod over_ssh {
    use super::*;
    use chopsticks_testkit::sshd_or_skip;

    #[tokio::test]
    async fn streams_over_a_real_sshd() {
        let Some(sshd) = sshd_or_skip("streams", 1) else {
            return;
        };
        let tun = crate::ssh::tunnel(&sshd, sshd.alias(0));
        items_in_order(&tun).await;
        first_item_before_the_end(&tun).await;
        a_panic_mid_stream_names_host_function_and_count(&tun).await;
        let mut stream = tun.call_stream(count_forever, ());
        assert_eq!(stream.next().await.expect("item").expect("ok"), 0);
        drop(stream);
        until_dropped(&tun).await;
        // A fresh agent for the held producer: its counters start at 0.
        tun.close().await.expect("close");
        held_back(&tun).await;
        killed_mid_stream(&tun).await;
    }
}

/// Hostile agents: fake ones that say hello, wait for the call, then send
/// `frames`; each case ends the stream and the tunnel with a protocol error.
mod hostile {
    use super::*;
    use bytes::Bytes;
    use chopsticks_core::__private::flow::WINDOW;
    use chopsticks_core::__private::protocol::{Message, Payload};
    use chopsticks_core::__private::wire::{OutFrame, STREAM_FRAME_LEN};

    fn answering(dir: &tempfile::TempDir, frames: &[u8]) -> Tunnel {
        let hello = dir.path().join("hello");
        std::fs::write(
            &hello,
            OutFrame::message(&crate::support::our_hello_message()).to_bytes(),
        )
        .expect("write hello");
        let rest = dir.path().join("rest");
        std::fs::write(&rest, frames).expect("write frames");
        let script = crate::support::speaks_after_the_call(&hello, &rest);
        Tunnel::builder(crate::support::FakeAgent { script })
            .stderr(chopsticks::stderr::discard())
            .build()
    }

    fn item(id: u64, value: u64) -> Vec<u8> {
        let encoded = chopsticks_core::__private::protocol::encode_value(&value).expect("encode");
        let mut data = (encoded.len() as u32).to_be_bytes().to_vec();
        data.extend(encoded);
        OutFrame::stream(id, Bytes::from(data)).to_bytes()
    }

    fn end(id: u64, items: u64) -> Vec<u8> {
        OutFrame::message(&Message::Return {
            id,
            value: Payload::Inline(
                chopsticks_core::__private::protocol::encode_value(&items).expect("encode"),
            ),
        })
        .to_bytes()
    }

    fn stream_ref<F: chopsticks::RemoteFn<()>>(
        _function: F,
    ) -> chopsticks_core::__private::protocol::FunctionRef
    where
        F::Output: IntoIterator,
        <F::Output as IntoIterator>::Item: serde::Serialize,
    {
        chopsticks_core::__private::remote::stream_function_ref_of::<F, ()>()
    }

    async fn stream_error(tun: &Tunnel) -> Error {
        let mut stream = tun.call_stream(range, (10,));
        within(Duration::from_secs(10), "the hostile stream", async {
            loop {
                match stream.next().await {
                    Some(Ok(_)) => continue,
                    Some(Err(error)) => return error,
                    None => panic!("the stream ended without an error"),
                }
            }
        })
        .await
    }

    #[tokio::test]
    async fn stream_data_for_an_unknown_request_is_a_protocol_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tun = answering(&dir, &item(77, 1));
        let error = stream_error(&tun).await;
        assert!(matches!(error, Error::Protocol { .. }), "{error:?}");
        assert!(error.to_string().contains("request 77"), "{error}");
    }

    #[tokio::test]
    async fn stream_data_beyond_the_window_is_a_protocol_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Frames full of valid items (the u64 0), more than a window of
        // them; each frame under a credit step, so taking one gives nothing back.
        let frame_len =
            (chopsticks_core::__private::flow::GRANT_STEP as usize - 1).min(STREAM_FRAME_LEN);
        let items: Vec<u8> = [0, 0, 0, 1, 0x00].repeat(frame_len / 5);
        let mut frames = Vec::new();
        let mut sent = 0;
        while sent <= WINDOW as usize {
            frames.extend(OutFrame::stream(1, Bytes::from(items.clone())).to_bytes());
            sent += items.len();
        }
        let tun = answering(&dir, &frames);
        // The consumer takes one item and no more, so it gives no credit back.
        let mut stream = tun.call_stream(range, (10,));
        assert_eq!(stream.next().await.expect("item").expect("ok"), 0);
        let error = within(
            Duration::from_secs(10),
            "the violation",
            tun.call(range_len, (1,)),
        )
        .await
        .expect_err("the tunnel is broken");
        assert!(matches!(error, Error::Protocol { .. }), "{error:?}");
        assert!(error.to_string().contains("credit"), "{error}");
    }

    #[tokio::test]
    async fn items_after_the_end_are_a_protocol_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut frames = item(1, 5);
        frames.extend(end(1, 1));
        frames.extend(item(1, 6));
        let tun = answering(&dir, &frames);
        let items: Vec<_> = tun.call_stream(range, (10,)).collect().await;
        assert!(
            matches!(
                items.as_slice(),
                [Ok(5)] | [Ok(5), Err(Error::Protocol { .. })]
            ),
            "{items:?}"
        );
        let error = tun
            .call(range_len, (1,))
            .await
            .expect_err("the tunnel is broken");
        assert!(matches!(error, Error::Protocol { .. }), "{error:?}");
        assert!(error.to_string().contains("no open stream"), "{error}");
    }

    #[tokio::test]
    async fn a_stream_that_ends_inside_an_item_is_a_protocol_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut frames = OutFrame::stream(1, Bytes::from_static(&[0, 0, 0, 9, 1, 2])).to_bytes();
        frames.extend(end(1, 1));
        let tun = answering(&dir, &frames);
        let error = stream_error(&tun).await;
        assert!(matches!(error, Error::Protocol { .. }), "{error:?}");
        assert!(error.to_string().contains("inside an item"), "{error}");
    }

    /// A hostile controller: credit beyond the limit, and stream data for a
    /// call that takes none, make a real agent exit with status 2.
    #[tokio::test]
    async fn a_real_agent_refuses_credit_overflow_and_unasked_input() {
        for frame in [
            OutFrame::message(&Message::Credit {
                id: 1,
                bytes: u64::MAX,
            }),
            OutFrame::stream(1, Bytes::from_static(b"unasked")),
        ] {
            let mut agent = crate::support::RawAgent::start().await;
            let call = crate::support::raw_call(
                1,
                &stream_ref(count_forever),
                chopsticks_core::__private::protocol::CallMode::BlockingStream,
                &chopsticks_core::__private::protocol::encode_value(&()).expect("encode"),
            );
            agent.send(&call).await;
            // The stream runs (its first data came) before the hostile frame.
            loop {
                match agent.next().await {
                    chopsticks_core::__private::wire::Frame::Stream { id: 1, .. } => break,
                    chopsticks_core::__private::wire::Frame::Message(Message::Heartbeat) => {}
                    other => panic!("the stream did not start: {other:?}"),
                }
            }
            agent.send(&frame.to_bytes()).await;
            let status = agent.exit_status(Duration::from_secs(10)).await;
            assert_eq!(status.code(), Some(2), "{status:?}");
        }
    }
}

/// `tracing` events of remote functions at the controller's subscriber.
mod traced {
    use std::sync::{Arc, Mutex};

    use chopsticks::{Local, Tunnel};
    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Level, Metadata, Subscriber};

    /// Emits two wanted events and `2 * fine` finer ones; returns whether
    /// trace events were enabled and how many events the agent sent.
    fn traced(fine: u64) -> (bool, u64) {
        let forwarded = || {
            chopsticks_core::__private::trace::EVENTS_FORWARDED
                .load(std::sync::atomic::Ordering::SeqCst)
        };
        let before = forwarded();
        tracing::info!(answer = 42, user = "ops", "hello from the agent");
        for i in 0..fine {
            tracing::trace!(i, "too fine to cross");
            tracing::debug!("also too fine");
        }
        tracing::warn!(target: "app::disk", free = 3, "low space");
        (tracing::enabled!(Level::TRACE), forwarded() - before)
    }

    async fn nested_traced() -> Result<(bool, u64), String> {
        let inner = Tunnel::builder(Local::named("inner"))
            .stderr(chopsticks::stderr::discard())
            .build();
        inner
            .call(traced, (10,))
            .await
            .map_err(|error| error.to_string())
    }

    /// One captured event: level and its fields by name.
    #[derive(Debug, Clone)]
    struct Captured {
        level: Level,
        fields: Vec<(String, String)>,
    }

    impl Captured {
        fn field(&self, name: &str) -> &str {
            self.fields
                .iter()
                .find(|(field, _)| field == name)
                .map(|(_, value)| value.as_str())
                .unwrap_or("")
        }
    }

    /// Records the events of `chopsticks::agent` up to INFO.
    struct Capture(Arc<Mutex<Vec<Captured>>>);

    struct Values(Vec<(String, String)>);

    impl Visit for Values {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.0
                .push((field.name().to_string(), format!("{value:?}")));
        }
    }

    impl Subscriber for Capture {
        fn enabled(&self, metadata: &Metadata<'_>) -> bool {
            metadata.target() == "chopsticks::agent" && *metadata.level() <= Level::INFO
        }
        fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
            Some(tracing::level_filters::LevelFilter::INFO)
        }
        fn new_span(&self, _span: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _span: &Id, _values: &Record<'_>) {}
        fn record_follows_from(&self, _span: &Id, _follows: &Id) {}
        fn event(&self, event: &Event<'_>) {
            let mut values = Values(Vec::new());
            event.record(&mut values);
            self.0.lock().expect("lock").push(Captured {
                level: *event.metadata().level(),
                fields: values.0,
            });
        }
        fn enter(&self, _span: &Id) {}
        fn exit(&self, _span: &Id) {}
    }

    #[tokio::test]
    async fn agent_events_reach_the_subscriber_with_their_host_and_finer_ones_never_cross() {
        let captured = Arc::new(Mutex::new(Vec::new()));
        let _subscriber = tracing::subscriber::set_default(Capture(captured.clone()));
        let tun = Tunnel::builder(Local::named("outer"))
            .stderr(chopsticks::stderr::discard())
            .build();
        let (trace_enabled, sent) = tun.call(traced, (1000,)).await.expect("call");
        assert!(
            !trace_enabled,
            "the agent enabled trace events nobody wants"
        );
        assert_eq!(sent, 2, "2000 finer events must not cross the pipe");
        let events = captured.lock().expect("lock").clone();
        assert_eq!(events.len(), 2, "{events:?}");
        let (info, warn) = (&events[0], &events[1]);
        assert_eq!(info.level, Level::INFO);
        assert_eq!(info.field("host"), "outer");
        assert_eq!(info.field("message"), "hello from the agent");
        assert!(info.field("remote_target").contains("streams"), "{info:?}");
        assert_eq!(info.field("fields"), "answer=42 user=ops");
        assert_eq!(warn.level, Level::WARN);
        assert_eq!(warn.field("remote_target"), "app::disk");
        assert_eq!(warn.field("fields"), "free=3");

        // A nested agent's events come through the outer one, with both hosts.
        captured.lock().expect("lock").clear();
        let nested = tun
            .call_async(nested_traced, ())
            .await
            .expect("call")
            .expect("nested");
        assert_eq!(nested, (false, 2));
        let events = captured.lock().expect("lock").clone();
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[0].field("host"), "outer > inner");
        assert_eq!(events[0].field("message"), "hello from the agent");
        assert_eq!(events[1].field("remote_target"), "app::disk");
    }

    #[cfg(feature = "ssh")]
    #[tokio::test]
    async fn agent_events_over_a_real_sshd() {
        let Some(sshd) = chopsticks_testkit::sshd_or_skip("traced", 1) else {
            return;
        };
        let captured = Arc::new(Mutex::new(Vec::new()));
        let _subscriber = tracing::subscriber::set_default(Capture(captured.clone()));
        let tun = crate::ssh::tunnel(&sshd, sshd.alias(0));
        assert_eq!(tun.call(traced, (100,)).await.expect("call"), (false, 2));
        let events = captured.lock().expect("lock").clone();
        assert_eq!(events.len(), 2, "{events:?}");
        assert_eq!(events[0].field("host"), sshd.alias(0));
        assert_eq!(events[1].field("message"), "low space");
    }
}
