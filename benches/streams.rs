//! Criterion benchmarks of streaming calls, each beside its floor in the same run.
//!
//! - `items_u64`: 1,000,000 `u64` items from an iterator (and from an async
//!   `Stream`) on one stream, beside 1,000,000 pipelined calls of 256 in
//!   flight, and beside a pipe carrying the same bytes (`head -c`)
//! - `bytes_out`: 256 MiB as a byte stream of 64 KiB pieces
//!   (`call_byte_stream`) and as 64 KiB `ByteBuf` items, beside `cat` of as
//!   many bytes through a pipe
//! - `bytes_in`: 256 MiB fed to a `ByteReceiver` (counted on the agent),
//!   beside writing as many into `cat > /dev/null`
//! - `first_item`: the first item of a fresh stream, beside a trivial call
//!
//! With `--features ssh` the same run over the test kit's sshd, with `ssh
//! HOST head -c` and `ssh HOST cat` as floors.
//!
//! ```text
//! taskset -c 0 cargo bench --bench streams -- --warm-up-time 1 --measurement-time 5
//! cargo bench --features ssh --bench streams -- ssh/
//! ```
//!
//! `STREAMS_MEMORY=1` instead measures memory: agent and controller RSS
//! while a consumer takes one item per millisecond from an infinite
//! producer, after 10 s.

use std::process::Stdio;
use std::time::{Duration, Instant};

use chopsticks::{Local, Tunnel};
use criterion::{BenchmarkId, Criterion, Throughput};
use futures_util::{Stream, StreamExt};
use serde_bytes::ByteBuf;
use tokio::io::AsyncReadExt;

const ITEMS: u64 = 1_000_000;
const BYTES_OUT: u64 = 256 << 20;
const CHUNK: usize = 64 << 10;

fn noop() {}

fn numbers(count: u64) -> std::ops::Range<u64> {
    0..count
}

fn numbers_async(count: u64) -> impl Stream<Item = u64> {
    futures_util::stream::iter(0..count)
}

fn chunks(total: u64, chunk: usize) -> impl Iterator<Item = ByteBuf> {
    let block = vec![0x5au8; chunk];
    (0..total / chunk as u64).map(move |_| ByteBuf::from(block.clone()))
}

fn raw_chunks(total: u64, chunk: usize) -> impl Iterator<Item = bytes::Bytes> {
    let block = bytes::Bytes::from(vec![0x5au8; chunk]);
    (0..total / chunk as u64).map(move |_| block.clone())
}

fn forever() -> std::ops::RangeFrom<u64> {
    0..
}

fn agent_rss_kib() -> u64 {
    rss_kib(std::process::id())
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

enum Target {
    Local,
    #[cfg(feature = "ssh")]
    Ssh(chopsticks_testkit::Sshd),
}

impl Target {
    fn name(&self) -> &'static str {
        match self {
            Target::Local => "local",
            #[cfg(feature = "ssh")]
            Target::Ssh(_) => "ssh",
        }
    }

    fn tunnel(&self) -> Tunnel {
        match self {
            Target::Local => Tunnel::new(Local::new()),
            #[cfg(feature = "ssh")]
            Target::Ssh(sshd) => {
                Tunnel::new(chopsticks::Ssh::new(sshd.alias(0)).config_file(sshd.client_config()))
            }
        }
    }

    /// The command that writes `script`'s output on the target, as a floor.
    fn floor(&self, script: &str) -> tokio::process::Command {
        match self {
            Target::Local => {
                let mut command = tokio::process::Command::new("sh");
                command.arg("-c").arg(script);
                command
            }
            #[cfg(feature = "ssh")]
            Target::Ssh(sshd) => {
                let mut command = tokio::process::Command::new("ssh");
                command
                    .arg("-F")
                    .arg(sshd.client_config())
                    .arg(sshd.alias(0))
                    .arg(script);
                command
            }
        }
    }
}

