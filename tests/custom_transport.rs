//! A transport implemented outside core, from `examples/custom_transport.rs`.

use chopsticks::Tunnel;

#[allow(dead_code)]
#[path = "../examples/custom_transport.rs"]
mod example;

fn session_and_env() -> (u32, i32, usize) {
    // SAFETY: getsid(0) has no preconditions.
    let session = unsafe { libc::getsid(0) };
    (std::process::id(), session, std::env::vars().count())
}

#[tokio::test]
async fn a_third_party_transport_runs_the_agent() {
    let tun = Tunnel::new(example::Isolated::new("isolated"));
    assert_eq!(tun.host(), "isolated");
    let (pid, session, env_count) = tun.call(session_and_env, ()).await.expect("call");
    assert_eq!(session as u32, pid, "the agent leads its own session");
    assert_eq!(
        env_count, 0,
        "the environment was scrubbed and the agent markers removed"
    );
}
