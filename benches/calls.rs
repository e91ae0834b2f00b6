//! Criterion benchmarks of the local transport, each beside its floor measured in the same run.
//!
//! - `round_trip`: a trivial call against a raw 64-byte ping-pong with a tokio child on pipes
//! - `pipelined`: calls per second with 1, 16, 64 and 256 calls in flight on one tunnel
//! - `connect`: connect + first call with a warm cache, against spawning the echo child + one ping
//! - `payload`: 64 MiB arguments and results, against 64 MiB echoed through a raw pipe
//! - `group`: connect + one call on 10, 20 and 100 local tunnels at once
//!
//! Run pinned (`taskset -c 0 cargo bench --bench calls`) and unpinned; see BENCHMARKS.md.

use std::process::Stdio;
use std::time::{Duration, Instant};

use chopsticks::{Group, Local, Tunnel};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
use serde_bytes::ByteBuf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, ChildStdout};

const ECHO_MARKER: &str = "CHOPSTICKS_BENCH_ECHO";
const MIB64: usize = 64 << 20;

fn noop() {}

fn byte_len(data: ByteBuf) -> u64 {
    data.len() as u64
}

fn echo_bytes(data: ByteBuf) -> ByteBuf {
    data
}

fn vec_len(data: Vec<u8>) -> u64 {
    data.len() as u64
}

fn echo_vec(data: Vec<u8>) -> Vec<u8> {
    data
}

/// The floor: a tokio child that echoes whatever arrives on fd 0 to fd 1.
fn run_echo_child() -> ! {
    use std::os::fd::{FromRawFd, OwnedFd};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        // SAFETY: fds 0 and 1 are the pipes the bench gave this process and nothing else uses them.
        let (input, output) = unsafe { (OwnedFd::from_raw_fd(0), OwnedFd::from_raw_fd(1)) };
        let mut input = tokio::net::unix::pipe::Receiver::from_owned_fd(input).expect("stdin pipe");
        let mut output =
            tokio::net::unix::pipe::Sender::from_owned_fd(output).expect("stdout pipe");
        let mut buffer = vec![0u8; 1 << 20];
        loop {
            let read = input.read(&mut buffer).await.expect("read");
            if read == 0 {
                break;
            }
            output.write_all(&buffer[..read]).await.expect("write");
        }
    });
    std::process::exit(0)
}

struct Echo {
    _child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
}

fn spawn_echo() -> Echo {
    let mut child = tokio::process::Command::new("/proc/self/exe")
        .env(ECHO_MARKER, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn echo child");
    let stdin = child.stdin.take().expect("stdin");
    let stdout = child.stdout.take().expect("stdout");
    Echo {
        _child: child,
        stdin,
        stdout,
    }
}

async fn ping(echo: &mut Echo, buffer: &mut [u8]) {
    echo.stdin.write_all(buffer).await.expect("write");
    echo.stdout.read_exact(buffer).await.expect("read");
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn round_trip(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("round_trip");
    let mut echo = rt.block_on(async { spawn_echo() });
    let mut buffer = [7u8; 64];
    group.bench_function("raw_pipe_ping_pong_64B", |b| {
        b.iter(|| rt.block_on(ping(&mut echo, &mut buffer)))
    });
    let tun = Tunnel::new(Local::new());
    rt.block_on(tun.connect()).expect("connect");
    group.bench_function("chopsticks_trivial_call", |b| {
        b.iter(|| rt.block_on(tun.call(noop, ())).expect("call"))
    });
    group.finish();
}

fn pipelined(c: &mut Criterion) {
    let rt = runtime();
    let tun = Tunnel::new(Local::new());
    rt.block_on(tun.connect()).expect("connect");
    let mut group = c.benchmark_group("pipelined");
    for in_flight in [1usize, 16, 64, 256] {
        group.throughput(Throughput::Elements(in_flight as u64));
        group.bench_with_input(BenchmarkId::new("calls", in_flight), &in_flight, |b, &n| {
            b.iter(|| {
                rt.block_on(async {
                    let calls = (0..n).map(|_| tun.call(noop, ()));
                    for result in futures_util::future::join_all(calls).await {
                        result.expect("call");
                    }
                })
            })
        });
    }
    group.finish();
}

fn connect(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("connect");
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(8));
    let mut buffer = [7u8; 64];
    group.bench_function("raw_spawn_echo_and_ping", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut echo = spawn_echo();
                ping(&mut echo, &mut buffer).await;
            })
        })
    });
    group.bench_function("chopsticks_connect_and_first_call", |b| {
        b.iter(|| {
            rt.block_on(async {
                let tun = Tunnel::new(Local::new());
                tun.call(noop, ()).await.expect("call");
            })
        })
    });
    group.finish();
}