/// Runs `script` on the target and reads all it writes; returns the bytes.
async fn floor(target: &Target, script: &str) -> u64 {
    let mut child = target
        .floor(script)
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .expect("floor");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut buffer = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        let read = stdout.read(&mut buffer).await.expect("read");
        if read == 0 {
            break;
        }
        total += read as u64;
    }
    child.wait().await.expect("wait");
    total
}

fn items(c: &mut Criterion, target: &Target) {
    let rt = runtime();
    let tun = target.tunnel();
    rt.block_on(tun.connect()).expect("connect");
    let mut group = c.benchmark_group(format!("{}/items_u64", target.name()));
    group
        .throughput(Throughput::Elements(ITEMS))
        .sample_size(10);
    group.bench_function("iterator", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut stream = tun.call_stream(numbers, (ITEMS,));
                let mut count = 0;
                while let Some(item) = stream.next().await {
                    item.expect("item");
                    count += 1;
                }
                assert_eq!(count, ITEMS);
            })
        })
    });
    group.bench_function("async_stream", |b| {
        b.iter(|| {
            rt.block_on(async {
                let count = tun.call_stream_async(numbers_async, (ITEMS,)).count().await;
                assert_eq!(count as u64, ITEMS);
            })
        })
    });
    group.bench_function("pipelined_calls_256", |b| {
        b.iter(|| {
            rt.block_on(async {
                let calls = futures_util::stream::iter((0..ITEMS).map(|_| tun.call(noop, ())))
                    .buffer_unordered(256);
                let count = calls.count().await;
                assert_eq!(count as u64, ITEMS);
            })
        })
    });
    // The same bytes through a pipe: a u64 below 2^32 takes 5 to 9 bytes of
    // CBOR, plus its 4-byte length; 1,000,000 of 0.. take about 12 MB.
    let bytes = 12 * ITEMS;
    group.bench_function("pipe_same_bytes", |b| {
        b.iter(|| rt.block_on(floor(target, &format!("head -c {bytes} /dev/zero"))))
    });
    group.finish();
}

fn bytes_out(c: &mut Criterion, target: &Target) {
    let rt = runtime();
    let tun = target.tunnel();
    rt.block_on(tun.connect()).expect("connect");
    let mut group = c.benchmark_group(format!("{}/bytes_out", target.name()));
    group
        .throughput(Throughput::Bytes(BYTES_OUT))
        .sample_size(10);
    group.bench_with_input(
        BenchmarkId::new("byte_stream", CHUNK),
        &CHUNK,
        |b, &chunk| {
            b.iter(|| {
                rt.block_on(async {
                    let mut stream = tun.call_byte_stream(raw_chunks, (BYTES_OUT, chunk));
                    let mut total = 0;
                    while let Some(piece) = stream.next().await {
                        total += piece.expect("piece").len() as u64;
                    }
                    assert_eq!(total, BYTES_OUT);
                })
            })
        },
    );
    group.bench_with_input(
        BenchmarkId::new("byte_items", CHUNK),
        &CHUNK,
        |b, &chunk| {
            b.iter(|| {
                rt.block_on(async {
                    let mut stream = tun.call_stream(chunks, (BYTES_OUT, chunk));
                    let mut total = 0;
                    while let Some(item) = stream.next().await {
                        total += item.expect("item").len() as u64;
                    }
                    assert_eq!(total, BYTES_OUT);
                })
            })
        },
    );
    group.bench_function("pipe_cat", |b| {
        b.iter(|| {
            rt.block_on(floor(
                target,
                &format!("head -c {BYTES_OUT} /dev/zero | cat"),
            ))
        })
    });
    group.finish();
}

