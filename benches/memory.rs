//! Memory figures: agent resident memory when idle and after a 64 MiB call,
//! and controller memory per idle tunnel. Prints a Markdown table.
//!
//! Run with `cargo bench --bench memory`.

use std::time::Duration;

use chopsticks::{Local, Tunnel};

/// Resident memory from `smaps_rollup`, which (unlike `VmRSS`) counts transparent huge pages.
fn resident_kib(pid: u32) -> u64 {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    rollup
        .lines()
        .find_map(|line| line.strip_prefix("Rss:"))
        .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn byte_len(data: Vec<u8>) -> usize {
    data.len()
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> chopsticks::Result<()> {
    // `cargo bench` passes `--bench`; nothing here takes arguments.
    let tun = Tunnel::new(Local::new());
    tun.connect().await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let agent = tun.agent_pid().unwrap_or(0);
    let idle = resident_kib(agent);

    tun.call(byte_len, (vec![7u8; 64 << 20],)).await?;
    let busy = resident_kib(agent);
    tokio::time::sleep(chopsticks_core::__private::buffer::SPARE_IDLE * 2).await;
    let after = resident_kib(agent);
    tun.close().await?;

    const TUNNELS: u64 = 100;
    tokio::time::sleep(chopsticks_core::__private::buffer::SPARE_IDLE * 2).await;
    let before = resident_kib(std::process::id());
    let tunnels: Vec<Tunnel> = (0..TUNNELS)
        .map(|i| Tunnel::new(Local::named(format!("t{i}"))))
        .collect();
    for tunnel in &tunnels {
        tunnel.connect().await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let grown = resident_kib(std::process::id()).saturating_sub(before);
    let agents: u64 = tunnels
        .iter()
        .filter_map(Tunnel::agent_pid)
        .map(resident_kib)
        .sum();

    println!("| figure | value |");
    println!("|---|---|");
    println!(
        "| agent resident memory, idle after connect | {} |",
        mib(idle)
    );
    println!(
        "| agent resident memory, right after a 64 MiB argument | {} |",
        mib(busy)
    );
    println!(
        "| agent resident memory, {} s after it | {} |",
        (chopsticks_core::__private::buffer::SPARE_IDLE * 2).as_secs(),
        mib(after)
    );
    println!(
        "| controller memory per idle tunnel ({TUNNELS} tunnels) | {} KiB |",
        grown / TUNNELS
    );
    println!(
        "| mean agent resident memory over those {TUNNELS} agents | {} |",
        mib(agents / TUNNELS)
    );
    Ok(())
}
