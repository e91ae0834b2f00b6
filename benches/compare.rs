//! The Rust side of `bench/compare`: the same five workloads as
//! `bench/compare/peers.py` runs for chopsticks (Python), mitogen and
//! execnet, printed as one JSON object.
//!
//! ```text
//! cargo bench --features full --bench compare -- local [--quick]
//! cargo bench --features full --bench compare -- ssh --ssh-config CFG --ssh-host A [--ssh-host B ...]
//! cargo bench --features full --bench compare -- native --port P --user U --key KEY --known-hosts FILE
//! cargo bench --features full --bench compare -- sshd 20   # a loopback sshd until stdin closes
//! ```
//!
//! `ssh` runs ours through the OpenSSH client (`Ssh`), `native` through
//! libssh2 (`NativeSsh`) to 127.0.0.1, both against the same sshd.

#[allow(dead_code)]
mod support;

use std::future::IntoFuture;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use chopsticks::{Group, Local, NativeSsh, Ssh, Tunnel};
use support::{median, write_source};

fn noop() {}

fn length(data: serde_bytes::ByteBuf) -> usize {
    data.len()
}

struct Options {
    transport: String,
    config: Option<PathBuf>,
    hosts: Vec<String>,
    quick: bool,
    /// For `native`: port, user, private key and known_hosts of the sshd.
    port: u16,
    user: String,
    key: PathBuf,
    known_hosts: PathBuf,
}

fn options() -> Options {
    let mut args = std::env::args().skip(1).filter(|arg| arg != "--bench");
    let mut options = Options {
        transport: "local".into(),
        config: None,
        hosts: Vec::new(),
        quick: false,
        port: 22,
        user: String::new(),
        key: PathBuf::new(),
        known_hosts: PathBuf::new(),
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "local" | "ssh" | "native" => options.transport = arg,
            "--quick" => options.quick = true,
            "--ssh-config" => options.config = args.next().map(PathBuf::from),
            "--ssh-host" => options.hosts.extend(args.next()),
            "--port" => options.port = args.next().and_then(|p| p.parse().ok()).unwrap_or(22),
            "--user" => options.user = args.next().unwrap_or_default(),
            "--key" => options.key = args.next().map(PathBuf::from).unwrap_or_default(),
            "--known-hosts" => {
                options.known_hosts = args.next().map(PathBuf::from).unwrap_or_default()
            }
            _ => {}
        }
    }
    options
}

fn tunnel(options: &Options, index: usize) -> Tunnel {
    let builder = match options.transport.as_str() {
        "ssh" => {
            let host = &options.hosts[index % options.hosts.len().max(1)];
            let mut ssh = Ssh::new(host);
            if let Some(config) = &options.config {
                ssh = ssh.config_file(config);
            }
            Tunnel::builder(ssh)
        }
        "native" => Tunnel::builder(
            NativeSsh::new("127.0.0.1")
                .named(format!("native-{index}"))
                .port(options.port)
                .user(&options.user)
                .identity_file(&options.key)
                .known_hosts(&options.known_hosts),
        ),
        _ => Tunnel::builder(Local::named(format!("local-{index}"))),
    };
    builder.stderr(chopsticks::stderr::discard()).build()
}

fn percentile(mut samples: Vec<f64>, fraction: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    let index = ((samples.len() as f64 - 1.0) * fraction).round() as usize;
    samples[index]
}

