//! Criterion benchmarks of calls, each beside its floor measured in the same run,
//! on the local transport and, with the `ssh` feature, over ssh to the test
//! kit's loopback sshd.
//!
//! - `round_trip`: a trivial call against a raw 64-byte ping-pong through an echo
//! - `pipelined`: calls per second with 1, 16, 64 and 256 calls in flight on one tunnel
//! - `sizes`: arguments and results of 16 B to 16 MiB, against echoing as many bytes
//! - `payload_64MiB`: 64 MiB arguments and results, against 64 MiB echoed
//! - `connect`: connect + first call, against starting the echo + one ping; the
//!   shell bootstrap with a warm and a cold (empty) agent cache
//! - `group`: connect + one call on 10, 20 (and locally 100) tunnels at once
//!
//! The echo is a child process copying stdin to stdout: locally a tokio
//! program on pipes, over ssh `ssh HOST cat`. Groups are named
//! `local/...` and `ssh/...`.
//!
//! ```text
//! cargo bench --bench calls                       # local only
//! cargo bench --features ssh --bench calls        # local and ssh (needs openssh-server)
//! cargo bench --features ssh --bench calls -- ssh/round_trip
//! taskset -c 0 cargo bench --bench calls          # pinned; see BENCHMARKS.md
//! ```

#[allow(dead_code)]
mod support;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use chopsticks::{Group, Local, Tunnel};
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
use serde_bytes::ByteBuf;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

const ECHO_MARKER: &str = "CHOPSTICKS_BENCH_ECHO";
const MIB64: usize = 64 << 20;
const SIZES: [usize; 5] = [16, 1 << 10, 64 << 10, 1 << 20, 16 << 20];

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

fn bytes_of(len: u64) -> ByteBuf {
    ByteBuf::from(vec![0x5au8; len as usize])
}

/// The local floor: a tokio child that echoes whatever arrives on fd 0 to fd 1.
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

/// Where the benches run.
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

    /// A tunnel to host `index`: distinct names locally, distinct aliases over ssh.
    fn tunnel(&self, index: usize) -> Tunnel {
        match self {
            Target::Local => Tunnel::new(Local::named(format!("h{index}"))),
            #[cfg(feature = "ssh")]
            Target::Ssh(sshd) => Tunnel::builder(
                chopsticks::Ssh::new(sshd.alias(index)).config_file(sshd.client_config()),
            )
            .stderr(chopsticks::stderr::discard())
            .build(),
        }
    }

    /// A tunnel that starts through the shell bootstrap with its agent cache
    /// under `cache` (over ssh: the login user's cache; `cache` is unused).
    fn bootstrapped(&self, cache: &Path) -> Tunnel {
        match self {
            Target::Local => Tunnel::new(
                Local::named("booted")
                    .shell_bootstrap(true)
                    .env("XDG_CACHE_HOME", cache.display().to_string()),
            ),
            #[cfg(feature = "ssh")]
            Target::Ssh(_) => self.tunnel(0),
        }
    }

    /// Empties the agent cache `bootstrapped` uses.
    fn empty_cache(&self, cache: &Path) {
        match self {
            Target::Local => {
                let _ = std::fs::remove_dir_all(cache);
            }
            #[cfg(feature = "ssh")]
            Target::Ssh(sshd) => support::empty_remote_cache(sshd),
        }
    }

    /// The floor's echo: a local child on pipes, or `ssh HOST cat`.
    fn echo(&self) -> Echo {
        let mut command = match self {
            Target::Local => {
                let mut command = Command::new("/proc/self/exe");
                command.env(ECHO_MARKER, "1");
                command
            }
            #[cfg(feature = "ssh")]
            Target::Ssh(sshd) => {
                let mut command = Command::new("ssh");
                command
                    .arg("-F")
                    .arg(sshd.client_config())
                    .arg(sshd.alias(0))
                    .arg("cat");
                command
            }
        };
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the echo");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        Echo {
            _child: child,
            stdin,
            stdout,
            scratch: vec![0u8; 1 << 20],
        }
    }

    fn group_sizes(&self) -> &'static [usize] {
        match self {
            Target::Local => &[10, 20, 100],
            #[cfg(feature = "ssh")]
            Target::Ssh(_) => &[10, 20],
        }
    }
}

struct Echo {
    _child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    /// Where echoed bytes are read back into, allocated once.
    scratch: Vec<u8>,
}

async fn ping(echo: &mut Echo, buffer: &mut [u8]) {
    echo.stdin.write_all(buffer).await.expect("write");
    echo.stdout.read_exact(buffer).await.expect("read");
}

