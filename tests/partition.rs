//! A network partition, for real: an sshd in a network namespace, cut off
//! with iptables DROP rules while a call is pending and a put is staged.
//! Both ends notice through heartbeats: the controller fails what is
//! pending with an error that says what was seen, and the agent on the far
//! side exits and drops what it staged.

use std::time::{Duration, Instant};

use chopsticks::{Error, Ssh, Tunnel};
use chopsticks_testkit::netns::{NetnsHost, netns_or_skip};
use chopsticks_testkit::{Sshd, require};

use crate::support::Scratch;
use crate::support::{process_alive, wait_gone};

const HEARTBEAT: Duration = Duration::from_secs(2);

fn sleep_long() -> u32 {
    std::thread::sleep(Duration::from_secs(60));
    0
}

fn sparse(path: &std::path::Path, len: u64) {
    std::fs::File::create(path)
        .and_then(|file| file.set_len(len))
        .expect("sparse file");
}

/// A host in its own namespace with an sshd on it.
fn far_host(test: &str) -> Option<(NetnsHost, Sshd)> {
    let host = netns_or_skip(test)?;
    let sshd = require(Sshd::start_in(&host, test, 1), test)?;
    Some((host, sshd))
}

/// What a partition did to one tunnel: the pending call's error and when
/// it came, and when the far agent was gone.
struct Outcome {
    error: Error,
    error_after: Duration,
    agent_gone_after: Option<Duration>,
}

/// Connects `tunnel`, stages a put and a 60 s call on it, cuts `host` off,
/// and watches both ends.
async fn partition_under_load(tunnel: &Tunnel, host: &NetnsHost, dir: &Scratch) -> Outcome {
    tunnel.connect().await.expect("connect");
    let agent = tunnel.agent_pid().expect("the agent's pid");
    let call = tokio::spawn({
        let tunnel = tunnel.clone();
        async move { tunnel.call(sleep_long, ()).await }
    });
    sparse(&dir.path("source"), 1 << 30);
    let put = tokio::spawn({
        let tunnel = tunnel.clone();
        let (source, target) = (dir.path("source"), dir.path("target"));
        async move { tunnel.put(source, target).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(process_alive(agent), "the far agent ended before the cut");
    host.partition().expect("iptables DROP");
    let cut = Instant::now();
    let error = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("the pending call must not hang")
        .expect("join")
        .expect_err("nothing can come back through the partition");
    let error_after = cut.elapsed();
    let agent_gone_after = wait_gone(agent, HEARTBEAT * 3).await.then(|| cut.elapsed());
    let what = std::thread::current()
        .name()
        .unwrap_or("partition")
        .to_string();
    crate::support::figure(&format!("{what}: error after the cut"), error_after);
    crate::support::figure(
        &format!("{what}: far agent gone after the cut"),
        agent_gone_after,
    );
    let put = tokio::time::timeout(Duration::from_secs(10), put)
        .await
        .expect("the put must not hang")
        .expect("join");
    assert!(put.is_err(), "a put through a partition cannot succeed");
    Outcome {
        error,
        error_after,
        agent_gone_after,
    }
}

fn assert_far_side_cleaned_up(outcome: &Outcome, dir: &Scratch) {
    let gone = outcome
        .agent_gone_after
        .expect("the agent behind the partition must exit");
    assert!(
        gone < HEARTBEAT * 2,
        "the far agent took {gone:?} to exit after the cut"
    );
    let staged: Vec<String> = dir
        .entries()
        .into_iter()
        .filter(|name| name.contains(".chopsticks-"))
        .collect();
    assert!(staged.is_empty(), "staged files left: {staged:?}");
    assert!(!dir.path("target").exists(), "a torn put was committed");
}

#[tokio::test]
async fn both_ends_give_up_on_a_partition_through_the_ssh_client() {
    let Some((host, sshd)) = far_host("partition-ssh") else {
        return;
    };
    let dir = Scratch::shared("partition-ssh");
    let tunnel = Tunnel::builder(Ssh::new(sshd.alias(0)).config_file(sshd.client_config()))
        .heartbeat_timeout(HEARTBEAT)
        .stderr(chopsticks::stderr::discard())
        .build();
    let outcome = partition_under_load(&tunnel, &host, &dir).await;
    let text = outcome.error.to_string();
    assert!(
        matches!(&outcome.error, Error::Disconnected { host, .. } if host == sshd.alias(0)),
        "{:?}",
        outcome.error
    );
    assert!(text.contains("nothing came from the agent"), "{text}");
    assert!(
        outcome.error_after < HEARTBEAT * 2,
        "the controller took {:?} to give up",
        outcome.error_after
    );
    assert_far_side_cleaned_up(&outcome, &dir);
    eprintln!(
        "partition, ssh client: error after {:?}, far agent gone after {:?}",
        outcome.error_after, outcome.agent_gone_after
    );
}

/// With the heartbeat out of the way, ssh's own keep-alive notices first:
/// the error says what ssh said.
#[tokio::test]
async fn the_ssh_clients_own_timeout_is_what_the_error_says() {
    let Some((host, sshd)) = far_host("partition-alive") else {
        return;
    };
    let ssh = Ssh::new(sshd.alias(0))
        .config_file(sshd.client_config())
        .option("LogLevel", "INFO")
        .option("ServerAliveInterval", "1")
        .option("ServerAliveCountMax", "2");
    let tunnel = Tunnel::builder(ssh)
        .stderr(chopsticks::stderr::discard())
        .build();
    tunnel.connect().await.expect("connect");
    let call = tokio::spawn({
        let tunnel = tunnel.clone();
        async move { tunnel.call(sleep_long, ()).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    host.partition().expect("iptables DROP");
    let error = tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .expect("no hang")
        .expect("join")
        .expect_err("partitioned");
    let text = error.to_string();
    assert!(text.contains("not responding"), "{text}");
}

#[cfg(feature = "libssh2")]
#[tokio::test]
async fn both_ends_give_up_on_a_partition_through_libssh2() {
    let Some((host, sshd)) = far_host("partition-native") else {
        return;
    };
    let dir = Scratch::shared("partition-native");
    let transport = chopsticks::NativeSsh::new(sshd.address().to_string())
        .port(sshd.port())
        .user(sshd.user())
        .identity_file(sshd.client_key())
        .known_hosts(sshd.known_hosts());
    let tunnel = Tunnel::builder(transport)
        .heartbeat_timeout(HEARTBEAT)
        .stderr(chopsticks::stderr::discard())
        .build();
    let outcome = partition_under_load(&tunnel, &host, &dir).await;
    let text = outcome.error.to_string();
    assert!(text.contains("nothing came from the agent"), "{text}");
    assert!(!text.contains("status 0"), "{text}");
    assert_far_side_cleaned_up(&outcome, &dir);
    eprintln!(
        "partition, libssh2: error after {:?}, far agent gone after {:?}",
        outcome.error_after, outcome.agent_gone_after
    );
}
