//! put and fetch of a large file on the local transport, beside the raw pipe
//! floors measured in the same run, with the peak memory of both ends.
//!
//! ```text
//! cargo bench --bench transfer                                  # 1 GiB, 4 rounds
//! CHOPSTICKS_BENCH_MIB=4096 CHOPSTICKS_BENCH_ROUNDS=1 cargo bench --bench transfer
//! CHOPSTICKS_BENCH_ONLY=put cargo bench --bench transfer        # one direction, with CPU times
//! ```
//!
//! Floors, each a pipe between two processes:
//! - `dd | cat`: `dd if=/dev/zero bs=1M | cat > /dev/null`, the bare pipe;
//! - `cat | cat`: `cat SRC | cat > DST`, the same file copy, unchecked and not synced;
//! - `cat | dd fsync`: `cat SRC | dd of=DST bs=256k conv=fsync`, the copy made durable
//!   as ours are (ours also hash both ends and rename into place).
//!
//! After a warm-up round, every round runs the five in a rotated order, each
//! after deleting the targets and `sync`, and the medians are reported.

#[allow(dead_code)]
mod support;

use std::future::IntoFuture;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use chopsticks::{Local, Tunnel};

use chopsticks_testkit::peak_resident_kib;
use support::{env_number, median, write_source};

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let seconds = |time: libc::timeval| time.tv_sec as f64 + time.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

fn shell(script: &str, args: &[&Path]) -> Duration {
    let started = Instant::now();
    let status = Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("bench")
        .args(args)
        .status()
        .expect("sh");
    assert!(status.success(), "{script} failed");
    started.elapsed()
}

fn main() {
    if std::env::args().any(|arg| arg == "--list") {
        println!("transfer: bench");
        return;
    }
    let mib = env_number("CHOPSTICKS_BENCH_MIB", 1024);
    let rounds = env_number("CHOPSTICKS_BENCH_ROUNDS", 4);
    let dir: PathBuf =
        std::env::temp_dir().join(format!("chopsticks-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let source = dir.join("source");
    let put_target = dir.join("put");
    let fetch_target = dir.join("fetched");
    let raw_target = dir.join("raw");
    write_source(&source, mib);
    let bytes = (mib as u64) << 20;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let tunnel = Tunnel::new(Local::new());
    runtime.block_on(tunnel.connect()).expect("connect");
    let before = peak_resident_kib();

    let (mut dd, mut cat, mut durable, mut put, mut fetch) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // For profiling one direction: CHOPSTICKS_BENCH_ONLY=put or fetch.
    let only = std::env::var("CHOPSTICKS_BENCH_ONLY").unwrap_or_default();
    if !only.is_empty() {
        runtime
            .block_on(tunnel.put(&source, &put_target).into_future())
            .expect("put");
        for _ in 0..rounds {
            let _ = std::fs::remove_file(&fetch_target);
            if only == "put" {
                let _ = std::fs::remove_file(&put_target);
            }
            let _ = Command::new("sync").status();
            let started = Instant::now();
            let (ours, agents) = (
                cpu_seconds(),
                runtime.block_on(tunnel.call(cpu_seconds, ())).expect("cpu"),
            );
            match only.as_str() {
                "put" => runtime
                    .block_on(tunnel.put(&source, &put_target).into_future())
                    .map(drop),
                _ => runtime
                    .block_on(tunnel.fetch(&source, &fetch_target).into_future())
                    .map(drop),
            }
            .expect("transfer");
            println!(
                "{only}: {:.0} MB/s, cpu controller {:.2}s agent {:.2}s",
                bytes as f64 / started.elapsed().as_secs_f64() / 1e6,
                cpu_seconds() - ours,
                runtime.block_on(tunnel.call(cpu_seconds, ())).expect("cpu") - agents
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    // Each measurement starts with no target to replace (freeing a large
    // file's blocks is the filesystem's cost, not the pipe's) and no dirty
    // pages left by the one before.
    let settle = || {
        for target in [&raw_target, &put_target, &fetch_target] {
            let _ = std::fs::remove_file(target);
        }
        let _ = Command::new("sync").status();
    };
    // The order rotates every round, so that no contender always runs in the
    // state the one before left (on a VM, freshly freed pages are slow to touch).
    // Round 0 is a warm-up whose times are dropped: the first writes into
    // freshly reported guest memory are slow on a VM.
    let mut checksums = Vec::new();
    for round in 0..=rounds {
        if round == 1 {
            for samples in [&mut dd, &mut cat, &mut durable, &mut put, &mut fetch] {
                samples.clear();
            }
        }
        for step in 0..5 {
            settle();
            let started = Instant::now();
            match (round + step) % 5 {
                0 => {
                    shell(
                        &format!("dd if=/dev/zero bs=1M count={mib} status=none | cat > /dev/null"),
                        &[],
                    );
                    dd.push(started.elapsed());
                }
                1 => {
                    shell("cat \"$1\" | cat > \"$2\"", &[&source, &raw_target]);
                    cat.push(started.elapsed());
                }
                2 => {
                    shell(
                        "cat \"$1\" | dd of=\"$2\" bs=256k conv=fsync status=none",
                        &[&source, &raw_target],
                    );
                    durable.push(started.elapsed());
                }
                3 => {
                    let sent = runtime
                        .block_on(tunnel.put(&source, &put_target).into_future())
                        .expect("put");
                    put.push(started.elapsed());
                    assert_eq!(sent.size, bytes);
                    checksums.push(sent.checksum);
                }
                _ => {
                    let back = runtime
                        .block_on(tunnel.fetch(&source, &fetch_target).into_future())
                        .expect("fetch");
                    fetch.push(started.elapsed());
                    checksums.push(back.checksum);
                }
            }
        }
    }
    checksums.dedup();
    assert_eq!(checksums.len(), 1, "every transfer saw the same content");
    let agent_peak = runtime
        .block_on(tunnel.call(peak_resident_kib, ()))
        .expect("agent peak");
    let controller_peak = peak_resident_kib();

    let rate = |elapsed: Duration| bytes as f64 / elapsed.as_secs_f64() / 1e6;
    let (dd, cat, durable, put, fetch) = (
        median(dd),
        median(cat),
        median(durable),
        median(put),
        median(fetch),
    );
    println!("transfer of {mib} MiB, median of {rounds} rounds");
    println!("  dd | cat (bare pipe)      {:8.0} MB/s", rate(dd));
    println!("  cat SRC | cat > DST       {:8.0} MB/s", rate(cat));
    println!("  cat SRC | dd fsync        {:8.0} MB/s", rate(durable));
    for (name, elapsed) in [("put", put), ("fetch", fetch)] {
        println!(
            "  {name:<25} {:8.0} MB/s  = {:.2}x dd|cat, {:.2}x cat|cat, {:.2}x cat|dd fsync",
            rate(elapsed),
            rate(elapsed) / rate(dd),
            rate(elapsed) / rate(cat),
            rate(elapsed) / rate(durable)
        );
    }
    println!("  agent peak RSS            {:8} KiB", agent_peak);
    println!(
        "  controller peak RSS       {:8} KiB ({} KiB before the transfers)",
        controller_peak, before
    );
    let _ = std::fs::remove_dir_all(&dir);
}
