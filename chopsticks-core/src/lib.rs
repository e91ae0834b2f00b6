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
//! A function reference names a trampoline of this binary; an agent started
//! from the same file resolves it to the same code:
//!
//! ```
//! use chopsticks_core::protocol::{CallMode, decode_value, encode_value};
//! use chopsticks_core::remote::{Resolved, function_ref, resolve};
//!
//! fn add3(a: i64, b: i64, c: i64) -> i64 { a + b + c }
//!
//! let reference = function_ref(add3);
//! let Ok(Resolved::Blocking(trampoline)) = resolve(&reference, CallMode::Blocking) else {
//!     panic!("every trampoline of this binary resolves");
//! };
//! let result = trampoline.run(&encode_value(&(1i64, 2i64, 39i64)).unwrap()).unwrap();
//! assert_eq!(decode_value::<i64>(&result).unwrap(), 42);
//! ```
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

pub mod agent_env;
mod bootstrap;
pub mod buffer;
pub mod cbor;
mod connection;
mod descriptor_limit;
mod error;
pub mod files;
mod group;
pub mod heartbeat;
pub mod identity;
pub mod progress;
pub mod protocol;
pub mod remote;
pub mod stderr;
mod transfer;
mod transport;
mod tunnel;
pub mod wire;

pub use error::{BoxError, Direction, Error, Phase, Result};
pub use group::{Group, GroupResult};
pub use stderr::StderrSink;
pub use transfer::{Fetch, GroupFetch, GroupPut, Put, Transfer};
pub use transport::{
    AgentCommand, AgentLaunch, AgentProcess, ExitReport, Pipes, Transport, shell_quote,
};
pub use tunnel::{Call, DEFAULT_CLOSE_TIMEOUT, DEFAULT_CONNECT_TIMEOUT, Tunnel, TunnelBuilder};

/// Re-exported so transports can implement [`Transport`] without naming the crate themselves.
pub use async_trait::async_trait;
