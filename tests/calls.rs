//! Calling functions: arities, closures, async functions, concurrency, large payloads, nesting.

use std::time::Duration;

use chopsticks::{Local, Tunnel};
use serde::{Deserialize, Serialize};

fn zero() -> u8 {
    7
}
fn add3(a: i64, b: i64, c: i64) -> i64 {
    a + b + c
}
#[allow(clippy::too_many_arguments)]
fn eight(a: u8, b: u16, c: u32, d: u64, e: i8, f: i16, g: i32, h: i64) -> String {
    format!("{a} {b} {c} {d} {e} {f} {g} {h}")
}
/// Not commutative: swapped arguments give another result.
fn place3(a: i64, b: i64, c: i64) -> i64 {
    a * 100 + b * 10 + c
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Inventory {
    name: String,
    tags: Vec<String>,
    size: Option<u64>,
}

fn describe(inventory: Inventory) -> String {
    format!("{} has {} tags", inventory.name, inventory.tags.len())
}

async fn double_later(x: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(10)).await;
    x * 2
}

#[tokio::test]
async fn arities_zero_to_eight_and_structs() {
    let tun = Tunnel::new(Local::new());
    assert_eq!(tun.host(), "localhost");
    assert_eq!(tun.call(zero, ()).await.expect("zero"), 7);
    assert_eq!(tun.call(add3, (1, 2, 39)).await.expect("add3"), 42);
    assert_eq!(tun.call(place3, (1, 2, 3)).await.expect("place3"), 123);
    assert_eq!(
        tun.call(eight, (1, 2, 3, 4, -1, -2, -3, -4))
            .await
            .expect("eight"),
        "1 2 3 4 -1 -2 -3 -4"
    );
    let inventory = Inventory {
        name: "web1".into(),
        tags: vec!["a".into(), "b".into()],
        size: None,
    };
    assert_eq!(
        tun.call(describe, (inventory,)).await.expect("describe"),
        "web1 has 2 tags"
    );
    let echoed: Inventory = tun
        .call(
            |x: Inventory| x,
            (Inventory {
                name: "n".into(),
                tags: vec![],
                size: Some(3),
            },),
        )
        .await
        .expect("closure");
    assert_eq!(echoed.size, Some(3));
}

#[tokio::test]
async fn the_agent_is_another_process_of_this_program() {
    let tun = Tunnel::new(Local::named("x"));
    assert_eq!(tun.host(), "x");
    let pid: u32 = tun.call(std::process::id, ()).await.expect("pid");
    assert_ne!(pid, std::process::id());
    assert_eq!(tun.agent_pid(), Some(pid));
    let exe = tun
        .call(
            || {
                std::fs::read_link("/proc/self/exe")
                    .map(|p| p.display().to_string())
                    .ok()
            },
            (),
        )
        .await
        .expect("exe");
    assert_eq!(
        exe,
        std::fs::read_link("/proc/self/exe")
            .ok()
            .map(|p| p.display().to_string())
    );
}

#[tokio::test]
async fn async_functions_run_on_the_agent_runtime() {
    let tun = Tunnel::new(Local::new());
    assert_eq!(
        tun.call_async(double_later, (21,)).await.expect("async"),
        42
    );
    let closure = tun
        .call_async(
            |name: String| async move { format!("hello {name}") },
            ("you".to_string(),),
        )
        .await
        .expect("async closure");
    assert_eq!(closure, "hello you");
}