fn bytes_in(c: &mut Criterion, target: &Target) {
    let rt = runtime();
    let tun = target.tunnel();
    rt.block_on(tun.connect()).expect("connect");
    let chunk = bytes::Bytes::from(vec![0x5au8; 256 << 10]);
    let mut group = c.benchmark_group(format!("{}/bytes_in", target.name()));
    group
        .throughput(Throughput::Bytes(BYTES_OUT))
        .sample_size(10);
    group.bench_function("stream", |b| {
        b.iter(|| {
            rt.block_on(async {
                let pieces = BYTES_OUT / chunk.len() as u64;
                let input = futures_util::stream::iter((0..pieces).map(|_| chunk.clone()));
                let total = tun
                    .call_with_input(count_bytes, (), input)
                    .await
                    .expect("call");
                assert_eq!(total, BYTES_OUT);
            })
        })
    });
    group.bench_function("pipe_cat", |b| {
        b.iter(|| rt.block_on(feed_floor(target, &chunk)))
    });
    group.finish();
}

fn count_bytes(input: chopsticks::ByteReceiver) -> u64 {
    input.map(|piece| piece.len() as u64).sum()
}

/// Writes as many bytes into `cat > /dev/null` on the target.
async fn feed_floor(target: &Target, chunk: &bytes::Bytes) {
    use tokio::io::AsyncWriteExt;
    let mut child = target
        .floor("cat > /dev/null")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("floor");
    let mut stdin = child.stdin.take().expect("stdin");
    for _ in 0..BYTES_OUT / chunk.len() as u64 {
        stdin.write_all(chunk).await.expect("write");
    }
    drop(stdin);
    child.wait().await.expect("wait");
}

fn first_item(c: &mut Criterion, target: &Target) {
    let rt = runtime();
    let tun = target.tunnel();
    rt.block_on(tun.connect()).expect("connect");
    let mut group = c.benchmark_group(format!("{}/first_item", target.name()));
    group.bench_function("stream", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut stream = tun.call_stream(numbers, (1,));
                let first = stream.next().await.expect("item").expect("ok");
                // Its end follows at once; draining it keeps each round alone.
                assert!(stream.next().await.is_none());
                first
            })
        })
    });
    group.bench_function("until_first", |b| {
        b.iter_custom(|rounds| {
            rt.block_on(async {
                let mut spent = Duration::ZERO;
                for _ in 0..rounds {
                    let started = Instant::now();
                    let mut stream = tun.call_stream(numbers, (1,));
                    stream.next().await.expect("item").expect("ok");
                    spent += started.elapsed();
                    assert!(stream.next().await.is_none());
                }
                spent
            })
        })
    });
    group.bench_function("trivial_call", |b| {
        b.iter(|| rt.block_on(tun.call(noop, ())).expect("call"))
    });
    group.finish();
}

/// Agent and controller RSS while one item per millisecond is taken from
/// an infinite producer, after 10 s.
fn memory() {
    let rt = runtime();
    let tun = Tunnel::new(Local::new());
    rt.block_on(async {
        tun.connect().await.expect("connect");
        let agent = tun.agent_pid().expect("pid");
        let before = (rss_kib(agent), agent_rss_kib());
        let mut stream = tun.call_stream(forever, ());
        let started = Instant::now();
        let mut taken = 0u64;
        while started.elapsed() < Duration::from_secs(10) {
            stream.next().await.expect("item").expect("ok");
            taken += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let after = (rss_kib(agent), agent_rss_kib());
        println!(
            "one item per ms for 10 s ({taken} taken): agent RSS {} -> {} KiB, controller RSS {} -> {} KiB",
            before.0, after.0, before.1, after.1
        );
    });
}

fn main() {
    if std::env::var_os("STREAMS_MEMORY").is_some() {
        memory();
        return;
    }
    let mut criterion = Criterion::default().configure_from_args();
    #[allow(unused_mut)]
    let mut targets = vec![Target::Local];
    #[cfg(feature = "ssh")]
    targets.push(Target::Ssh(
        chopsticks_testkit::Sshd::start("bench-streams", 1)
            .expect("an sshd for the ssh benches (scripts/test.sh installs openssh-server)"),
    ));
    for target in &targets {
        items(&mut criterion, target);
        bytes_out(&mut criterion, target);
        bytes_in(&mut criterion, target);
        first_item(&mut criterion, target);
    }
    criterion.final_summary();
}
