//! A controller killed mid-work: its agent must be gone within a second and
//! leave no staged file, whether the agent was receiving a put, running a
//! call or sending a fetch; locally and over ssh, and when the sshd session
//! between them is killed instead.
//!
//! The controller under test is a real one: an agent of this test process
//! (agent A) opens its own tunnel to agent B, starts the work, and is then
//! SIGKILLed. B is the agent whose fate is checked.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chopsticks::{Local, Tunnel};
use serde::{Deserialize, Serialize};

use crate::support::Scratch;
use crate::support::{process_alive, wait_gone};

/// Where agent A opens its tunnel to agent B.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Target {
    /// A local subprocess of A.
    Local,
    /// Over the test-kit sshd, through the `ssh` client.
    Ssh { config: PathBuf, alias: String },
}

impl Target {
    fn tunnel(&self) -> Tunnel {
        let builder = match self {
            Target::Local => Tunnel::builder(Local::named("b")),
            #[cfg(feature = "ssh")]
            Target::Ssh { config, alias } => {
                Tunnel::builder(chopsticks::Ssh::new(alias).config_file(config))
            }
            #[cfg(not(feature = "ssh"))]
            Target::Ssh { .. } => unreachable!("ssh targets need the ssh feature"),
        };
        builder.stderr(chopsticks::stderr::discard()).build()
    }
}

/// What A starts on B before it is killed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Work {
    /// A put of `source` to `target`; A returns once `moved` bytes have gone.
    Put {
        source: PathBuf,
        target: PathBuf,
        moved: u64,
    },
    /// A 30 s blocking call.
    Call,
    /// A fetch of `source` to `target` on A's side; B streams it. A returns
    /// once 8 MiB have come.
    Fetch { source: PathBuf, target: PathBuf },
}

fn sleep_long() -> u32 {
    std::thread::sleep(Duration::from_secs(30));
    0
}

/// Runs on agent A: opens a tunnel to B, starts `work` in the background and
/// returns B's pid once the work is under way. The tunnel lives in the task
/// until A is killed.
async fn start_work(target: Target, work: Work) -> Result<u32, String> {
    let tunnel = target.tunnel();
    tunnel.connect().await.map_err(|error| error.to_string())?;
    let pid = tunnel.agent_pid().ok_or("B has no pid")?;
    let moved = match work {
        Work::Put { moved, .. } => moved,
        _ => 8 << 20,
    };
    let (moving, under_way) = tokio::sync::oneshot::channel::<()>();
    let moving = std::sync::Mutex::new(Some(moving));
    let report = move |event: &chopsticks::progress::ProgressEvent<'_>| {
        if let chopsticks::progress::ProgressEvent::Advanced { done, .. } = event
            && *done >= moved
            && let Some(moving) = moving.lock().ok().and_then(|mut moving| moving.take())
        {
            let _ = moving.send(());
        }
    };
    tokio::spawn(async move {
        let _ = match work {
            Work::Put { source, target, .. } => {
                tunnel.put(source, target).progress(report).await.map(drop)
            }
            Work::Fetch { source, target } => tunnel
                .fetch(source, target)
                .progress(report)
                .await
                .map(drop),
            Work::Call => {
                drop(report);
                tunnel.call(sleep_long, ()).await.map(drop)
            }
        };
        // Keep the tunnel (and with it B) until A is killed.
        std::future::pending::<()>().await;
    });
    // A call has no progress: give its frame time to reach B.
    let bound = if moved > 8 << 20 { 20_000 } else { 500 };
    tokio::time::timeout(Duration::from_millis(bound), under_way)
        .await
        .ok();
    Ok(pid)
}

/// A sparse file of `len` bytes: quick to make, slow enough to send.
fn sparse(path: &Path, len: u64) {
    let file = std::fs::File::create(path).expect("create");
    file.set_len(len).expect("set_len");
}

/// Starts agent A and, through it, `work` on B. Returns A's tunnel and both pids.
async fn controller_with_work(target: Target, work: Work) -> (Tunnel, u32, u32) {
    let a = Tunnel::builder(Local::named("a"))
        .stderr(chopsticks::stderr::discard())
        .build();
    let b = a
        .call_async(start_work, (target, work))
        .timeout(Duration::from_secs(30))
        .await
        .expect("call A")
        .expect("A starts the work on B");
    let a_pid = a.agent_pid().expect("A's pid");
    (a, a_pid, b)
}