/// Waits on the agent until all `count` calls have arrived; returns the agent's pid.
fn meet(dir: std::path::PathBuf, name: String, count: usize) -> Option<u32> {
    crate::support::rendezvous(dir, name, count).then(std::process::id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_blocking_calls_overlap_on_one_tunnel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let tun = Tunnel::new(Local::new());
    tun.connect().await.expect("connect");
    let mut tasks = Vec::new();
    for index in 0..16 {
        let tun = tun.clone();
        let dir = dir.path().to_path_buf();
        tasks.push(tokio::spawn(async move {
            tun.call(meet, (dir, format!("call-{index}"), 16)).await
        }));
    }
    let mut pids = Vec::new();
    for task in tasks {
        let pid = task.await.expect("join").expect("call");
        pids.push(pid.expect("all 16 calls were running at once"));
    }
    pids.dedup();
    assert_eq!(pids.len(), 1, "all calls ran in one agent");
}

fn byte_sum(data: serde_bytes::ByteBuf) -> (u64, u64) {
    (data.len() as u64, data.iter().map(|&b| b as u64).sum())
}

fn make_bytes(len: usize) -> serde_bytes::ByteBuf {
    serde_bytes::ByteBuf::from((0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
}

fn echo_vec(data: Vec<u8>) -> Vec<u8> {
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_arguments_and_results_do_not_block_other_calls() {
    const LEN: usize = 64 << 20;
    let tun = Tunnel::new(Local::new());
    tun.connect().await.expect("connect");
    let big = make_bytes(LEN);
    let expected_sum: u64 = big.iter().map(|&b| b as u64).sum();
    let bulk_tun = tun.clone();
    let bulk = tokio::spawn(async move {
        let sums = bulk_tun.call(byte_sum, (big,)).await.expect("big argument");
        let back = bulk_tun.call(make_bytes, (LEN,)).await.expect("big result");
        (sums, back.len())
    });
    // Small calls keep answering while 64 MiB moves each way: several
    // complete before the bulk calls do. (How fast is `benches/latency.rs`.)
    let mut pings = 0;
    while !bulk.is_finished() {
        let ping = tokio::time::timeout(crate::support::EVENT_BOUND, tun.call(add3, (1, 1, 1)));
        assert_eq!(ping.await.expect("a ping answered").expect("ping"), 3);
        pings += 1;
    }
    let ((len, sum), back) = bulk.await.expect("join");
    assert_eq!((len, sum, back), (LEN as u64, expected_sum, LEN));
    assert!(
        pings > 1,
        "only {pings} ping(s) answered during the transfer"
    );

    let plain: Vec<u8> = (0..(2 << 20)).map(|i| (i % 7) as u8).collect();
    assert_eq!(
        tun.call(echo_vec, (plain.clone(),))
            .await
            .expect("vec echo"),
        plain
    );
}

async fn nested_pid() -> Result<(u32, u32), String> {
    let inner = Tunnel::new(Local::named("inner"));
    let inner_pid = inner
        .call(std::process::id, ())
        .await
        .map_err(|e| e.to_string())?;
    Ok((std::process::id(), inner_pid))
}

#[tokio::test]
async fn a_remote_function_can_open_its_own_tunnels() {
    let tun = Tunnel::new(Local::named("outer"));
    let (outer, inner) = tun
        .call_async(nested_pid, ())
        .await
        .expect("call")
        .expect("nested");
    assert_ne!(outer, std::process::id());
    assert_ne!(inner, outer);
    assert_ne!(inner, std::process::id());
}

#[tokio::test]
async fn connect_is_lazy_and_tunnels_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync + Clone>() {}
    assert_send_sync::<Tunnel>();
    let tun = Tunnel::new(Local::new());
    assert!(!tun.is_connected());
    assert_eq!(tun.agent_pid(), None);
    tun.call(zero, ()).await.expect("call");
    assert!(tun.is_connected());
}

fn nested_from_blocking() -> Result<u32, String> {
    // Blocking functions run inside the agent's runtime context, so they can use tokio.
    tokio::runtime::Handle::current().block_on(async {
        let inner = Tunnel::new(Local::named("inner-blocking"));
        inner
            .call(std::process::id, ())
            .await
            .map_err(|e| e.to_string())
    })
}

#[tokio::test]
async fn a_blocking_function_can_use_the_agent_runtime() {
    let tun = Tunnel::new(Local::new());
    let outer = tun.call(std::process::id, ()).await.expect("pid");
    let inner = tun
        .call(nested_from_blocking, ())
        .await
        .expect("call")
        .expect("nested");
    assert_ne!(inner, outer);
}

fn sleep_ms(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_call_does_not_stop_the_agent_from_reading() {
    let dir = tempfile::tempdir().expect("tempdir");
    let release = dir.path().join("release");
    let tun = Tunnel::new(Local::new());
    tun.connect().await.expect("connect");
    // A lone call runs on the agent's reading thread; the watchdog must hand
    // reading on. This one holds its thread until the pings below answered.
    let long_tun = tun.clone();
    let held = release.clone();
    let long = tokio::spawn(async move {
        long_tun
            .call(crate::support::hold_until_exists, (held,))
            .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    for _ in 0..5 {
        let ping = tokio::time::timeout(crate::support::EVENT_BOUND, tun.call(sleep_ms, (0,)));
        assert_eq!(ping.await.expect("a ping answered").expect("ping"), 0);
    }
    assert!(!long.is_finished(), "the long call should still be held");
    std::fs::write(&release, b"").expect("release");
    assert!(
        long.await.expect("join").expect("long call"),
        "the long call was never released"
    );
}
