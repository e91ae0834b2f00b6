//! Heartbeats on the local transport: idle and busy tunnels stay up, and a
//! frozen peer (SIGSTOP: alive, silent, holding its pipes open) is given up
//! by the other end within the timeout. The namespace tests in `partition`
//! do the same across a real cut network.

use std::time::{Duration, Instant};

use chopsticks::{Error, Local, Tunnel};

use crate::support::{process_alive, wait_gone};

fn pid() -> u32 {
    std::process::id()
}

fn sleep_for(millis: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(millis));
    millis
}

fn tunnel(name: &str, heartbeat: Duration) -> Tunnel {
    Tunnel::builder(Local::named(name))
        .heartbeat_timeout(heartbeat)
        .stderr(chopsticks::stderr::discard())
        .build()
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
}

#[tokio::test]
async fn idle_and_busy_tunnels_outlive_many_heartbeat_timeouts() {
    let tun = tunnel("steady", Duration::from_secs(1));
    let agent = tun.call(pid, ()).await.expect("first call");
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(tun.call(pid, ()).await.expect("after idling"), agent);
    // A call far longer than the timeout: heartbeats flow beside it.
    assert_eq!(tun.call(sleep_for, (3500,)).await.expect("long call"), 3500);
    assert_eq!(tun.call(pid, ()).await.expect("after the long call"), agent);
}

#[tokio::test]
async fn a_frozen_agent_is_given_up_and_killed_within_the_timeout() {
    let timeout = Duration::from_secs(1);
    let tun = tunnel("frozen-agent", timeout);
    let agent = tun.call(pid, ()).await.expect("pid");
    let call = tokio::spawn({
        let tun = tun.clone();
        async move { tun.call(sleep_for, (30_000,)).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    signal(agent, libc::SIGSTOP);
    let frozen = Instant::now();
    let error = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("the call must not hang")
        .expect("join")
        .expect_err("a frozen agent answers nothing");
    let after = frozen.elapsed();
    crate::support::figure("heartbeat 1 s: a frozen agent's call failed after", after);
    assert!(
        matches!(&error, Error::Disconnected { host, .. } if host == "frozen-agent"),
        "{error:?}"
    );
    assert!(
        error.to_string().contains("nothing came from the agent"),
        "{error}"
    );
    // Silence counts from the last frame, up to a heartbeat interval before the freeze.
    assert!(
        after >= timeout * 3 / 4 && after < timeout * 2,
        "gave up after {after:?}"
    );
    assert!(
        wait_gone(agent, Duration::from_secs(2)).await,
        "the frozen agent {agent} was not killed"
    );
    assert_ne!(tun.call(pid, ()).await.expect("reconnects"), agent);
}

/// Runs on agent A: opens a tunnel to agent B with `timeout` and holds it;
/// returns B's pid.
async fn hold_tunnel(timeout_ms: u64) -> Result<u32, String> {
    let tunnel = tunnel("b", Duration::from_millis(timeout_ms));
    tunnel.connect().await.map_err(|error| error.to_string())?;
    let agent = tunnel.agent_pid().ok_or("no pid")?;
    tokio::spawn(async move {
        let _tunnel = tunnel;
        std::future::pending::<()>().await;
    });
    Ok(agent)
}

#[tokio::test]
async fn an_agent_whose_controller_froze_exits_within_the_timeout() {
    let timeout = Duration::from_secs(1);
    let a = tunnel("a", Duration::from_secs(60));
    let b = a
        .call_async(hold_tunnel, (timeout.as_millis() as u64,))
        .await
        .expect("call A")
        .expect("A opens a tunnel to B");
    let a_pid = a.agent_pid().expect("A's pid");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(process_alive(b), "B must live while A's heartbeats come");
    signal(a_pid, libc::SIGSTOP);
    let frozen = Instant::now();
    let gone = wait_gone(b, Duration::from_secs(3)).await;
    let after = frozen.elapsed();
    crate::support::figure(
        &format!("heartbeat {timeout:?}: agent of a frozen controller gone after"),
        after,
    );
    signal(a_pid, libc::SIGKILL);
    assert!(gone, "B still runs 3 s after its controller froze");
    assert!(
        after >= timeout * 3 / 4,
        "B left after {after:?}, before the timeout"
    );
}
