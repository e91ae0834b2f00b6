//! Output hygiene: nothing the function writes to stdout reaches the protocol stream;
//! stderr arrives line by line, prefixed with the host.

use std::time::Duration;

use chopsticks::{Local, Tunnel};

use crate::support::capture_stderr;

fn noisy(round: u32) -> u32 {
    println!("println noise {round}");
    let raw = b"raw write noise\n";
    // SAFETY: writes a valid buffer to fd 1.
    unsafe { libc::write(1, raw.as_ptr().cast(), raw.len()) };
    if round.is_multiple_of(100) {
        let _ = std::process::Command::new("sh")
            .arg("-c")
            .arg("echo child noise")
            .status();
    }
    round
}

#[tokio::test]
async fn stdout_writes_and_children_cannot_corrupt_the_stream() {
    let (sink, _lines) = capture_stderr();
    let tun = Tunnel::builder(Local::new()).stderr(sink).build();
    for round in 0..1000 {
        assert_eq!(tun.call(noisy, (round,)).await.expect("call"), round);
    }
}

fn shout(text: String) {
    eprintln!("{text}");
    eprintln!("second line");
}

#[tokio::test]
async fn stderr_lines_reach_the_sink_prefixed_with_the_host() {
    let (sink, lines) = capture_stderr();
    let tun = Tunnel::builder(Local::named("web7")).stderr(sink).build();
    tun.call(shout, ("hello from the agent".to_string(),))
        .await
        .expect("call");
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let seen = lines.lock().expect("lock").clone();
        if seen.len() >= 2 {
            assert_eq!(seen, ["[web7] hello from the agent", "[web7] second line"]);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "stderr lines never arrived: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs the agent with stderr merged into stdout, as a careless transport might.
struct Merged;

#[chopsticks::async_trait]
impl chopsticks::Transport for Merged {
    fn host(&self) -> &str {
        "merged"
    }

    fn launch(&self) -> chopsticks::AgentLaunch {
        chopsticks::AgentLaunch::Direct
    }

    async fn spawn(
        &self,
        command: &chopsticks::AgentCommand,
    ) -> Result<chopsticks::Pipes, chopsticks::BoxError> {
        let child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg("exec \"$@\" 2>&1")
            .arg("sh")
            .arg(command.program())
            .args(command.args())
            .envs(command.env_vars().iter().map(|(k, v)| (k, v)))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        Ok(chopsticks::Pipes::from_child(child)?)
    }
}

#[tokio::test]
async fn stderr_merged_into_stdout_cannot_corrupt_the_stream() {
    let tun = Tunnel::new(Merged);
    for round in 0..50 {
        tun.call(shout, (format!("noise {round}"),))
            .await
            .expect("call");
        assert_eq!(tun.call(noisy, (round,)).await.expect("call"), round);
    }
}
