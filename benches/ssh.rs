//! The SSH transports against a loopback sshd (chopsticks-testkit), each
//! figure beside its floor measured in the same run.
//!
//! ```text
//! cargo bench --features full --bench ssh
//! CHOPSTICKS_BENCH_MIB=256 cargo bench --features full --bench ssh
//! CHOPSTICKS_BENCH_CIPHERS=chacha20-poly1305@openssh.com cargo bench --features full --bench ssh
//! ```
//!
//! `CHOPSTICKS_BENCH_CIPHERS` sets the ciphers NativeSsh and its libssh2
//! floors offer (default: libssh2's own list).
//!
//! Floors:
//! - connect: `ssh HOST true`, and libssh2 connect + handshake + auth + `true`;
//! - round trip: 64 bytes through `ssh HOST cat`, and through a libssh2 channel running `cat`;
//! - throughput: `ssh HOST 'cat > DST' < SRC` and `ssh HOST 'cat SRC' > DST`,
//!   each also followed by an fsync of DST (a put or fetch is durable before
//!   it returns), less the time of `ssh HOST true`: each starts a new
//!   connection, while ours run on a connected tunnel. Ours are timed synced
//!   (against the fsynced copy) and with `.sync(false)` (against the plain one);
//! - throughput through libssh2 itself: the same two copies through a channel
//!   of a connected libssh2 session, the ceiling for NativeSsh.
//!
//! Round trips are timed from `block_on` on the main thread, as in
//! `#[tokio::main]`, and from a task spawned on the runtime.

#[allow(dead_code)]
mod support;

use std::future::IntoFuture;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use chopsticks::{Group, NativeSsh, Ssh, Tunnel};
use chopsticks_testkit::Sshd;
use support::{env_number, mean_call, median, write_source};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn noop() {}

fn openssh(sshd: &Sshd, alias: &str) -> Tunnel {
    Tunnel::builder(Ssh::new(alias).config_file(sshd.client_config()))
        .stderr(chopsticks::stderr::discard())
        .build()
}

/// The ciphers NativeSsh and the libssh2 floors offer, if not libssh2's own.
fn ciphers() -> Option<String> {
    std::env::var("CHOPSTICKS_BENCH_CIPHERS").ok()
}

fn native(sshd: &Sshd, name: &str) -> Tunnel {
    let mut transport = NativeSsh::new("127.0.0.1")
        .named(name)
        .port(sshd.port())
        .user(sshd.user())
        .identity_file(sshd.client_key())
        .known_hosts(sshd.known_hosts());
    if let Some(ciphers) = ciphers() {
        transport = transport.ciphers(ciphers);
    }
    Tunnel::builder(transport)
        .stderr(chopsticks::stderr::discard())
        .build()
}

fn ssh_command(sshd: &Sshd, remote: &str) -> Command {
    let mut command = Command::new("ssh");
    command
        .arg("-F")
        .arg(sshd.client_config())
        .arg(sshd.alias(0))
        .arg(remote);
    command
}

fn ssh2_session(sshd: &Sshd) -> ssh2::Session {
    let stream = std::net::TcpStream::connect(("127.0.0.1", sshd.port())).expect("tcp");
    stream.set_nodelay(true).expect("nodelay");
    let mut session = ssh2::Session::new().expect("session");
    session.set_tcp_stream(stream);
    // The same kind of session as NativeSsh's: the same ciphers offered.
    if let Some(ciphers) = ciphers() {
        for direction in [ssh2::MethodType::CryptCs, ssh2::MethodType::CryptSc] {
            session.method_pref(direction, &ciphers).expect("ciphers");
        }
    }
    session.handshake().expect("handshake");
    session
        .userauth_pubkey_file(sshd.user(), None, &sshd.client_key(), None)
        .expect("auth");
    session
}

