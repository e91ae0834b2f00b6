//! The core of [chopsticks](https://docs.rs/chopsticks): the [`Transport`]
//! trait, framing and protocol, the shell bootstrap, [`Tunnel`] and
//! remote-function calls.
//!
//! Most programs depend on the `chopsticks` facade instead, which links the
//! agent runtime and the transports picked by Cargo features. Depend on this
//! crate directly to implement a [`Transport`] for a new kind of target.
//!
//! # Example
//!
//! Without the agent runtime linked, a tunnel refuses to start and says what to add:
//!
//! ```
//! use chopsticks_core::{AgentCommand, BoxError, Pipes, Transport, Tunnel};
//!
//! struct Nowhere;
//! #[async_trait::async_trait]
//! impl Transport for Nowhere {
//!     fn host(&self) -> &str { "nowhere" }
//!     async fn spawn(&self, _: &AgentCommand) -> Result<Pipes, BoxError> {
//!         Err("not reached".into())
//!     }
//! }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let error = Tunnel::new(Nowhere).connect().await.unwrap_err();
//! assert!(error.to_string().contains("chopsticks_agent"));
//! # });
//! ```

mod accounts;
mod agent_env;
mod becoming;
mod bootstrap;
mod buffer;
mod cbor;
mod connection;
mod descriptor_limit;
mod digest_cache;
mod error;
mod feed;
mod files;
mod flow;
mod group;
mod heartbeat;
mod identity;
mod input;
mod named;
mod program_files;
pub mod progress;
mod protocol;
mod remote;
mod remote_error;
pub mod stderr;
mod stream;
mod trace;
mod transfer;
mod transport;
mod tunnel;
mod wire;

pub use becoming::{Become, BecomeError, BecomeTool, Password};
pub use error::{BoxError, Direction, Error, Phase, Result, ValueAction, ValuePart};
pub use group::{Group, GroupFetch, GroupPut, GroupResult, GroupStream, HostFailures};
pub use input::{ByteReceiver, InputEnd, Receiver, WithInput};
pub use remote::{AsyncRemoteFn, RemoteFn};
pub use remote_error::RemoteError;
pub use stderr::StderrSink;
pub use stream::CallStream;
pub use transfer::{Fetch, Put, Transfer};
pub use transport::{
    AgentCommand, AgentLaunch, AgentProcess, ExitReport, Pipes, Transport, shell_quote,
};
pub use tunnel::{Call, DEFAULT_CLOSE_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, Tunnel, TunnelBuilder};

/// Re-exported so transports can implement [`Transport`] without naming the crate themselves.
pub use async_trait::async_trait;

/// The protocol, the codec and the agent's side of the library, for the
/// `chopsticks-agent` crate and the project's own tests. **Not a stable
/// API:** anything here may change in any release, and nothing here is
/// needed to call functions, move files or write a [`Transport`].
#[doc(hidden)]
pub mod __private {
    /// User and group names resolved where files are written.
    pub mod accounts {
        pub use crate::accounts::*;
    }
    /// Environment variables between controller and agent, and the nesting depth.
    pub mod agent_env {
        pub use crate::agent_env::*;
    }
    /// Large buffers and work kept off the runtime.
    pub mod buffer {
        pub use crate::buffer::*;
    }
    /// The CBOR codec.
    pub mod cbor {
        pub use crate::cbor::*;
    }
    /// Staged files and sources.
    pub mod files {
        pub use crate::files::*;
    }
    /// Streams: credit, the sending half, items cut back out of bytes.
    pub mod flow {
        pub use crate::flow::*;
    }
    /// Heartbeat timing.
    pub mod heartbeat {
        pub use crate::heartbeat::*;
    }
    /// The agent's end of input streams.
    pub mod input {
        pub use crate::input::*;
    }
    /// Build id, agent file, uname.
    pub mod identity {
        pub use crate::identity::*;
    }
    /// This program, its loader and libraries, as payloads ship them.
    pub mod program_files {
        pub use crate::program_files::*;
    }
    /// Functions registered by name (what `register!` expands to).
    pub mod named {
        pub use crate::named::*;
    }
    /// The link-time registry crate `register!` uses.
    pub use linkme;
    /// Protocol messages.
    pub mod protocol {
        pub use crate::protocol::*;
    }
    /// `tracing` events from the agent.
    pub mod trace {
        pub use crate::trace::*;
    }
    /// Function references and their resolution.
    pub mod remote {
        pub use crate::remote::*;
    }
    /// Frames, the outbox and reassembly.
    pub mod wire {
        pub use crate::wire::*;
    }
}
