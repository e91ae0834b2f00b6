//! The agent runtime of chopsticks: what a program does when a controller
//! starts it as an agent.
//!
//! Linking this crate is all it takes. A constructor in `.init_array` runs
//! before `main` in every process of the program; it returns at once unless
//! the `CHOPSTICKS_AGENT` marker is set in the environment, in which case the
//! process removes the marker (so its own children are ordinary processes),
//! moves the protocol onto private descriptors, serves calls until its
//! controller goes away, and exits without ever running `main`. This works
//! the same in ordinary binaries, `cargo test` binaries and criterion benches.
//!
//! The `chopsticks` facade links this crate for you. A program that depends
//! only on `chopsticks-core` names it once:
//!
//! ```
//! // In any crate the program links, once:
//! use chopsticks_agent as _;
//! ```
//!
//! Without it, a tunnel refuses to start and says what to add. The crate has
//! no other public items.

mod dispatch;
mod evict;
mod fds;
mod files;
mod output;
mod pipe_size;
mod pool;
mod reader;
mod serve;
mod watchdog;

use chopsticks_core::__private::agent_env::{
    self, AGENT_DEPTH, AGENT_EVICT, AGENT_HEARTBEAT, AGENT_MARKER, AGENT_PROGRAM,
};
use chopsticks_core::__private::heartbeat;

/// Errors that stop an agent before it can serve.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AgentError {
    /// The protocol descriptors could not be set up.
    #[error("the agent could not set up its descriptors: {0}")]
    Descriptors(#[source] std::io::Error),
    /// The runtime could not be built.
    #[error("the agent could not start its runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

#[used]
#[unsafe(link_section = ".init_array")]
static AGENT_ENTRY: extern "C" fn() = enter_if_agent;

extern "C" fn enter_if_agent() {
    agent_env::mark_runtime_linked();
    if std::env::var_os(AGENT_MARKER).is_none() {
        return;
    }
    let depth = std::env::var(AGENT_DEPTH)
        .ok()
        .and_then(|depth| depth.parse().ok())
        .unwrap_or(1);
    let heartbeat_timeout = std::env::var(AGENT_HEARTBEAT)
        .ok()
        .and_then(|millis| millis.parse().ok())
        .map(std::time::Duration::from_millis)
        .map_or(heartbeat::DEFAULT_HEARTBEAT_TIMEOUT, heartbeat::clamp);
    let own_payload = std::env::var_os(AGENT_EVICT).map(std::path::PathBuf::from);
    if let Some(program) = std::env::var_os(AGENT_PROGRAM) {
        chopsticks_core::__private::identity::set_program_path(program.into());
    }
    // SAFETY: constructors run before main, while the process has one thread,
    // so nothing can read the environment concurrently.
    unsafe {
        std::env::remove_var(AGENT_MARKER);
        std::env::remove_var(AGENT_DEPTH);
        std::env::remove_var(AGENT_HEARTBEAT);
        std::env::remove_var(AGENT_EVICT);
        std::env::remove_var(AGENT_PROGRAM);
    }
    // A panic must not unwind into the C caller of this constructor.
    let code =
        std::panic::catch_unwind(|| match serve::run(depth, heartbeat_timeout, own_payload) {
            Ok(code) => code,
            Err(error) => {
                warn(format_args!("{error}"));
                71
            }
        })
        .unwrap_or(70);
    std::process::exit(code);
}

/// Writes `chopsticks agent: MESSAGE` to stderr, ignoring failure.
///
/// The agent's stderr is a pipe to its controller, which may be gone (killed,
/// its ssh session cut). SIGPIPE is ignored, so a write then fails with
/// `EPIPE`, and `eprintln!` would panic on it. No output path of the agent
/// may panic, so every message goes through here.
pub(crate) fn warn(message: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "chopsticks agent: {message}");
}