/// Copies `source` into `target` on the host through a libssh2 channel running `cat`.
fn libssh2_put(session: &ssh2::Session, source: &std::path::Path, target: &std::path::Path) {
    let mut channel = session.channel_session().expect("channel");
    channel
        .exec(&format!("cat > '{}'", target.display()))
        .expect("exec");
    let mut file = std::fs::File::open(source).expect("open");
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let read = file.read(&mut buffer).expect("read");
        if read == 0 {
            break;
        }
        channel.write_all(&buffer[..read]).expect("write");
    }
    channel.send_eof().expect("eof");
    channel.wait_eof().expect("wait eof");
    channel.wait_close().expect("close");
    assert_eq!(channel.exit_status().expect("status"), 0);
}

/// Copies `source` on the host into `target` through a libssh2 channel running `cat`.
fn libssh2_fetch(session: &ssh2::Session, source: &std::path::Path, target: &std::path::Path) {
    let mut channel = session.channel_session().expect("channel");
    channel
        .exec(&format!("cat '{}'", source.display()))
        .expect("exec");
    let mut file = std::fs::File::create(target).expect("create");
    let mut buffer = vec![0u8; 256 * 1024];
    loop {
        let read = channel.read(&mut buffer).expect("read");
        if read == 0 {
            break;
        }
        file.write_all(&buffer[..read]).expect("write");
    }
    channel.wait_close().expect("close");
    assert_eq!(channel.exit_status().expect("status"), 0);
}

/// The mean of `trips` calls, made from a task spawned on `runtime`.
fn mean_call_spawned(runtime: &tokio::runtime::Runtime, tunnel: &Tunnel, trips: usize) -> Duration {
    let tunnel = tunnel.clone();
    runtime
        .block_on(runtime.spawn(async move { mean_call(&tunnel, trips).await }))
        .expect("spawned calls")
}

