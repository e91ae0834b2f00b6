//! Calls a few functions in an agent on the local transport.
//!
//! Run with `cargo run --example quickstart`.

use chopsticks::{Local, Tunnel};

fn add3(a: i64, b: i64, c: i64) -> i64 {
    a + b + c
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs_f64())
        .unwrap_or(0.0)
}

async fn uptime() -> String {
    tokio::fs::read_to_string("/proc/uptime")
        .await
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> chopsticks::Result<()> {
    let tun = Tunnel::new(Local::new());
    let started = std::time::Instant::now();
    let t: f64 = tun.call(now_secs, ()).await?;
    println!(
        "time on {}: {t:.3} (connect + first call took {:?})",
        tun.host(),
        started.elapsed()
    );
    println!(
        "add3(1, 2, 39) on {} = {}",
        tun.host(),
        tun.call(add3, (1, 2, 39)).await?
    );
    let pid: u32 = tun.call(std::process::id, ()).await?;
    println!(
        "the agent runs as pid {pid}; this program is pid {}",
        std::process::id()
    );
    println!(
        "uptime on {}: {}",
        tun.host(),
        tun.call_async(uptime, ()).await?.trim()
    );
    tun.close().await
}
