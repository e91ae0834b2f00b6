//! Small calls behind bulk data: the latency of one small call at a time
//! (p50, p99, maximum) on an idle tunnel, while four 100 MB values move
//! through the same tunnel (as arguments and as results), and while four
//! 100 MB files are put and fetched through it. Prints a Markdown table.
//! The bulk values are built off the runtime (`spawn_blocking`), as a careful
//! program builds 100 MB; what runs on the runtime's workers is chopsticks'
//! own work (encoding, decoding, routing, file I/O).
//!
//! Run with `cargo bench --bench latency`, pinned with
//! `taskset -c 0 cargo bench --bench latency`; add `--features ssh` and the
//! argument `ssh` to measure over the test kit's loopback sshd as well.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use chopsticks::{Local, Tunnel};

const BULK: usize = 100_000_000;
const STREAMS: usize = 4;
const WINDOW: Duration = Duration::from_secs(6);

fn small() -> u8 {
    1
}

fn take(data: Vec<u8>) -> usize {
    data.len()
}

fn give(len: usize) -> Vec<u8> {
    vec![5u8; len]
}

#[derive(Clone, Copy)]
enum Bulk {
    Idle,
    Arguments,
    Results,
    Puts,
    Fetches,
}

impl Bulk {
    fn label(self) -> &'static str {
        match self {
            Bulk::Idle => "idle",
            Bulk::Arguments => "4 × 100 MB arguments moving",
            Bulk::Results => "4 × 100 MB results moving",
            Bulk::Puts => "4 × 100 MB puts moving",
            Bulk::Fetches => "4 × 100 MB fetches moving",
        }
    }
}

/// Keeps `kind` of bulk traffic moving through `tunnel` until `stop`; returns how many bulk operations finished.
async fn keep_moving(
    tunnel: Tunnel,
    kind: Bulk,
    index: usize,
    dir: Arc<tempfile::TempDir>,
    stop: Arc<AtomicBool>,
) -> usize {
    let local = dir.path().join(format!("source-{index}"));
    let remote = dir.path().join(format!("target-{index}"));
    let fetched = dir.path().join(format!("fetched-{index}"));
    let mut done = 0;
    while !stop.load(Ordering::Relaxed) {
        let outcome = match kind {
            Bulk::Idle => return 0,
            Bulk::Arguments => {
                // Built off the runtime, as a careful program builds 100 MB.
                let data = tokio::task::spawn_blocking(|| vec![3u8; BULK])
                    .await
                    .expect("argument");
                tunnel.call(take, (data,)).await.map(drop)
            }
            Bulk::Results => tunnel.call(give, (BULK,)).await.map(drop),
            Bulk::Puts => tunnel.put(&local, &remote).await.map(drop),
            Bulk::Fetches => tunnel.fetch(&local, &fetched).await.map(drop),
        };
        if let Err(error) = outcome {
            panic!("{}: {error}", kind.label());
        }
        done += 1;
    }
    done
}

struct Figures {
    calls: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
    bulk: usize,
}

async fn measure(tunnel: &Tunnel, kind: Bulk, dir: &Arc<tempfile::TempDir>) -> Figures {
    let stop = Arc::new(AtomicBool::new(false));
    let movers: Vec<_> = (0..STREAMS)
        .map(|index| {
            tokio::spawn(keep_moving(
                tunnel.clone(),
                kind,
                index,
                dir.clone(),
                stop.clone(),
            ))
        })
        .collect();
    // Let the bulk traffic start before measuring.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut samples = Vec::new();
    let started = Instant::now();
    while started.elapsed() < WINDOW {
        let call = Instant::now();
        tunnel.call(small, ()).await.expect("small call");
        samples.push(call.elapsed());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut bulk = 0;
    for mover in movers {
        bulk += mover.await.expect("mover");
    }
    samples.sort();
    let at = |quantile: f64| samples[((samples.len() - 1) as f64 * quantile) as usize];
    Figures {
        calls: samples.len(),
        p50: at(0.50),
        p99: at(0.99),
        max: samples[samples.len() - 1],
        bulk,
    }
}

async fn report(transport: &str, tunnel: &Tunnel, dir: &Arc<tempfile::TempDir>) {
    for kind in [
        Bulk::Idle,
        Bulk::Arguments,
        Bulk::Results,
        Bulk::Puts,
        Bulk::Fetches,
    ] {
        let figures = measure(tunnel, kind, dir).await;
        println!(
            "| {transport} | {} | {} | {:.0?} | {:.2?} | {:.2?} | {} |",
            kind.label(),
            figures.calls,
            figures.p50,
            figures.p99,
            figures.max,
            figures.bulk
        );
    }
}

#[tokio::main]
async fn main() {
    let over_ssh = std::env::args().any(|argument| argument == "ssh");
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let block = vec![9u8; 1 << 20];
    for index in 0..STREAMS {
        let mut content = Vec::with_capacity(BULK);
        while content.len() < BULK {
            content.extend_from_slice(&block[..(BULK - content.len()).min(block.len())]);
        }
        std::fs::write(dir.path().join(format!("source-{index}")), content).expect("source");
    }
    // The test kit's sshd logs in as another user, who reads the sources and writes targets here.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    for index in 0..STREAMS {
        let source = dir.path().join(format!("source-{index}"));
        std::fs::set_permissions(source, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    }
    println!("| transport | bulk traffic | small calls | p50 | p99 | max | bulk operations |");
    println!("|---|---|---|---|---|---|---|");
    let local = Tunnel::new(Local::new());
    local.connect().await.expect("connect");
    report("local", &local, &dir).await;
    local.close().await.expect("close");
    if over_ssh {
        ssh(&dir).await;
    }
}

#[cfg(feature = "ssh")]
async fn ssh(dir: &Arc<tempfile::TempDir>) {
    let sshd = chopsticks_testkit::Sshd::start("latency-bench", 1).expect("test-kit sshd");
    let tunnel = Tunnel::new(chopsticks::Ssh::new(sshd.alias(0)).config_file(sshd.client_config()));
    tunnel.connect().await.expect("connect over ssh");
    report("ssh", &tunnel, dir).await;
    tunnel.close().await.expect("close");
}

#[cfg(not(feature = "ssh"))]
async fn ssh(_dir: &Arc<tempfile::TempDir>) {
    eprintln!("the ssh rows need --features ssh");
}