/// Writes `data` to the echo while reading as many bytes back.
async fn echo_through(echo: &mut Echo, data: &[u8]) {
    let (reader, writer, buffer) = (&mut echo.stdout, &mut echo.stdin, &mut echo.scratch);
    let send = async {
        writer.write_all(data).await.expect("write");
    };
    let receive = async {
        let mut left = data.len();
        while left > 0 {
            let read = reader
                .read(&mut buffer[..left.min(1 << 20)])
                .await
                .expect("read");
            assert!(read > 0, "the echo ended early");
            left -= read;
        }
    };
    tokio::join!(send, receive);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn connected(rt: &tokio::runtime::Runtime, target: &Target) -> Tunnel {
    let tun = target.tunnel(0);
    rt.block_on(tun.connect()).expect("connect");
    tun
}

fn round_trip(c: &mut Criterion, target: &Target) {
    let rt = runtime();
    let mut group = c.benchmark_group(format!("{}/round_trip", target.name()));
    let mut echo = rt.block_on(async { target.echo() });
    let mut buffer = [7u8; 64];
    group.bench_function("raw_echo_ping_pong_64B", |b| {
        b.iter(|| rt.block_on(ping(&mut echo, &mut buffer)))
    });
    let tun = connected(&rt, target);
    group.bench_function("chopsticks_trivial_call", |b| {
        b.iter(|| rt.block_on(tun.call(noop, ())).expect("call"))
    });
    group.finish();
}

fn pipelined(c: &mut Criterion, target: &Target) {
    let rt = runtime();
    let tun = connected(&rt, target);
    let mut group = c.benchmark_group(format!("{}/pipelined", target.name()));
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

fn sizes(c: &mut Criterion, target: &Target) {
    let rt = runtime();
    let tun = connected(&rt, target);
    let mut echo = rt.block_on(async { target.echo() });
    let mut group = c.benchmark_group(format!("{}/sizes", target.name()));
    group.sample_size(20);
    for size in SIZES {
        group.throughput(Throughput::Bytes(size as u64));
        let data = vec![0x5au8; size];
        group.bench_with_input(BenchmarkId::new("raw_echo", size), &data, |b, data| {
            b.iter(|| rt.block_on(echo_through(&mut echo, data)))
        });
        let bytes = ByteBuf::from(data);
        group.bench_with_input(BenchmarkId::new("argument", size), &bytes, |b, bytes| {
            b.iter_batched(
                || bytes.clone(),
                |bytes| rt.block_on(tun.call(byte_len, (bytes,))).expect("call"),
                BatchSize::LargeInput,
            )
        });
        group.bench_with_input(BenchmarkId::new("result", size), &size, |b, &size| {
            b.iter(|| {
                rt.block_on(tun.call(bytes_of, (size as u64,)))
                    .expect("call")
            })
        });
    }
    group.finish();
}

fn payload(c: &mut Criterion, target: &Target) {
    let rt = runtime();
    let tun = connected(&rt, target);
    let mut group = c.benchmark_group(format!("{}/payload_64MiB", target.name()));
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    group.throughput(Throughput::Bytes(MIB64 as u64));
    let mut echo = rt.block_on(async { target.echo() });
    let data = vec![0x5au8; MIB64];
    group.bench_function("raw_echo", |b| {
        b.iter(|| rt.block_on(echo_through(&mut echo, &data)))
    });
    let bytes = ByteBuf::from(data.clone());
    // Arguments are cloned outside the timed part: the echo sends from an existing buffer too.
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

fn connect(c: &mut Criterion, target: &Target) {
    let rt = runtime();
    let mut group = c.benchmark_group(format!("{}/connect", target.name()));
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(8));
    let mut buffer = [7u8; 64];
    group.bench_function("raw_start_echo_and_ping", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut echo = target.echo();
                ping(&mut echo, &mut buffer).await;
            })
        })
    });
    group.bench_function("chopsticks_connect_and_first_call", |b| {
        b.iter(|| {
            rt.block_on(async {
                let tun = target.tunnel(0);
                tun.call(noop, ()).await.expect("call");
            })
        })
    });
    let cache = tempfile::tempdir().expect("cache directory");
    rt.block_on(target.bootstrapped(cache.path()).call(noop, ()))
        .expect("fill the agent cache");
    group.bench_function("chopsticks_bootstrap_warm_cache", |b| {
        b.iter(|| {
            let tun = target.bootstrapped(cache.path());
            rt.block_on(tun.call(noop, ())).expect("call");
        })
    });
    group.bench_function("chopsticks_bootstrap_cold_cache", |b| {
        b.iter_batched(
            || {
                target.empty_cache(cache.path());
                target.bootstrapped(cache.path())
            },
            |tun| rt.block_on(tun.call(noop, ())).expect("call"),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

fn group(c: &mut Criterion, target: &Target) {
    let rt = runtime();
    let mut group = c.benchmark_group(format!("{}/group", target.name()));
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));
    for &hosts in target.group_sizes() {
        group.bench_with_input(
            BenchmarkId::new("connect_and_call", hosts),
            &hosts,
            |b, &n| {
                b.iter(|| {
                    rt.block_on(async {
                        let fleet =
                            Group::new((0..n).map(|i| target.tunnel(i))).expect("unique hosts");
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
    #[allow(unused_mut)]
    let mut targets = vec![Target::Local];
    #[cfg(feature = "ssh")]
    targets.push(Target::Ssh(
        chopsticks_testkit::Sshd::start("bench-calls", 20)
            .expect("an sshd for the ssh benches (scripts/test.sh installs openssh-server)"),
    ));
    for target in &targets {
        round_trip(&mut criterion, target);
        pipelined(&mut criterion, target);
        sizes(&mut criterion, target);
        payload(&mut criterion, target);
        connect(&mut criterion, target);
        group(&mut criterion, target);
    }
    criterion.final_summary();
    eprintln!("bench run took {:?}", started.elapsed());
}
