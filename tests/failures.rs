//! Failures: panics, timeouts, cancellation and the nesting limit.

use std::time::{Duration, Instant};

use chopsticks::{Error, Local, Phase, Tunnel};

use crate::support::FakeAgent;

fn explode(code: u32) -> u32 {
    panic!("boom {code}");
}

async fn explode_later() -> u32 {
    tokio::task::yield_now().await;
    panic!("async boom");
}

fn pid() -> u32 {
    std::process::id()
}

#[tokio::test]
async fn a_panic_comes_back_as_remote_and_the_agent_keeps_serving() {
    let tun = Tunnel::new(Local::named("fragile"));
    let agent = tun.call(pid, ()).await.expect("pid");
    let error = tun.call(explode, (42,)).await.expect_err("must fail");
    let Error::Remote {
        host,
        function,
        message,
        ..
    } = &error
    else {
        panic!("expected Remote, got {error:?}");
    };
    assert_eq!(host, "fragile");
    assert!(function.contains("explode"), "{function}");
    assert!(message.contains("boom 42"), "{message}");
    assert!(
        message.contains("failures.rs"),
        "the panic location is kept: {message}"
    );
    let error = tun
        .call_async(explode_later, ())
        .await
        .expect_err("must fail");
    assert!(error.to_string().contains("async boom"), "{error}");
    assert_eq!(tun.call(pid, ()).await.expect("still serving"), agent);
}

async fn write_after(path: String, delay_ms: u64) -> bool {
    tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    std::fs::write(path, b"should not happen").is_ok()
}

fn sleep_then(value: u32, delay_ms: u64) -> u32 {
    std::thread::sleep(Duration::from_millis(delay_ms));
    value
}

#[tokio::test]
async fn a_timed_out_async_call_is_aborted_on_the_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("written");
    let tun = Tunnel::new(Local::named("slow"));
    tun.connect().await.expect("connect");
    let error = tun
        .call_async(write_after, (marker.display().to_string(), 600))
        .timeout(Duration::from_millis(100))
        .await
        .expect_err("must time out");
    let Error::Timeout {
        host, phase, after, ..
    } = &error
    else {
        panic!("expected Timeout, got {error:?}");
    };
    assert_eq!(
        (host.as_str(), *phase, *after),
        ("slow", Phase::Call, Duration::from_millis(100))
    );
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(
        !marker.exists(),
        "the cancelled async call ran to completion"
    );
}

#[tokio::test]
async fn a_dropped_blocking_call_is_discarded_and_later_calls_get_their_own_results() {
    let tun = Tunnel::builder(Local::new())
        .call_timeout(Duration::from_millis(100))
        .build();
    let error = tun
        .call(sleep_then, (1, 400))
        .await
        .expect_err("default timeout applies");
    assert!(
        matches!(
            error,
            Error::Timeout {
                phase: Phase::Call,
                ..
            }
        ),
        "{error:?}"
    );
    // A per-call override beats the tunnel default.
    let value = tun
        .call(sleep_then, (2, 500))
        .timeout(Duration::from_secs(5))
        .await;
    assert_eq!(value.expect("override"), 2);
    // Dropping the future cancels as well.
    tokio::select! {
        _ = tun.call(sleep_then, (3, 300)).timeout(Duration::from_secs(5)) => panic!("should be dropped"),
        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
    }
    assert_eq!(tun.call(sleep_then, (4, 0)).await.expect("next call"), 4);
}