fn payload(c: &mut Criterion) {
    let rt = runtime();
    let tun = Tunnel::new(Local::new());
    rt.block_on(tun.connect()).expect("connect");
    let mut group = c.benchmark_group("payload_64MiB");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Bytes(MIB64 as u64));
    let mut echo = rt.block_on(async { spawn_echo() });
    let data = vec![0x5au8; MIB64];
    group.bench_function("raw_pipe_echo", |b| {
        b.iter(|| {
            rt.block_on(async {
                let (reader, writer) = (&mut echo.stdout, &mut echo.stdin);
                let send = async {
                    writer.write_all(&data).await.expect("write");
                };
                let receive = async {
                    let mut buffer = vec![0u8; 1 << 20];
                    let mut left = MIB64;
                    while left > 0 {
                        let read = reader
                            .read(&mut buffer[..left.min(1 << 20)])
                            .await
                            .expect("read");
                        left -= read;
                    }
                };
                tokio::join!(send, receive);
            })
        })
    });
    let bytes = ByteBuf::from(data.clone());
    // Arguments are cloned outside the timed part: the raw pipe sends from an existing buffer too.
    let large = BatchSize::LargeInput;
    group.bench_function("chopsticks_bytes_argument", |b| {
        b.iter_batched(
            || bytes.clone(),
            |bytes| rt.block_on(tun.call(byte_len, (bytes,))).expect("call"),
            large,
        )
    });
    group.bench_function("chopsticks_bytes_echo", |b| {
        b.iter_batched(
            || bytes.clone(),
            |bytes| rt.block_on(tun.call(echo_bytes, (bytes,))).expect("call"),
            large,
        )
    });
    group.bench_function("chopsticks_vec_u8_argument", |b| {
        b.iter_batched(
            || data.clone(),
            |data| rt.block_on(tun.call(vec_len, (data,))).expect("call"),
            large,
        )
    });
    group.bench_function("chopsticks_vec_u8_echo", |b| {
        b.iter_batched(
            || data.clone(),
            |data| rt.block_on(tun.call(echo_vec, (data,))).expect("call"),
            large,
        )
    });
    group.finish();
}

fn group(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("group");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    for hosts in [10usize, 20, 100] {
        group.bench_with_input(
            BenchmarkId::new("connect_and_call", hosts),
            &hosts,
            |b, &n| {
                b.iter(|| {
                    rt.block_on(async {
                        let tunnels = (0..n).map(|i| Tunnel::new(Local::named(format!("h{i}"))));
                        let fleet = Group::new(tunnels).expect("unique hosts");
                        fleet.call(noop, ()).await.into_result().expect("calls");
                    })
                })
            },
        );
    }
    group.finish();
}

fn main() {
    if std::env::var_os(ECHO_MARKER).is_some() {
        run_echo_child();
    }
    let started = Instant::now();
    let mut criterion = Criterion::default().configure_from_args();
    round_trip(&mut criterion);
    pipelined(&mut criterion);
    connect(&mut criterion);
    payload(&mut criterion);
    group(&mut criterion);
    criterion.final_summary();
    eprintln!("bench run took {:?}", started.elapsed());
}
