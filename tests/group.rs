//! Groups: fan-out to several real agents, failures per host, set operations.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use chopsticks::{Error, Group, Local, Tunnel};

use crate::support::FakeAgent;

fn local_group(names: &[&str]) -> Group {
    Group::new(names.iter().map(|name| Tunnel::new(Local::named(*name)))).expect("unique hosts")
}

fn hosts(group: &Group) -> Vec<&str> {
    group.hosts().collect()
}

fn pid() -> u32 {
    std::process::id()
}

fn sleep_ms(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

#[tokio::test]
async fn a_call_runs_on_every_host_and_results_are_keyed_by_host() {
    let web = local_group(&["web3", "web1", "web2"]);
    assert_eq!(hosts(&web), ["web1", "web2", "web3"]);
    let result = web.call(pid, ()).await;
    assert_eq!(result.len(), 3);
    assert_eq!(result.failures().count(), 0);
    let pids: BTreeSet<u32> = result.successful().map(|(_, pid)| *pid).collect();
    assert_eq!(pids.len(), 3, "one agent per host");
    assert!(!pids.contains(&std::process::id()));
    let all = result.into_result().expect("all succeeded");
    assert_eq!(
        all.keys().map(String::as_str).collect::<Vec<_>>(),
        ["web1", "web2", "web3"]
    );
    web.close().await.into_result().expect("closed");
}

#[tokio::test]
async fn duplicate_host_names_are_refused() {
    let error = Group::new([
        Tunnel::new(Local::named("same")),
        Tunnel::new(Local::named("same")),
    ])
    .expect_err("must refuse");
    assert!(matches!(error, Error::Group { .. }), "{error:?}");
    assert!(error.to_string().contains("same"), "{error}");
}

#[tokio::test]
async fn a_dead_host_fails_alone_and_quickly() {
    let silent = Tunnel::builder(FakeAgent {
        script: "sleep 30".into(),
    })
    .connect_timeout(Duration::from_millis(300))
    .build();
    let group = Group::new([Tunnel::new(Local::named("alive")), silent]).expect("group");
    let started = Instant::now();
    let result = group.call(sleep_ms, (10,)).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        result
            .successful()
            .map(|(host, _)| host)
            .collect::<Vec<_>>(),
        ["alive"]
    );
    let failures: Vec<_> = result.failures().collect();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].0, "fake");
    assert!(
        matches!(failures[0].1, Error::Timeout { .. }),
        "{:?}",
        failures[0].1
    );
    let error = result.into_result().expect_err("one host failed");
    assert!(
        matches!(&error, Error::Hosts { failures } if failures.len() == 1),
        "{error:?}"
    );
    assert!(error.to_string().contains("fake"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_run_concurrently_unless_bounded() {
    let group = local_group(&["p1", "p2", "p3"]);
    group.connect().await.into_result().expect("connect");
    let started = Instant::now();
    group
        .call(sleep_ms, (300,))
        .await
        .into_result()
        .expect("parallel");
    let parallel = started.elapsed();
    assert!(
        parallel < Duration::from_millis(800),
        "parallel took {parallel:?}"
    );

    let serial = group.clone().max_parallel(1);
    let started = Instant::now();
    serial
        .call(sleep_ms, (300,))
        .await
        .into_result()
        .expect("serial");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "max_parallel(1) took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_group_timeout_bounds_every_host() {
    let group = local_group(&["t1", "t2"]).timeout(Duration::from_millis(200));
    let result = group.call(sleep_ms, (2000,)).await;
    assert_eq!(result.failures().count(), 2);
    assert!(
        result
            .failures()
            .all(|(_, error)| matches!(error, Error::Timeout { .. }))
    );
}

async fn answer() -> u8 {
    42
}

#[tokio::test]
async fn filter_and_async_calls() {
    let group = local_group(&["f1", "f2"]);
    assert_eq!(hosts(&group.filter(|| true, ()).await), ["f1", "f2"]);
    assert!(group.filter(|| false, ()).await.is_empty());
    let answers = group
        .call_async(answer, ())
        .await
        .into_result()
        .expect("async");
    assert!(answers.values().all(|value| *value == 42));
}

#[tokio::test]
async fn set_operations_work_by_host() {
    let a = local_group(&["h1", "h2", "h3"]);
    let b = local_group(&["h3", "h4"]);
    assert_eq!(hosts(&(&a | &b)), ["h1", "h2", "h3", "h4"]);
    assert_eq!(hosts(&(&a & &b)), ["h3"]);
    assert_eq!(hosts(&(&a - &b)), ["h1", "h2"]);
    assert_eq!(hosts(&(&a ^ &b)), ["h1", "h2", "h4"]);
    let single: Group = Tunnel::new(Local::named("solo")).into();
    assert_eq!(hosts(&(a | single)), ["h1", "h2", "h3", "solo"]);
}
