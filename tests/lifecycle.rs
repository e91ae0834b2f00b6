//! Connection lifecycle: close and reconnect, drop, agent exit on EOF, killed agents.

use std::time::{Duration, Instant};

use chopsticks::{Error, Local, Tunnel};
use tokio::io::AsyncReadExt;

use crate::support::{capture_stderr, process_alive, wait_gone};

fn pid() -> u32 {
    std::process::id()
}

#[tokio::test]
async fn close_stops_the_agent_and_the_next_call_reconnects() {
    let tun = Tunnel::new(Local::new());
    let first = tun.call(pid, ()).await.expect("first");
    tun.close().await.expect("close");
    assert!(!tun.is_connected());
    assert!(
        wait_gone(first, Duration::from_secs(2)).await,
        "agent {first} still runs after close"
    );
    let second = tun.call(pid, ()).await.expect("second");
    assert_ne!(first, second);
}

#[tokio::test]
async fn dropping_the_last_handle_terminates_the_agent() {
    let tun = Tunnel::new(Local::new());
    let clone = tun.clone();
    let agent = tun.call(pid, ()).await.expect("call");
    drop(tun);
    assert!(process_alive(agent), "a clone still holds the agent");
    drop(clone);
    assert!(
        wait_gone(agent, Duration::from_secs(2)).await,
        "agent {agent} outlived its tunnel"
    );
}

#[tokio::test]
async fn an_agent_exits_when_its_stdin_closes() {
    // Start an agent by hand, as a controller would, then vanish like a killed controller.
    let mut child = tokio::process::Command::new("/proc/self/exe")
        .env(
            chopsticks_core::__private::agent_env::AGENT_MARKER,
            chopsticks_core::__private::protocol::PROTOCOL_VERSION.to_string(),
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut hello = [0u8; 4];
    stdout
        .read_exact(&mut hello)
        .await
        .expect("the agent says hello");
    drop(child.stdin.take());
    let status = tokio::time::timeout(Duration::from_secs(2), child.wait())
        .await
        .expect("the agent exits within 2 s of losing its controller")
        .expect("wait");
    assert!(status.success(), "{status}");
}

fn speak_then_sleep() -> u32 {
    eprintln!("about to sleep for a long time");
    std::thread::sleep(Duration::from_secs(30));
    0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_agent_fails_pending_calls_fast_and_names_host_and_stderr() {
    let (sink, _lines) = capture_stderr();
    let tun = Tunnel::builder(Local::named("doomed")).stderr(sink).build();
    let agent = tun.call(pid, ()).await.expect("pid");
    let mut calls = Vec::new();
    for _ in 0..4 {
        let tun = tun.clone();
        calls.push(tokio::spawn(
            async move { tun.call(speak_then_sleep, ()).await },
        ));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(agent as i32, libc::SIGKILL) }, 0);
    // Each pending call fails on the kill, well before its 30 s sleep could end.
    for call in calls {
        let error = tokio::time::timeout(crate::support::EVENT_BOUND, call)
            .await
            .expect("the kill fails the pending call")
            .expect("join")
            .expect_err("the call cannot succeed");
        let Error::Disconnected {
            host,
            reason,
            stderr_tail,
            ..
        } = &error
        else {
            panic!("expected Disconnected, got {error:?}");
        };
        assert_eq!(host, "doomed");
        assert!(reason.contains("signal 9"), "{reason}");
        assert!(
            stderr_tail
                .iter()
                .any(|line| line.contains("about to sleep")),
            "{stderr_tail:?}"
        );
        assert!(error.to_string().contains("doomed"), "{error}");
    }
    let next = tun.call(pid, ()).await.expect("reconnects");
    assert_ne!(next, agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_kills_a_frozen_agent_and_fails_the_calls_in_flight() {
    let tun = Tunnel::new(Local::named("frozen"));
    let agent = tun.call(pid, ()).await.expect("pid");
    let call = tokio::spawn({
        let tun = tun.clone();
        async move { tun.call(speak_then_sleep, ()).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(agent as i32, libc::SIGSTOP) }, 0);
    let closing = Instant::now();
    tun.close().await.expect("close");
    assert!(
        closing.elapsed() < Duration::from_secs(8),
        "close took {:?}",
        closing.elapsed()
    );
    let error = tokio::time::timeout(Duration::from_secs(2), call)
        .await
        .expect("the call in flight fails once close gives up waiting")
        .expect("join")
        .expect_err("the call cannot succeed");
    assert!(
        matches!(&error, Error::Disconnected { host, .. } if host == "frozen"),
        "{error:?}"
    );
    assert!(error.to_string().contains("killed"), "{error}");
    assert!(
        wait_gone(agent, Duration::from_secs(2)).await,
        "the frozen agent {agent} was not killed"
    );
}

/// A call pending when its tunnel is closed says the tunnel was closed,
/// not merely that the agent exited with status 0.
#[tokio::test]
async fn a_call_pending_at_close_says_the_tunnel_was_closed() {
    let tun = Tunnel::builder(Local::named("closing"))
        .stderr(chopsticks::stderr::discard())
        .build();
    tun.connect().await.expect("connect");
    let pending = tokio::spawn({
        let tun = tun.clone();
        async move { tun.call(speak_then_sleep, ()).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    tun.close().await.expect("close");
    let error = tokio::time::timeout(crate::support::EVENT_BOUND, pending)
        .await
        .expect("the close ends the pending call")
        .expect("join")
        .expect_err("the call cannot finish");
    assert!(error.is_disconnected(), "{error:?}");
    assert!(error.to_string().contains("tunnel was closed"), "{error}");
}

fn say(line: String) {
    eprintln!("{line}");
}

/// A disconnect explains itself with what the agent wrote since the last
/// call that completed, not with lines of earlier, unrelated calls.
#[tokio::test]
async fn a_disconnect_shows_only_stderr_written_since_the_last_completed_call() {
    let tun = Tunnel::builder(Local::named("stale"))
        .stderr(chopsticks::stderr::discard())
        .build();
    tun.call(say, ("from an earlier call".to_string(),))
        .await
        .expect("say");
    let agent = tun.call(pid, ()).await.expect("pid");
    let pending = tokio::spawn({
        let tun = tun.clone();
        async move { tun.call(speak_then_sleep, ()).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(agent as i32, libc::SIGKILL) }, 0);
    let error = tokio::time::timeout(crate::support::EVENT_BOUND, pending)
        .await
        .expect("the kill fails the pending call")
        .expect("join")
        .expect_err("killed");
    let Error::Disconnected { stderr_tail, .. } = &error else {
        panic!("{error:?}");
    };
    assert!(
        stderr_tail
            .iter()
            .any(|line| line.contains("about to sleep")),
        "{stderr_tail:?}"
    );
    assert!(
        !stderr_tail.iter().any(|line| line.contains("earlier call")),
        "{stderr_tail:?}"
    );
}
