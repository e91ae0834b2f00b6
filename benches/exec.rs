//! The `Exec` transport through `ip netns exec` beside `Local`, in one run:
//! a trivial call, and a 64 MiB argument. Needs root and iproute2 (the
//! namespace is made here and removed afterwards).
//!
//! ```text
//! taskset -c 0 cargo bench --bench exec      # pinned, as BENCHMARKS.md quotes
//! ```

use std::time::Duration;

use chopsticks::{Exec, Local, Tunnel};
use criterion::{BatchSize, Criterion, Throughput};

const MIB64: usize = 64 << 20;

fn noop() {}

fn vec_len(data: Vec<u8>) -> u64 {
    data.len() as u64
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    let namespace = chopsticks_testkit::netns::NetnsHost::create()
        .expect("a network namespace (root and iproute2; scripts/test.sh installs them)");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let tunnels = [
        ("local", Tunnel::new(Local::named("local"))),
        (
            "exec_ip_netns",
            Tunnel::builder(Exec::new(["ip", "netns", "exec", namespace.name()]).named("netns"))
                .stderr(chopsticks::stderr::discard())
                .build(),
        ),
    ];
    for (_, tun) in &tunnels {
        rt.block_on(tun.connect()).expect("connect");
    }
    let mut group = criterion.benchmark_group("exec/round_trip");
    for (name, tun) in &tunnels {
        group.bench_function(format!("{name}_trivial_call"), |b| {
            b.iter(|| rt.block_on(tun.call(noop, ())).expect("call"))
        });
    }
    group.finish();
    let mut group = criterion.benchmark_group("exec/payload_64MiB");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .throughput(Throughput::Bytes(MIB64 as u64));
    let data = vec![0x5au8; MIB64];
    for (name, tun) in &tunnels {
        group.bench_function(format!("{name}_vec_u8_argument"), |b| {
            b.iter_batched(
                || data.clone(),
                |data| rt.block_on(tun.call(vec_len, (data,))).expect("call"),
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
    for (_, tun) in &tunnels {
        let _ = rt.block_on(tun.close());
    }
    criterion.final_summary();
}
