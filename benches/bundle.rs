//! Connect + first call through the shell bootstrap with the program alone
//! and with its loader and libraries (`TunnelBuilder::bundle_libraries`),
//! side by side in one run: with a warm cache and a cold (emptied) one,
//! locally (`Local::shell_bootstrap`) and, with the `ssh` feature, over ssh
//! to the test kit's loopback sshd.
//!
//! ```text
//! cargo bench --features ssh --bench bundle
//! ```

#[allow(dead_code)]
mod support;

use std::path::Path;
use std::time::Duration;

use chopsticks::{Local, Tunnel};
use criterion::{BatchSize, Criterion};

fn noop() {}

/// Where the bootstrap runs.
enum Target {
    Local(tempfile::TempDir),
    #[cfg(feature = "ssh")]
    Ssh(chopsticks_testkit::Sshd),
}

impl Target {
    fn name(&self) -> &'static str {
        match self {
            Target::Local(_) => "local",
            #[cfg(feature = "ssh")]
            Target::Ssh(_) => "ssh",
        }
    }

    fn tunnel(&self, bundle: bool) -> Tunnel {
        let builder = match self {
            Target::Local(cache) => Tunnel::builder(
                Local::named("booted")
                    .shell_bootstrap(true)
                    .env("XDG_CACHE_HOME", cache.path().display().to_string()),
            ),
            #[cfg(feature = "ssh")]
            Target::Ssh(sshd) => Tunnel::builder(
                chopsticks::Ssh::new(sshd.alias(0)).config_file(sshd.client_config()),
            ),
        };
        builder
            .bundle_libraries(bundle)
            .stderr(chopsticks::stderr::discard())
            .build()
    }

    fn empty_cache(&self) {
        match self {
            Target::Local(cache) => empty(cache.path()),
            #[cfg(feature = "ssh")]
            Target::Ssh(sshd) => support::empty_remote_cache(sshd),
        }
    }
}

fn empty(cache: &Path) {
    let _ = std::fs::remove_dir_all(cache.join("chopsticks"));
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    #[allow(unused_mut)]
    let mut targets = vec![Target::Local(tempfile::tempdir().expect("cache"))];
    #[cfg(feature = "ssh")]
    targets.push(Target::Ssh(
        chopsticks_testkit::Sshd::start("bench-bundle", 1)
            .expect("an sshd (scripts/test.sh installs openssh-server)"),
    ));
    for target in &targets {
        let mut group = criterion.benchmark_group(format!("bundle/{}", target.name()));
        group
            .sample_size(20)
            .measurement_time(Duration::from_secs(8));
        for (label, bundle) in [("alone", false), ("bundle", true)] {
            rt.block_on(target.tunnel(bundle).call(noop, ()))
                .expect("fill the cache");
            group.bench_function(format!("{label}_warm"), |b| {
                b.iter(|| {
                    rt.block_on(target.tunnel(bundle).call(noop, ()))
                        .expect("call")
                })
            });
        }
        for (label, bundle) in [("alone", false), ("bundle", true)] {
            group.bench_function(format!("{label}_cold"), |b| {
                b.iter_batched(
                    || {
                        target.empty_cache();
                        target.tunnel(bundle)
                    },
                    |tun| rt.block_on(tun.call(noop, ())).expect("call"),
                    BatchSize::PerIteration,
                )
            });
        }
        group.finish();
    }
    criterion.final_summary();
}
