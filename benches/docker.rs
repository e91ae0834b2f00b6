//! The Docker transport against the local Engine, each figure beside its
//! floor measured in the same run (images from chopsticks-testkit).
//!
//! ```text
//! cargo bench --features full --bench docker
//! CHOPSTICKS_BENCH_MIB=64 cargo bench --features full --bench docker
//! ```
//!
//! Floors: `docker run --rm IMAGE true`; `docker exec C true`; 64-byte
//! ping-pongs through a bollard exec attach running `cat`; `cat > FILE` and
//! `cat FILE` through an exec attach, the latter also followed by an fsync of
//! the copy (a fetch is durable before it returns).

#[allow(dead_code)]
mod support;

use std::future::IntoFuture;
use std::process::Command;
use std::time::{Duration, Instant};

use bollard::exec::StartExecResults;
use bollard::models::ExecConfig;
use chopsticks::{Docker, Tunnel};
use chopsticks_testkit::docker::{TOOLS_IMAGE, prepare, remove_container, running_container};
use futures_util::StreamExt;
use support::{env_number, mean_call, median, write_source};
use tokio::io::AsyncWriteExt;

fn noop() {}

fn cli(args: &[&str]) -> Duration {
    let started = Instant::now();
    let status = Command::new("docker").args(args).status().expect("docker");
    assert!(status.success(), "docker {args:?}");
    started.elapsed()
}

fn quiet(docker: Docker) -> Tunnel {
    Tunnel::builder(docker)
        .stderr(chopsticks::stderr::discard())
        .build()
}

/// An attached exec of `cmd` in `container`: its input and its output stream.
async fn attached(
    engine: &bollard::Docker,
    container: &str,
    cmd: &[&str],
) -> (
    std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
    std::pin::Pin<
        Box<
            dyn futures_util::Stream<
                    Item = Result<bollard::container::LogOutput, bollard::errors::Error>,
                > + Send,
        >,
    >,
) {
    let exec = engine
        .create_exec(
            container,
            ExecConfig {
                attach_stdin: Some(true),
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                cmd: Some(cmd.iter().map(|word| word.to_string()).collect()),
                ..ExecConfig::default()
            },
        )
        .await
        .expect("create exec");
    match engine.start_exec(&exec.id, None).await.expect("start") {
        StartExecResults::Attached { output, input } => (input, output),
        StartExecResults::Detached => panic!("detached"),
    }
}

