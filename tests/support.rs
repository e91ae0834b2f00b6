//! Helpers shared by the test modules.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chopsticks::{AgentCommand, AgentLaunch, BoxError, Pipes, StderrSink, Transport, async_trait};

/// Whether a process exists and is not a zombie.
pub fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(") ")
            .map(|(_, rest)| !rest.starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Waits until `pid` is gone, at most `bound`; returns whether it went.
pub async fn wait_gone(pid: u32, bound: Duration) -> bool {
    let deadline = Instant::now() + bound;
    while Instant::now() < deadline {
        if !process_alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    !process_alive(pid)
}

/// A stderr sink that records `[host] line` strings.
pub fn capture_stderr() -> (StderrSink, Arc<Mutex<Vec<String>>>) {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let seen = lines.clone();
    let sink: StderrSink = Arc::new(move |host, line| {
        seen.lock().expect("lock").push(format!("[{host}] {line}"));
    });
    (sink, lines)
}

/// Runs `sh -c SCRIPT` instead of an agent: a real process that says whatever the test wants.
pub struct FakeAgent {
    pub script: String,
}

#[async_trait]
impl Transport for FakeAgent {
    fn host(&self) -> &str {
        "fake"
    }

    fn launch(&self) -> AgentLaunch {
        AgentLaunch::Direct
    }

    async fn spawn(&self, _command: &AgentCommand) -> Result<Pipes, BoxError> {
        let child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&self.script)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()?;
        Ok(Pipes::from_child(child)?)
    }
}

/// Whether this run must treat a missing prerequisite as a failure.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|value| value == "true" || value == "1")
}

/// Whether the tests run as root (needed to create users).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
