//! What a process knows about agent mode: the marker that turns a process
//! into an agent, how deep it is nested, and whether the agent runtime is linked.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// The environment variable that turns a process of this program into an agent.
/// Its value is the protocol version.
pub const AGENT_MARKER: &str = "CHOPSTICKS_AGENT";
/// The environment variable that tells an agent how deep it is nested.
pub const AGENT_DEPTH: &str = "CHOPSTICKS_DEPTH";
/// The environment variable that tells an agent its heartbeat timeout, in milliseconds.
pub const AGENT_HEARTBEAT: &str = "CHOPSTICKS_HEARTBEAT_MS";
/// The environment variable that names the agent's program file when a
/// dynamic loader started it (`/proc/self/exe` then names the loader).
pub const AGENT_PROGRAM: &str = "CHOPSTICKS_PROGRAM";
/// The environment variable that names the agent's own payload directory,
/// set by transports that leave one per build on a target: the agent removes
/// older ones beside it.
pub const AGENT_EVICT: &str = "CHOPSTICKS_EVICT";
/// How many agents deep a chain of nested tunnels may go.
pub const MAX_DEPTH: u32 = 8;

static RUNTIME_LINKED: AtomicBool = AtomicBool::new(false);
static DEPTH: AtomicU32 = AtomicU32::new(0);

/// Called by `chopsticks-agent` before `main`: this program can become an agent.
pub fn mark_runtime_linked() {
    RUNTIME_LINKED.store(true, Ordering::Relaxed);
}

/// Whether `chopsticks-agent` is linked into this program.
pub fn runtime_linked() -> bool {
    RUNTIME_LINKED.load(Ordering::Relaxed)
}

/// Called by the agent runtime with the depth it was started at.
pub fn set_depth(depth: u32) {
    DEPTH.store(depth, Ordering::Relaxed);
}

/// How many agents deep this process runs: 0 in an ordinary program.
pub fn depth() -> u32 {
    DEPTH.load(Ordering::Relaxed)
}

/// Whether this process is an agent.
pub fn is_agent() -> bool {
    depth() > 0
}
