//! Measures the trivial-call round trip in a plain loop, for profilers.
//!
//! ```sh
//! cargo build --release --example ping_loop
//! taskset -c 0 perf stat -e context-switches target/release/examples/ping_loop 100000
//! ```

use chopsticks::{Local, Tunnel};

fn noop() {}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let calls: u32 = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let tun = Tunnel::new(Local::new());
    runtime.block_on(tun.connect())?;
    let started = std::time::Instant::now();
    for _ in 0..calls {
        runtime.block_on(tun.call(noop, ()))?;
    }
    println!(
        "{:?} per call over {calls} calls",
        started.elapsed() / calls.max(1)
    );
    Ok(())
}