fn main() {
    if std::env::args().any(|arg| arg == "--list") {
        println!("compare: bench");
        return;
    }
    // `compare sshd N`: a loopback sshd with N aliases for bench/compare/run.sh,
    // kept until stdin closes.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("sshd") {
        let count = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(20);
        let sshd = chopsticks_testkit::Sshd::start("compare", count).expect("sshd");
        println!("config {}", sshd.client_config().display());
        println!("pid {}", sshd.pid().unwrap_or(0));
        println!("port {}", sshd.port());
        println!("user {}", sshd.user());
        println!("key {}", sshd.client_key().display());
        println!("known_hosts {}", sshd.known_hosts().display());
        for alias in sshd.aliases() {
            println!("alias {alias}");
        }
        println!("ready");
        use std::io::Read;
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        return;
    }
    let options = options();
    let (trips, arg_mib, file_mib) = if options.quick {
        (200, 16, 16)
    } else {
        (2000, 64, 256)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    // Connect + first call.
    let mut connects = Vec::new();
    for _ in 0..5 {
        let tun = tunnel(&options, 0);
        let started = Instant::now();
        runtime
            .block_on(tun.call(noop, ()))
            .expect("connect + call");
        connects.push(started.elapsed().as_secs_f64() * 1e3);
        runtime.block_on(tun.close()).expect("close");
    }

    let tun = tunnel(&options, 0);
    // 1. Trivial call latency.
    let latencies = runtime.block_on(async {
        for _ in 0..200 {
            tun.call(noop, ()).await.expect("warm-up");
        }
        let mut latencies = Vec::with_capacity(trips);
        for _ in 0..trips {
            let started = Instant::now();
            tun.call(noop, ()).await.expect("call");
            latencies.push(started.elapsed().as_secs_f64() * 1e6);
        }
        latencies
    });

    // 2. Calls per second, 64 in flight on one tunnel.
    let calls_per_s = runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(1);
        let started = Instant::now();
        let workers = (0..64).map(|_| async {
            let mut done = 0u64;
            while Instant::now() < deadline {
                tun.call(noop, ()).await.expect("call");
                done += 1;
            }
            done
        });
        let total: u64 = futures_util::future::join_all(workers)
            .await
            .into_iter()
            .sum();
        total as f64 / started.elapsed().as_secs_f64()
    });

    // 3. A 64 MiB argument.
    let data = serde_bytes::ByteBuf::from(vec![0x5au8; arg_mib << 20]);
    let mut arg_rates = Vec::new();
    for _ in 0..3 {
        let argument = data.clone();
        let started = Instant::now();
        let len = runtime
            .block_on(tun.call(length, (argument,)))
            .expect("64 MiB argument");
        assert_eq!(len, arg_mib << 20);
        arg_rates.push((arg_mib << 20) as f64 / started.elapsed().as_secs_f64() / 1e6);
    }

    // 4. A 256 MiB file, put and fetch.
    let dir = std::env::temp_dir().join(format!("chopsticks-compare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    std::fs::set_permissions(
        &dir,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o777),
    )
    .expect("chmod");
    let source = dir.join("source");
    write_source(&source, file_mib);
    let bytes = (file_mib << 20) as f64;
    let (mut puts, mut fetches) = (Vec::new(), Vec::new());
    // The peers never sync what they write: ours is also timed with `.sync(false)`.
    let (mut unsynced_puts, mut unsynced_fetches) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        let _ = std::fs::remove_file(dir.join("put"));
        let started = Instant::now();
        runtime
            .block_on(tun.put(&source, dir.join("put")).sync(false).into_future())
            .expect("unsynced put");
        unsynced_puts.push(bytes / started.elapsed().as_secs_f64() / 1e6);
        let _ = std::fs::remove_file(dir.join("fetched"));
        let started = Instant::now();
        runtime
            .block_on(
                tun.fetch(&source, dir.join("fetched"))
                    .sync(false)
                    .into_future(),
            )
            .expect("unsynced fetch");
        unsynced_fetches.push(bytes / started.elapsed().as_secs_f64() / 1e6);
        let _ = std::fs::remove_file(dir.join("put"));
        let started = Instant::now();
        runtime
            .block_on(tun.put(&source, dir.join("put")).into_future())
            .expect("put");
        puts.push(bytes / started.elapsed().as_secs_f64() / 1e6);
        let _ = std::fs::remove_file(dir.join("fetched"));
        let started = Instant::now();
        runtime
            .block_on(tun.fetch(&source, dir.join("fetched")).into_future())
            .expect("fetch");
        fetches.push(bytes / started.elapsed().as_secs_f64() / 1e6);
    }
    let _ = std::fs::remove_dir_all(&dir);
    runtime.block_on(tun.close()).expect("close");

    // 5. Fan-out to 20 hosts.
    let hosts = if options.transport == "ssh" {
        options.hosts.len().min(20)
    } else {
        20
    };
    let group = Group::new((0..hosts).map(|index| tunnel(&options, index))).expect("group");
    let started = Instant::now();
    let result = runtime.block_on(group.call(noop, ()));
    let fanout = started.elapsed().as_secs_f64();
    assert_eq!(result.successful().count(), hosts, "every host answered");
    runtime.block_on(group.close());

    println!(
        "{{\"library\": \"{}\", \"version\": \"{}\", \"transport\": \"{}\", \
         \"connect_first_call_ms\": {:.3}, \"trivial_us_median\": {:.2}, \"trivial_us_p99\": {:.2}, \
         \"calls_per_s\": {:.0}, \"calls_mode\": \"pipelined-64\", \"arg64_mb_s\": {:.1}, \
         \"put_mb_s\": {:.1}, \"fetch_mb_s\": {:.1}, \"put_unsynced_mb_s\": {:.1}, \
         \"fetch_unsynced_mb_s\": {:.1}, \"transfer_method\": \"Tunnel::put/fetch\", \
         \"fanout20_s\": {:.4}, \"fanout_hosts\": {hosts}}}",
        if options.transport == "native" {
            "chopsticks-rs-libssh2"
        } else {
            "chopsticks-rs"
        },
        env!("CARGO_PKG_VERSION"),
        if options.transport == "native" {
            "ssh"
        } else {
            &options.transport
        },
        median(connects),
        median(latencies.clone()),
        percentile(latencies, 0.99),
        calls_per_s,
        median(arg_rates),
        median(puts),
        median(fetches),
        median(unsynced_puts),
        median(unsynced_fetches),
        fanout,
    );
}
