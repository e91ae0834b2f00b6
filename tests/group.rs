//! Groups: fan-out to several real agents, failures per host, set operations.

use std::collections::BTreeSet;
use std::time::Duration;

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
    // Within the silent host's connect timeout, not its 30 s of silence.
    let result = tokio::time::timeout(Duration::from_secs(10), group.call(sleep_ms, (10,)))
        .await
        .expect("the dead host fails on its own bound");
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
        matches!(&error, Error::Hosts { failures, .. } if failures.len() == 1),
        "{error:?}"
    );
    assert!(error.to_string().contains("fake"), "{error}");
}

/// Runs on each host: meets the other hosts of a group of `count`.
fn meet(dir: std::path::PathBuf, count: usize) -> bool {
    let host = std::process::id().to_string();
    crate::support::rendezvous(dir, host, count)
}

/// Runs on each host: marks itself busy in `dir` for a while and says
/// whether any other host was busy at the same time.
fn alone(dir: std::path::PathBuf) -> bool {
    let mine = dir.join(format!("busy-{}", std::process::id()));
    let others = || {
        std::fs::read_dir(&dir)
            .map(|entries| entries.count())
            .unwrap_or(0)
            > 1
    };
    std::fs::write(&mine, b"").expect("mark busy");
    let mut alone = !others();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(5));
        alone &= !others();
    }
    std::fs::remove_file(&mine).expect("unmark");
    alone
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_run_concurrently_unless_bounded() {
    let group = local_group(&["p1", "p2", "p3"]);
    group.connect().await.into_result().expect("connect");
    // All three meet: they ran at the same time.
    let dir = tempfile::tempdir().expect("tempdir");
    let met = group
        .call(meet, (dir.path().to_path_buf(), 3))
        .await
        .into_result()
        .expect("parallel");
    assert_eq!(met.len(), 3);
    assert!(met.values().all(|met| *met), "{met:?}");

    // One at a time: none ever sees another busy.
    let dir = tempfile::tempdir().expect("tempdir");
    let serial = group.clone().max_parallel(1);
    let alone = serial
        .call(alone, (dir.path().to_path_buf(),))
        .await
        .into_result()
        .expect("serial");
    assert_eq!(alone.len(), 3);
    assert!(alone.values().all(|alone| *alone), "{alone:?}");
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
    let answers: Vec<(&str, u8)> = answers
        .iter()
        .map(|(host, value)| (host.as_str(), *value))
        .collect();
    assert_eq!(answers, [("f1", 42), ("f2", 42)]);
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

#[tokio::test]
async fn put_and_fetch_on_every_host_with_a_host_template() {
    let dir = crate::support::Scratch::new("group");
    let data = crate::support::patterned(&dir.path("source"), 700_000);
    let web = local_group(&["web1", "web2", "web3"]);
    let sent = web
        .put(dir.path("source"), dir.path("remote/app.bin"))
        .create_dirs(true)
        .mode(0o600)
        .await
        .into_result()
        .expect("put everywhere");
    assert_eq!(sent.len(), 3);
    let checksum = blake3::hash(&data).to_hex().to_string();
    assert!(sent.values().all(|transfer| transfer.checksum == checksum));

    let template = format!("{}/{{host}}.bin", dir.path("fetched").display());
    let fetched = web
        .fetch(dir.path("remote/app.bin"), &template)
        .create_dirs(true)
        .await
        .into_result()
        .expect("fetch everywhere");
    for host in ["web1", "web2", "web3"] {
        let local = dir.path(&format!("fetched/{host}.bin"));
        assert_eq!(fetched[host].local_path, local);
        assert_eq!(std::fs::read(&local).expect("read"), data);
    }
}

#[tokio::test]
async fn a_fetch_template_that_collides_is_refused_before_any_transfer() {
    let dir = crate::support::Scratch::new("group-collide");
    crate::support::patterned(&dir.path("source"), 10);
    let web = local_group(&["web1", "web2"]);
    let result = web
        .fetch(
            dir.path("source"),
            dir.path("same.log").display().to_string(),
        )
        .await;
    let failures: Vec<_> = result.failures().collect();
    assert_eq!(failures.len(), 2, "every host gets the refusal");
    for (_, error) in failures {
        assert!(matches!(error, Error::Group { .. }), "{error:?}");
        assert!(error.to_string().contains("{host}"), "{error}");
    }
    assert!(web.tunnels().all(|tunnel| !tunnel.is_connected()));
    assert_eq!(dir.entries(), ["source"]);
}

#[tokio::test]
async fn group_transfers_report_failures_per_host() {
    let dir = crate::support::Scratch::new("group-fail");
    crate::support::patterned(&dir.path("source"), 10);
    let group = local_group(&["good"])
        | Group::from(Tunnel::new(FakeAgent {
            script: "exit 3".into(),
        }));
    let result = group.put(dir.path("source"), dir.path("copy")).await;
    assert_eq!(result.successful().count(), 1);
    let failures: Vec<_> = result.failures().map(|(host, _)| host).collect();
    assert_eq!(failures, ["fake"]);
}

#[cfg(feature = "progress")]
#[tokio::test]
async fn progress_bars_count_every_host() {
    let dir = crate::support::Scratch::new("group-bars");
    crate::support::patterned(&dir.path("source"), 3 * 1024 * 1024);
    let bars = std::sync::Arc::new(chopsticks::progress::Bars::hidden());
    let shared = bars.clone();
    let web = local_group(&["web1", "web2"]).progress(
        move |event: &chopsticks::progress::ProgressEvent<'_>| {
            chopsticks::progress::Progress::report(&*shared, event)
        },
    );
    let result = web.put(dir.path("source"), dir.path("copy")).await;
    assert_eq!(result.successful().count(), 2);
    assert_eq!(bars.finished(), (2, 0));
    let calls = web.call(pid, ()).await;
    assert_eq!(calls.successful().count(), 2);
    assert_eq!(bars.finished(), (4, 0));
}