#[tokio::test]
async fn connect_times_out_when_no_hello_arrives() {
    let tun = Tunnel::builder(FakeAgent {
        script: "sleep 30".into(),
    })
    .connect_timeout(Duration::from_millis(300))
    .build();
    let started = Instant::now();
    let error = tun.connect().await.expect_err("must time out");
    assert!(
        matches!(
            error,
            Error::Timeout {
                phase: Phase::Connect,
                ..
            }
        ),
        "{error:?}"
    );
    assert!(error.to_string().contains("fake"), "{error}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

type Dive =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(u32, String), String>> + Send>>;

/// Opens a tunnel from inside the agent and dives again, until the depth limit says no.
fn dive() -> Dive {
    Box::pin(async {
        let depth = chopsticks_core::__private::agent_env::depth();
        let tun = Tunnel::new(Local::named(format!("level{}", depth + 1)));
        match tun.call_async(dive, ()).await {
            Ok(deeper) => deeper,
            Err(error) => Ok((depth, error.to_string())),
        }
    })
}

#[tokio::test]
async fn runaway_nesting_stops_at_the_depth_limit_with_a_clear_error() {
    let tun = Tunnel::new(Local::named("level1"));
    let (deepest, message) = tun.call_async(dive, ()).await.expect("call").expect("dive");
    assert_eq!(deepest, chopsticks_core::__private::agent_env::MAX_DEPTH);
    assert!(message.contains("over the limit of 8"), "{message}");
    assert!(
        message.contains("level9"),
        "the error names the host: {message}"
    );
}

async fn hog_the_thread(release: std::path::PathBuf) -> bool {
    // Blocks its executor thread, which an async fn must not do, until released.
    crate::support::hold_until_exists(release)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_async_function_that_blocks_does_not_freeze_the_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let release = dir.path().join("release");
    let tun = Tunnel::new(Local::new());
    tun.connect().await.expect("connect");
    let hog_tun = tun.clone();
    let held = release.clone();
    let hog = tokio::spawn(async move { hog_tun.call_async(hog_the_thread, (held,)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The ping answers while the hog still holds its thread.
    let ping = tokio::time::timeout(crate::support::EVENT_BOUND, tun.call(pid, ()));
    assert_eq!(
        ping.await.expect("the ping answered").expect("ping"),
        tun.agent_pid().expect("pid")
    );
    assert!(!hog.is_finished(), "the hog should still be holding");
    std::fs::write(&release, b"").expect("release");
    assert!(hog.await.expect("join").expect("hog"), "never released");
}

fn shout_and_panic(len: usize) -> u8 {
    panic!("{}", "x".repeat(len));
}

#[tokio::test]
async fn an_enormous_panic_message_is_cut_and_the_tunnel_survives() {
    let tun = Tunnel::new(Local::new());
    let agent = tun.call(pid, ()).await.expect("pid");
    let error = tun
        .call(shout_and_panic, (2 << 20,))
        .await
        .expect_err("must fail");
    let Error::Remote { message, .. } = &error else {
        panic!("expected Remote, got {error:?}");
    };
    assert!(
        message.len() < 64 * 1024 && message.contains("[cut]"),
        "{} bytes",
        message.len()
    );
    assert_eq!(tun.call(pid, ()).await.expect("still connected"), agent);
}

/// A transport whose spawn always fails.
struct Unstartable;

#[chopsticks::async_trait]
impl chopsticks::Transport for Unstartable {
    fn host(&self) -> &str {
        "unstartable"
    }

    async fn spawn(
        &self,
        _command: &chopsticks::AgentCommand,
    ) -> Result<chopsticks::Pipes, chopsticks::BoxError> {
        Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied).into())
    }
}

/// Every error names its host and phase and says which kind it is, without
/// the program matching on variants.
#[tokio::test]
async fn errors_say_their_host_phase_and_kind() {
    let tun = Tunnel::builder(Local::named("kinds"))
        .stderr(chopsticks::stderr::discard())
        .build();

    let timeout = tun
        .call(sleep_then, (1, 5_000))
        .timeout(Duration::from_millis(100))
        .await
        .expect_err("times out");
    assert!(timeout.is_timeout(), "{timeout:?}");
    assert!(!timeout.is_remote() && !timeout.is_disconnected());
    assert_eq!((timeout.host(), timeout.phase()), ("kinds", Phase::Call));

    let panicked = tun.call(explode, (7,)).await.expect_err("panics");
    assert!(panicked.is_remote(), "{panicked:?}");
    assert!(!panicked.is_timeout() && !panicked.is_disconnected());
    assert_eq!((panicked.host(), panicked.phase()), ("kinds", Phase::Call));

    let agent = tun.call(pid, ()).await.expect("pid");
    let dying = tokio::spawn({
        let tun = tun.clone();
        async move { tun.call(sleep_then, (1, 30_000)).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(agent as i32, libc::SIGKILL) };
    let killed = dying
        .await
        .expect("join")
        .expect_err("the agent was killed");
    assert!(killed.is_disconnected(), "{killed:?}");
    assert!(!killed.is_timeout() && !killed.is_remote());
    assert_eq!((killed.host(), killed.phase()), ("kinds", Phase::Call));

    let unstartable = Tunnel::new(Unstartable)
        .connect()
        .await
        .expect_err("cannot start");
    assert!(
        matches!(unstartable, Error::Spawn { .. }),
        "{unstartable:?}"
    );
    assert_eq!(
        (unstartable.host(), unstartable.phase()),
        ("unstartable", Phase::Connect)
    );
    assert!(
        !unstartable.is_timeout() && !unstartable.is_disconnected() && !unstartable.is_remote()
    );
    // The transport's error is in the message once, and not again as a source.
    assert!(
        unstartable.to_string().contains("permission denied"),
        "{unstartable}"
    );
    assert!(std::error::Error::source(&unstartable).is_none());
}

/// A call's timeout that runs out before the agent said hello is a connect
/// that did not finish (an unreachable host), not a slow function.
#[tokio::test]
async fn a_call_timeout_before_the_hello_names_the_connect_phase() {
    let silent = Tunnel::builder(FakeAgent {
        script: "sleep 30".into(),
    })
    .stderr(chopsticks::stderr::discard())
    .build();
    let error = silent
        .call(pid, ())
        .timeout(Duration::from_millis(300))
        .await
        .expect_err("no hello comes");
    assert!(error.is_timeout(), "{error:?}");
    assert_eq!(error.phase(), Phase::Connect, "{error}");
    assert!(error.to_string().contains("connect"), "{error}");
}

fn read_text(path: String) -> Result<String, chopsticks::RemoteError> {
    Ok(std::fs::read_to_string(path)?)
}

#[derive(Debug)]
struct Wrapped(std::io::Error);

impl std::fmt::Display for Wrapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("loading the settings failed")
    }
}

impl std::error::Error for Wrapped {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

fn load_settings() -> Result<(), chopsticks::RemoteError> {
    let missing = std::fs::read("/no/such/settings").expect_err("missing");
    Err(Wrapped(missing))?
}

/// A remote function's own errors come back whole through `RemoteError`:
/// `Ok(Err(..))`, with the io kind, the OS error number and the causes.
#[tokio::test]
async fn errors_of_remote_functions_arrive_with_kind_errno_and_causes() {
    let tun = Tunnel::new(Local::new());
    let missing = tun
        .call(read_text, ("/no/such/file".to_string(),))
        .await
        .expect("the call itself worked")
        .expect_err("the file is missing");
    assert_eq!(missing.kind(), Some(std::io::ErrorKind::NotFound));
    assert_eq!(missing.raw_os_error(), Some(libc::ENOENT));
    assert_eq!(
        missing.clone().into_io_error().kind(),
        std::io::ErrorKind::NotFound
    );

    let wrapped = tun
        .call(load_settings, ())
        .await
        .expect("the call itself worked")
        .expect_err("the settings are missing");
    assert_eq!(wrapped.message(), "loading the settings failed");
    assert_eq!(wrapped.causes().len(), 1, "{wrapped:?}");
    assert!(
        wrapped.to_string().contains("No such file or directory"),
        "{wrapped}"
    );
    assert_eq!(wrapped.kind(), None, "the outer error is not an io error");
}