fn main() {
    if std::env::args().any(|arg| arg == "--list") {
        println!("ssh: bench");
        return;
    }
    let rounds = env_number("CHOPSTICKS_BENCH_ROUNDS", 7);
    let trips = env_number("CHOPSTICKS_BENCH_TRIPS", 2000);
    let mib = env_number("CHOPSTICKS_BENCH_MIB", 1024);
    let sshd = Sshd::start("bench", 20).expect("sshd (install openssh-server)");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");

    // Warm the agent cache on the target.
    runtime
        .block_on(openssh(&sshd, sshd.alias(0)).call(noop, ()))
        .expect("first connect");

    // Connect + first call, warm cache.
    let (mut ssh_true, mut ours_openssh, mut ssh2_true, mut ours_native) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let started = Instant::now();
        let status = ssh_command(&sshd, "true").status().expect("ssh true");
        assert!(status.success());
        ssh_true.push(started.elapsed());

        let tun = openssh(&sshd, sshd.alias(0));
        let started = Instant::now();
        runtime.block_on(tun.call(noop, ())).expect("openssh call");
        ours_openssh.push(started.elapsed());
        runtime.block_on(tun.close()).expect("close");

        let started = Instant::now();
        let session = ssh2_session(&sshd);
        let mut channel = session.channel_session().expect("channel");
        channel.exec("true").expect("exec");
        let mut rest = Vec::new();
        channel.read_to_end(&mut rest).expect("read");
        channel.wait_close().expect("close");
        ssh2_true.push(started.elapsed());

        let tun = native(&sshd, "native");
        let started = Instant::now();
        runtime.block_on(tun.call(noop, ())).expect("native call");
        ours_native.push(started.elapsed());
        runtime.block_on(tun.close()).expect("close");
    }

    // Connect + first call through a ControlMaster, beside `ssh true` through the same master.
    let mastered = Tunnel::builder(
        Ssh::new(sshd.alias(0))
            .config_file(sshd.client_config())
            .control_persist(Duration::from_secs(60)),
    )
    .stderr(chopsticks::stderr::discard())
    .build();
    runtime.block_on(mastered.call(noop, ())).expect("master");
    // SAFETY: getuid has no preconditions.
    let uid = unsafe { libc::getuid() };
    let control = std::env::temp_dir().join(format!("chopsticks-ssh-{uid}"));
    let (mut master_true, mut ours_master) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let started = Instant::now();
        let status = Command::new("ssh")
            .arg("-F")
            .arg(sshd.client_config())
            .args(["-o", &format!("ControlPath={}/%C", control.display())])
            .arg(sshd.alias(0))
            .arg("true")
            .status()
            .expect("ssh true through the master");
        assert!(status.success());
        master_true.push(started.elapsed());
        runtime.block_on(mastered.close()).expect("close");
        let started = Instant::now();
        runtime
            .block_on(mastered.call(noop, ()))
            .expect("reconnect");
        ours_master.push(started.elapsed());
    }
    runtime.block_on(mastered.close()).expect("close");
    let _ = Command::new("ssh")
        .arg("-F")
        .arg(sshd.client_config())
        .args([
            "-o",
            &format!("ControlPath={}/%C", control.display()),
            "-O",
            "exit",
        ])
        .arg(sshd.alias(0))
        .output();

    // Round trips.
    let raw_openssh = runtime.block_on(async {
        let mut child = tokio::process::Command::new("ssh")
            .arg("-F")
            .arg(sshd.client_config())
            .arg(sshd.alias(0))
            .arg("cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("ssh cat");
        let mut stdin = child.stdin.take().expect("stdin");
        let mut stdout = child.stdout.take().expect("stdout");
        let message = [7u8; 64];
        let mut echo = [0u8; 64];
        for _ in 0..100 {
            stdin.write_all(&message).await.expect("write");
            stdout.read_exact(&mut echo).await.expect("read");
        }
        let started = Instant::now();
        for _ in 0..trips {
            stdin.write_all(&message).await.expect("write");
            stdout.read_exact(&mut echo).await.expect("read");
        }
        let each = started.elapsed() / trips as u32;
        drop(stdin);
        let _ = child.wait().await;
        each
    });
    let openssh_trips = openssh(&sshd, sshd.alias(0));
    let ours_openssh_trip = runtime.block_on(mean_call(&openssh_trips, trips));
    let ours_openssh_spawned = mean_call_spawned(&runtime, &openssh_trips, trips);
    let raw_native = {
        let session = ssh2_session(&sshd);
        let mut channel = session.channel_session().expect("channel");
        channel.exec("cat").expect("exec");
        let message = [7u8; 64];
        let mut echo = [0u8; 64];
        for _ in 0..100 {
            channel.write_all(&message).expect("write");
            channel.read_exact(&mut echo).expect("read");
        }
        let started = Instant::now();
        for _ in 0..trips {
            channel.write_all(&message).expect("write");
            channel.read_exact(&mut echo).expect("read");
        }
        started.elapsed() / trips as u32
    };
    let native_trips = native(&sshd, "native");
    let ours_native_trip = runtime.block_on(mean_call(&native_trips, trips));
    let ours_native_spawned = mean_call_spawned(&runtime, &native_trips, trips);

    // Throughput.
    let dir = std::env::temp_dir().join(format!("chopsticks-ssh-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    // The agent may log in as another user (chopsticks_testkit::LOGIN_USER).
    std::fs::set_permissions(
        &dir,
        <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o777),
    )
    .expect("chmod");
    let source = dir.join("source");
    let target = dir.join("target");
    write_source(&source, mib);
    let bytes = (mib as u64) << 20;
    let transfer_rounds = env_number("CHOPSTICKS_BENCH_TRANSFER_ROUNDS", 3);
    let (mut raw_put, mut raw_put_durable, mut raw_fetch, mut raw_fetch_durable) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // libssh2 itself: put, fetch, each plain and fsynced.
    let mut libssh2_floor: [Vec<Duration>; 4] = Default::default();
    let libssh2_session = ssh2_session(&sshd);
    // Per backend: put and fetch, synced (the default) and `.sync(false)`.
    let mut ours: [[Vec<Duration>; 4]; 2] = Default::default();
    let openssh_tunnel = openssh(&sshd, sshd.alias(0));
    let native_tunnel = native(&sshd, "native");
    runtime.block_on(openssh_tunnel.connect()).expect("connect");
    runtime.block_on(native_tunnel.connect()).expect("connect");
    let settle = || {
        let _ = std::fs::remove_file(&target);
        let _ = Command::new("sync").status();
    };
    for _ in 0..transfer_rounds {
        settle();
        let started = Instant::now();
        let status = ssh_command(&sshd, &format!("cat > '{}'", target.display()))
            .stdin(std::fs::File::open(&source).expect("open"))
            .status()
            .expect("ssh cat >");
        assert!(status.success());
        raw_put.push(started.elapsed());
        // The same copy made durable, as a put is before it returns.
        std::fs::File::open(&target)
            .and_then(|file| file.sync_all())
            .expect("fsync");
        raw_put_durable.push(started.elapsed());
        settle();
        let started = Instant::now();
        let status = ssh_command(&sshd, &format!("cat '{}'", source.display()))
            .stdout(std::fs::File::create(&target).expect("create"))
            .status()
            .expect("ssh cat");
        assert!(status.success());
        raw_fetch.push(started.elapsed());
        // The same copy made durable, as a fetch is before it returns.
        std::fs::File::open(&target)
            .and_then(|file| file.sync_all())
            .expect("fsync");
        raw_fetch_durable.push(started.elapsed());
        for put in [true, false] {
            settle();
            let started = Instant::now();
            if put {
                libssh2_put(&libssh2_session, &source, &target);
            } else {
                libssh2_fetch(&libssh2_session, &source, &target);
            }
            let slot = if put { 0 } else { 1 };
            libssh2_floor[slot].push(started.elapsed());
            std::fs::File::open(&target)
                .and_then(|file| file.sync_all())
                .expect("fsync");
            libssh2_floor[slot + 2].push(started.elapsed());
        }
        let [openssh_times, native_times] = &mut ours;
        for (tunnel, times) in [
            (&openssh_tunnel, openssh_times),
            (&native_tunnel, native_times),
        ] {
            for sync in [true, false] {
                let slot = if sync { 0 } else { 2 };
                settle();
                let started = Instant::now();
                runtime
                    .block_on(tunnel.put(&source, &target).sync(sync).into_future())
                    .expect("put");
                times[slot].push(started.elapsed());
                settle();
                let started = Instant::now();
                runtime
                    .block_on(tunnel.fetch(&source, &target).sync(sync).into_future())
                    .expect("fetch");
                times[slot + 1].push(started.elapsed());
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);

    // Fan-out to 20 hosts.
    let fan_out = |make: &dyn Fn(usize) -> Tunnel| {
        let group = Group::new((0..20).map(make)).expect("group");
        let started = Instant::now();
        let result = runtime.block_on(group.call(noop, ()));
        let elapsed = started.elapsed();
        assert_eq!(result.successful().count(), 20, "every host answered");
        runtime.block_on(group.close());
        elapsed
    };
    let fan_openssh = fan_out(&|i| openssh(&sshd, sshd.alias(i)));
    let fan_native = fan_out(&|i| native(&sshd, &format!("native-{i}")));

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let rate = |d: Duration| bytes as f64 / d.as_secs_f64() / 1e6;
    let (ssh_true, ours_openssh, ssh2_true, ours_native) = (
        median(ssh_true),
        median(ours_openssh),
        median(ssh2_true),
        median(ours_native),
    );
    println!("ssh to a loopback sshd, medians");
    println!("connect + first call (warm agent cache), {rounds} rounds");
    println!(
        "  ssh HOST true            {:8.1} ms | chopsticks Ssh      {:8.1} ms = {:.2}x",
        ms(ssh_true),
        ms(ours_openssh),
        ms(ours_openssh) / ms(ssh_true)
    );
    println!(
        "  libssh2 connect + true   {:8.1} ms | chopsticks NativeSsh {:7.1} ms = {:.2}x",
        ms(ssh2_true),
        ms(ours_native),
        ms(ours_native) / ms(ssh2_true)
    );
    let (master_true, ours_master) = (median(master_true), median(ours_master));
    println!(
        "  ssh true via master      {:8.1} ms | Ssh via ControlMaster {:7.1} ms = {:.2}x (of plain ssh true: {:.2}x)",
        ms(master_true),
        ms(ours_master),
        ms(ours_master) / ms(master_true),
        ms(ours_master) / ms(ssh_true)
    );
    println!("round trip, mean of {trips}");
    println!(
        "  64 B via ssh HOST cat    {:8.1} µs | Ssh call            {:8.1} µs = {:.2}x",
        us(raw_openssh),
        us(ours_openssh_trip),
        us(ours_openssh_trip) / us(raw_openssh)
    );
    println!(
        "  64 B via libssh2 cat     {:8.1} µs | NativeSsh call      {:8.1} µs = {:.2}x",
        us(raw_native),
        us(ours_native_trip),
        us(ours_native_trip) / us(raw_native)
    );
    println!(
        "  from a spawned task: Ssh call {:8.1} µs = {:.2}x | NativeSsh call {:8.1} µs = {:.2}x",
        us(ours_openssh_spawned),
        us(ours_openssh_spawned) / us(raw_openssh),
        us(ours_native_spawned),
        us(ours_native_spawned) / us(raw_native)
    );
    // Each floor starts a new ssh connection; its data phase is the time
    // less the median `ssh HOST true` of this run.
    let data_phase = |raw: Vec<Duration>| median(raw).saturating_sub(ssh_true);
    let floors = [
        data_phase(raw_put_durable),
        data_phase(raw_fetch_durable),
        data_phase(raw_put),
        data_phase(raw_fetch),
    ];
    println!(
        "{mib} MiB file, median of {transfer_rounds}; floors less the {:.0} ms of `ssh HOST true`",
        ms(ssh_true)
    );
    println!(
        "  ssh 'cat > DST' < SRC  {:6.0} MB/s, then fsync {:6.0} MB/s | ssh 'cat SRC' > DST {:6.0} MB/s, then fsync {:6.0} MB/s",
        rate(floors[2]),
        rate(floors[0]),
        rate(floors[3]),
        rate(floors[1])
    );
    let libssh2_floor = libssh2_floor.map(median);
    println!(
        "  libssh2 channel 'cat > DST' {:6.0} MB/s, then fsync {:6.0} MB/s | 'cat SRC' > DST {:6.0} MB/s, then fsync {:6.0} MB/s",
        rate(libssh2_floor[0]),
        rate(libssh2_floor[2]),
        rate(libssh2_floor[1]),
        rate(libssh2_floor[3])
    );
    for (name, times) in [("Ssh", &ours[0]), ("NativeSsh", &ours[1])] {
        let ours = times.clone().map(median);
        println!(
            "  {name:<10} put {:6.0} MB/s = {:.2}x the fsynced copy, .sync(false) {:.2}x the plain one | fetch {:6.0} MB/s = {:.2}x, .sync(false) {:.2}x",
            rate(ours[0]),
            rate(ours[0]) / rate(floors[0]),
            rate(ours[2]) / rate(floors[2]),
            rate(ours[1]),
            rate(ours[1]) / rate(floors[1]),
            rate(ours[3]) / rate(floors[3]),
        );
    }
    let native = ours[1].clone().map(median);
    println!(
        "  NativeSsh against libssh2's own copies: put {:.2}x synced, {:.2}x .sync(false) | fetch {:.2}x synced, {:.2}x .sync(false)",
        rate(native[0]) / rate(libssh2_floor[2]),
        rate(native[2]) / rate(libssh2_floor[0]),
        rate(native[1]) / rate(libssh2_floor[3]),
        rate(native[3]) / rate(libssh2_floor[1]),
    );
    println!("20 hosts: Group connect + one call");
    println!(
        "  Ssh {:8.0} ms | NativeSsh {:8.0} ms",
        ms(fan_openssh),
        ms(fan_native)
    );
}
