//! Measures the trivial-call round trip in a plain loop, for profilers;
//! with `stream`, a one-item streaming call instead.
//!
//! ```sh
//! cargo build --release --example ping_loop
//! taskset -c 0 perf stat -e context-switches target/release/examples/ping_loop 100000
//! taskset -c 0 perf stat -e context-switches target/release/examples/ping_loop 100000 stream
//! ```

use chopsticks::{Local, Tunnel};
use futures_util::StreamExt;

fn noop() {}

fn one_item() -> std::iter::Once<u64> {
    std::iter::once(7)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let calls: u32 = args.next().and_then(|n| n.parse().ok()).unwrap_or(100_000);
    let streams = args.next().is_some_and(|mode| mode == "stream");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let tun = Tunnel::new(Local::new());
    runtime.block_on(tun.connect())?;
    let started = std::time::Instant::now();
    for _ in 0..calls {
        if streams {
            runtime.block_on(async {
                let mut items = tun.call_stream(one_item, ());
                while let Some(item) = items.next().await {
                    item?;
                }
                Ok::<_, chopsticks::Error>(())
            })?;
        } else {
            runtime.block_on(tun.call(noop, ()))?;
        }
    }
    let what = if streams { "stream" } else { "call" };
    println!(
        "{:?} per {what} over {calls} rounds",
        started.elapsed() / calls.max(1)
    );
    Ok(())
}
