//! Connect + first call as root through `sudo` (`Become`), beside the same
//! without it, side by side in one run with a warm agent cache: locally
//! (the shell bootstrap as root, against `sudo` to root from root) and, with
//! the `ssh` feature, over ssh to the test kit's loopback sshd (its
//! `chopsticks-ops` account alone, against `sudo` to root by its NOPASSWD
//! rule, and `chopsticks-pw` with its password). Run as root: the test kit
//! creates the accounts and the sudoers file.
//!
//! ```text
//! cargo bench --features ssh --bench become
//! ```

use std::time::Duration;

use chopsticks::{Become, Local, Transport, Tunnel};
use chopsticks_testkit::sudoers::{self, OPERATOR, PASSWORD, PASSWORD_USER};
use criterion::Criterion;

fn noop() {}

/// A target, a label, and how to make a fresh tunnel for it.
type Case = (&'static str, &'static str, Box<dyn Fn() -> Tunnel>);

fn tunnel(transport: impl Transport) -> Tunnel {
    Tunnel::builder(transport)
        .stderr(chopsticks::stderr::discard())
        .build()
}

fn main() {
    sudoers::prepare().expect("the test kit's accounts and sudoers file (run as root)");
    let mut criterion = Criterion::default().configure_from_args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut cases: Vec<Case> = vec![
        (
            "local",
            "alone",
            Box::new(|| tunnel(Local::named("alone").shell_bootstrap(true))),
        ),
        (
            "local",
            "sudo",
            Box::new(|| tunnel(Become::sudo(Local::named("sudo")))),
        ),
    ];
    #[cfg(feature = "ssh")]
    let sshd = std::sync::Arc::new(
        chopsticks_testkit::Sshd::start("bench-become", 1)
            .expect("an sshd (scripts/test.sh installs openssh-server)"),
    );
    #[cfg(feature = "ssh")]
    {
        let login = |sshd: &chopsticks_testkit::Sshd, user: &str| {
            chopsticks::Ssh::new(sshd.alias(0))
                .config_file(sshd.client_config())
                .user(user)
        };
        let (a, b, c) = (sshd.clone(), sshd.clone(), sshd.clone());
        cases.push((
            "ssh",
            "alone",
            Box::new(move || tunnel(login(&a, OPERATOR))),
        ));
        cases.push((
            "ssh",
            "sudo",
            Box::new(move || tunnel(login(&b, OPERATOR).sudo())),
        ));
        cases.push((
            "ssh",
            "sudo_password",
            Box::new(move || tunnel(login(&c, PASSWORD_USER).sudo().password(PASSWORD))),
        ));
    }
    for target in ["local", "ssh"] {
        let mut group = criterion.benchmark_group(format!("become/{target}"));
        group
            .sample_size(20)
            .measurement_time(Duration::from_secs(8));
        for (_, label, make) in cases.iter().filter(|case| case.0 == target) {
            rt.block_on(make().call(noop, ())).expect("fill the cache");
            group.bench_function(*label, |b| {
                b.iter(|| rt.block_on(make().call(noop, ())).expect("call"))
            });
        }
        group.finish();
    }
    criterion.final_summary();
}