fn main() {
    if std::env::args().any(|arg| arg == "--list") {
        println!("docker: bench");
        return;
    }
    prepare().expect("the Docker Engine and test images");
    let rounds = env_number("CHOPSTICKS_BENCH_ROUNDS", 5);
    let trips = env_number("CHOPSTICKS_BENCH_TRIPS", 2000);
    let mib = env_number("CHOPSTICKS_BENCH_MIB", 256);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let engine = runtime
        .block_on(
            bollard::Docker::connect_with_defaults()
                .expect("engine")
                .negotiate_version(),
        )
        .expect("negotiate");
    let running = format!("chopsticks-bench-{}", std::process::id());
    running_container(&running).expect("a running container");

    // Connect + first call: a new container, and exec into a running one.
    let (mut run_true, mut ours_new, mut exec_true, mut ours_exec) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        run_true.push(cli(&["run", "--rm", TOOLS_IMAGE, "/bin/true"]));
        let name = format!("{running}-new-{round}");
        let tun = quiet(Docker::new(&name).image(TOOLS_IMAGE));
        let started = Instant::now();
        runtime.block_on(tun.call(noop, ())).expect("new container");
        ours_new.push(started.elapsed());
        runtime.block_on(tun.close()).expect("close");
        remove_container(&name);

        exec_true.push(cli(&["exec", &running, "/bin/true"]));
        let tun = quiet(Docker::exec(&running));
        let started = Instant::now();
        runtime.block_on(tun.call(noop, ())).expect("exec");
        ours_exec.push(started.elapsed());
        runtime.block_on(tun.close()).expect("close");
    }

    // Round trips.
    let raw_trip = runtime.block_on(async {
        let (mut input, mut output) = attached(&engine, &running, &["/bin/cat"]).await;
        let message = [7u8; 64];
        let mut run = async |count: usize| {
            let started = Instant::now();
            for _ in 0..count {
                input.write_all(&message).await.expect("write");
                input.flush().await.expect("flush");
                let mut got = 0;
                while got < message.len() {
                    match output.next().await {
                        Some(Ok(chunk)) => got += chunk.into_bytes().len(),
                        other => panic!("echo ended: {other:?}"),
                    }
                }
            }
            started.elapsed() / count as u32
        };
        run(100).await;
        run(trips).await
    });
    let ours_trip = runtime.block_on(async {
        let tun = quiet(Docker::exec(&running));
        let each = mean_call(&tun, trips).await;
        tun.close().await.expect("close");
        each
    });

    // Throughput through an attach.
    let dir = std::env::temp_dir().join(format!("chopsticks-docker-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let source = dir.join("source");
    write_source(&source, mib);
    let bytes = (mib as u64) << 20;
    let (mut raw_put, mut raw_fetch, mut put, mut fetch, mut fetch_unsynced) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let tun = quiet(Docker::exec(&running));
    runtime.block_on(tun.connect()).expect("connect");
    let rounds = env_number("CHOPSTICKS_BENCH_TRANSFER_ROUNDS", 5);
    for _ in 0..rounds {
        raw_put.push(runtime.block_on(async {
            let started = Instant::now();
            let (mut input, mut output) =
                attached(&engine, &running, &["/bin/sh", "-c", "cat > /tmp/raw"]).await;
            let mut file = tokio::fs::File::open(&source).await.expect("open");
            tokio::io::copy(&mut file, &mut input).await.expect("copy");
            input.shutdown().await.expect("close input");
            while output.next().await.is_some() {}
            started.elapsed()
        }));
        raw_fetch.push(runtime.block_on(async {
            let started = Instant::now();
            let (_input, mut output) = attached(&engine, &running, &["/bin/cat", "/tmp/raw"]).await;
            let mut target = tokio::fs::File::create(dir.join("raw"))
                .await
                .expect("create");
            let mut received = 0u64;
            while let Some(Ok(chunk)) = output.next().await {
                let chunk = chunk.into_bytes();
                received += chunk.len() as u64;
                target.write_all(&chunk).await.expect("write");
            }
            assert_eq!(received, bytes);
            let copied = started.elapsed();
            // The same copy made durable, as a fetch is before it returns.
            target.sync_all().await.expect("fsync");
            (copied, started.elapsed())
        }));
        let started = Instant::now();
        runtime
            .block_on(tun.put(&source, "/tmp/ours").into_future())
            .expect("put");
        put.push(started.elapsed());
        let started = Instant::now();
        runtime
            .block_on(tun.fetch("/tmp/ours", dir.join("ours")).into_future())
            .expect("fetch");
        fetch.push(started.elapsed());
        // Like the plain `cat`, without the sync to disk.
        let started = Instant::now();
        runtime
            .block_on(
                tun.fetch("/tmp/ours", dir.join("ours"))
                    .sync(false)
                    .into_future(),
            )
            .expect("unsynced fetch");
        fetch_unsynced.push(started.elapsed());
    }
    runtime.block_on(tun.close()).expect("close");
    remove_container(&running);
    let _ = std::fs::remove_dir_all(&dir);

    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let rate = |d: Duration| bytes as f64 / d.as_secs_f64() / 1e6;
    let (run_true, ours_new, exec_true, ours_exec) = (
        median(run_true),
        median(ours_new),
        median(exec_true),
        median(ours_exec),
    );
    println!("docker, local Engine, medians");
    println!(
        "  docker run --rm IMAGE true {:8.1} ms | Docker::new connect + call  {:8.1} ms = {:.2}x",
        ms(run_true),
        ms(ours_new),
        ms(ours_new) / ms(run_true)
    );
    println!(
        "  docker exec C true         {:8.1} ms | Docker::exec connect + call {:8.1} ms = {:.2}x",
        ms(exec_true),
        ms(ours_exec),
        ms(ours_exec) / ms(exec_true)
    );
    println!(
        "  64 B via exec attach cat   {:8.1} µs | call                        {:8.1} µs = {:.2}x",
        us(raw_trip),
        us(ours_trip),
        us(ours_trip) / us(raw_trip)
    );
    let (raw_fetch, raw_fetch_durable): (Vec<_>, Vec<_>) = raw_fetch.into_iter().unzip();
    // Each round measures the floor and ours back to back: the median of the
    // per-round ratios is steadier than a ratio of medians on a noisy machine.
    let paired = |ours: &[Duration], floor: &[Duration]| {
        median(
            ours.iter()
                .zip(floor)
                .map(|(ours, floor)| floor.as_secs_f64() / ours.as_secs_f64())
                .collect::<Vec<f64>>(),
        )
    };
    let (put_paired, fetch_paired, fetch_durable_paired, unsynced_paired) = (
        paired(&put, &raw_put),
        paired(&fetch, &raw_fetch),
        paired(&fetch, &raw_fetch_durable),
        paired(&fetch_unsynced, &raw_fetch),
    );
    let fetch_unsynced = median(fetch_unsynced);
    let (raw_put, raw_fetch, raw_fetch_durable, put, fetch) = (
        median(raw_put),
        median(raw_fetch),
        median(raw_fetch_durable),
        median(put),
        median(fetch),
    );
    println!(
        "  {mib} MiB: attach cat > f   {:6.0} MB/s | put   {:6.0} MB/s = {:.2}x (per round {:.2}x)",
        rate(raw_put),
        rate(put),
        rate(put) / rate(raw_put),
        put_paired
    );
    println!(
        "  {mib} MiB: attach cat f     {:6.0} MB/s (then fsync {:6.0} MB/s) | fetch {:6.0} MB/s = {:.2}x ({:.2}x with fsync; per round {:.2}x / {:.2}x)",
        rate(raw_fetch),
        rate(raw_fetch_durable),
        rate(fetch),
        rate(fetch) / rate(raw_fetch),
        rate(fetch) / rate(raw_fetch_durable),
        fetch_paired,
        fetch_durable_paired
    );
    println!(
        "  {mib} MiB: fetch .sync(false) {:6.0} MB/s = {:.2}x the plain cat (per round {:.2}x)",
        rate(fetch_unsynced),
        rate(fetch_unsynced) / rate(raw_fetch),
        unsynced_paired
    );
}
