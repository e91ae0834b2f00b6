//! Integration tests of the chopsticks facade, against real agent processes.
//!
//! Modules:
//! - `api`: the public API of every published crate against its committed listing (`api/*.txt`)
//! - `calls`: arities, closures, async functions, concurrency, large payloads, nesting
//! - `controller_killed`: a controller SIGKILLed mid-put, mid-call and mid-fetch, locally and
//!   over ssh (and its sshd session killed instead): the agent goes and leaves nothing staged
//! - `lifecycle`: lazy connect, close and reconnect, drop, agent exit on EOF, killed agents
//! - `heartbeat`: idle and busy tunnels stay up; a frozen agent or controller is given up
//! - `hygiene`: stdout writes cannot corrupt the stream; stderr forwarding
//! - `failures`: panics, timeouts, cancellation, the nesting limit
//! - `partition`: hosts in network namespaces cut off with iptables DROP: heartbeats end both
//!   sides, and the errors say what was seen
//! - `protocol`: fake agents that send garbage, oversized frames, a wrong version or binary
//! - `bootstrap`: the shell bootstrap and its cache: upload, reuse, corruption, unsafe dirs
//! - `sudo`: the `Sudo` transport with a throwaway user
//! - `becoming`: `Become` through real sudo and doas with the test kit's accounts and sudoers
//!   file: locally, nested, through a command prefix, in a chroot without sudo, over sshd (both
//!   backends), in containers; passwords right, wrong, asked for, hostile, and never in any
//!   process's argv or environment
//! - `exec`: the `Exec` transport into a network namespace, a chroot and a container (docker
//!   CLI); failing and hostile prefixes; the bundled agent in a root without any C library
//! - `custom_transport`: a transport written outside core (`examples/custom_transport.rs`)
//! - `ops`: the operator kit: commands (statuses, refusals, live lines in order, timeouts that
//!   kill the tree, drops, stdin, 100 MB in bounded memory, hostile words, another user, groups)
//!   and facts, locally, over sshd and in a scratch container; put_dir and fetch_dir (10,000 files,
//!   re-syncs, one-byte edits, checksum and delete modes, large files, unsafe entries, a killed
//!   agent, over sshd, a group of chroots)
//! - `memory`: resident memory of idle agents; a given-up call's partial result is freed
//! - `descriptors`: hundreds of local tunnels from a low soft limit; running out names the limit
//! - `forged_calls`: random and near-miss function references against a live agent: refused,
//!   never run
//! - `other_build`: registered functions called in another build of a program (two builds of
//!   `examples/other_build.rs`); unregistered ones and changed signatures are refused
//! - `group`: fan-out over several agents, per-host failures, set operations, group transfers
//! - `ssh`: the OpenSSH transport against a real sshd (chopsticks-testkit), also one whose
//!   sessions are chrooted into a root without a C library
//! - `ssh_native`: the libssh2 transport against a real sshd, the chrooted one too
//! - `docker`: the Docker transport against the real Engine, with images built here
//! - `torn_files`: sources changed mid-transfer, peers that send other than they announce, FIFOs
//! - `files`: put and fetch: round trips, modes, atomic replacement, corruption, full disk,
//!   killed agents, permissions, constant memory
//! - `deploy`: puts from memory, owners and groups, and puts that skip an unchanged target
//! - `inputs`: input streams of items and bytes fed to functions locally and over sshd, flow
//!   control, early ends, hostile controllers
//! - `streams`: streaming calls locally and over sshd: order, first item early, flow control,
//!   cancellation both ways, failures mid-stream, big items, thousands of streams, hostile peers

mod support;

#[global_allocator]
static ALLOCATOR: support::Tracking = support::Tracking;

mod api;
mod becoming;
mod bootstrap;
mod calls;
mod controller_killed;
mod custom_transport;
mod deploy;
mod descriptors;
#[cfg(feature = "docker")]
mod docker;
mod exec;
mod failures;
mod files;
mod forged_calls;
mod group;
mod heartbeat;
mod hygiene;
mod inputs;
mod lifecycle;
mod memory;
#[cfg(feature = "ops")]
mod ops;
mod other_build;
#[cfg(feature = "ssh")]
mod partition;
mod protocol;
#[cfg(feature = "ssh")]
mod ssh;
#[cfg(feature = "libssh2")]
mod ssh_native;
mod streams;
mod sudo;
mod torn_files;