fn sigkill(pid: u32) {
    // SAFETY: kill has no memory-safety preconditions.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
}

/// Kills `victim` and asserts that B is gone within a second and `dir` holds
/// nothing staged. Returns how long B took to go.
async fn kill_and_expect_b_gone(victim: u32, b: u32, dir: &Scratch) -> Duration {
    let what = std::thread::current()
        .name()
        .unwrap_or("controller_killed")
        .to_string();
    assert!(process_alive(b), "B ended before the kill");
    sigkill(victim);
    let killed = Instant::now();
    let gone = wait_gone(b, Duration::from_secs(1)).await;
    let took = killed.elapsed();
    assert!(
        gone,
        "agent B ({b}) still runs 1 s after its controller was killed"
    );
    let staged: Vec<String> = dir
        .entries()
        .into_iter()
        .filter(|name| name.contains(".chopsticks-"))
        .collect();
    assert!(staged.is_empty(), "staged files left behind: {staged:?}");
    crate::support::figure(&format!("{what}: agent B gone after the kill"), took);
    crate::support::figure(&format!("{what}: staged files left"), staged.len());
    took
}

#[tokio::test]
async fn a_killed_controller_mid_put_takes_its_local_agent_and_staged_file_with_it() {
    let dir = Scratch::new("killed-controller-put");
    sparse(&dir.path("source"), 1 << 30);
    let work = Work::Put {
        source: dir.path("source"),
        target: dir.path("target"),
        moved: 8 << 20,
    };
    for _ in 0..4 {
        let (_a, a_pid, b) = controller_with_work(Target::Local, work.clone()).await;
        kill_and_expect_b_gone(a_pid, b, &dir).await;
        assert!(!dir.path("target").exists(), "a torn put was committed");
    }
}

#[tokio::test]
async fn a_killed_controller_mid_call_takes_its_local_agent_with_it() {
    let dir = Scratch::new("killed-controller-call");
    let (_a, a_pid, b) = controller_with_work(Target::Local, Work::Call).await;
    kill_and_expect_b_gone(a_pid, b, &dir).await;
}

#[tokio::test]
async fn a_killed_controller_mid_fetch_takes_its_local_agent_with_it() {
    let dir = Scratch::new("killed-controller-fetch");
    sparse(&dir.path("source"), 1 << 30);
    let work = Work::Fetch {
        source: dir.path("source"),
        target: dir.path("target"),
    };
    let (_a, a_pid, b) = controller_with_work(Target::Local, work).await;
    kill_and_expect_b_gone(a_pid, b, &dir).await;
    assert!(!dir.path("target").exists(), "a torn fetch was committed");
}

#[cfg(feature = "ssh")]
mod over_ssh {
    use super::*;
    use chopsticks_testkit::{Sshd, sshd_or_skip};

    fn target(sshd: &Sshd) -> Target {
        Target::Ssh {
            config: sshd.client_config(),
            alias: sshd.alias(0).to_string(),
        }
    }

    /// The process that started B: the sshd session serving it.
    fn parent_of(pid: u32) -> u32 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("PPid:"))
            .and_then(|ppid| ppid.trim().parse().ok())
            .expect("PPid")
    }

    #[tokio::test]
    async fn a_killed_controller_or_sshd_session_takes_the_remote_agent_and_staged_file_with_it() {
        let Some(sshd) = sshd_or_skip("killed-controller", 1) else {
            return;
        };
        let dir = Scratch::shared("killed-controller-ssh");
        sparse(&dir.path("source"), 1 << 30);
        let put = |moved| Work::Put {
            source: dir.path("source"),
            target: dir.path("target"),
            moved,
        };
        let fetch = Work::Fetch {
            source: dir.path("source"),
            target: dir.path("fetched"),
        };
        for work in [put(8 << 20), Work::Call, fetch] {
            let (_a, a_pid, b) = controller_with_work(target(&sshd), work).await;
            kill_and_expect_b_gone(a_pid, b, &dir).await;
        }
        // The sshd session between controller and agent dies instead, early
        // and well into the put.
        for moved in [8 << 20, 200 << 20] {
            let (_a, _a_pid, b) = controller_with_work(target(&sshd), put(moved)).await;
            let session = parent_of(b);
            kill_and_expect_b_gone(session, b, &dir).await;
        }
        assert!(!dir.path("target").exists(), "a torn put was committed");
    }
}
