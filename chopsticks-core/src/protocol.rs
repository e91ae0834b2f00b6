//! The messages both ends exchange, and the CBOR encoding of argument and result values.
//!
//! A session starts with the agent's [`Hello`]. The controller checks its
//! protocol version and binary id before it sends any [`Message::Call`]. Each
//! call carries an id; the agent answers it with exactly one
//! [`Message::Return`] or [`Message::Fail`], unless the controller sent a
//! [`Message::Cancel`] first. Payloads over [`INLINE_LIMIT`](crate::wire::INLINE_LIMIT)
//! bytes travel as [`Payload::Streamed`] followed by raw chunk frames (see
//! [`wire`](crate::wire)).

use std::borrow::Cow;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use crate::files::FileTime;

/// The protocol version both ends must speak.
pub const PROTOCOL_VERSION: u32 = 6;

/// One protocol message, carried CBOR-encoded in one frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Message {
    /// Sent once by the agent as soon as it starts.
    Hello(Hello),
    /// Run a function.
    Call {
        /// The call id, unique per connection.
        id: u64,
        /// Which function to run.
        function: FunctionRef,
        /// Whether it is a blocking `fn` or an `async fn`.
        mode: CallMode,
        /// The CBOR-encoded argument tuple.
        args: Payload,
    },
    /// The function returned; the payload is its CBOR-encoded result.
    Return {
        /// The call id.
        id: u64,
        /// The CBOR-encoded result.
        value: Payload,
    },
    /// The call failed on the agent.
    Fail {
        /// The call id.
        id: u64,
        /// What went wrong.
        failure: Failure,
    },
    /// The controller no longer wants the result of this call.
    Cancel {
        /// The call id.
        id: u64,
    },
    /// The controller asks the agent to exit.
    Shutdown,
    /// Either end is still there. Each end sends one every quarter of the
    /// heartbeat timeout, and gives the other up after hearing nothing
    /// for the whole timeout.
    Heartbeat,
    /// Write a file on the agent: `size` bytes follow as chunk frames with
    /// this id, then [`Message::PutEnd`]. Answered with a `Return` carrying
    /// a [`FileSummary`], or a `Fail`.
    Put {
        /// The transfer id, from the same space as call ids.
        id: u64,
        /// Where the file goes and how.
        request: PutRequest,
    },
    /// The data of a put is complete.
    PutEnd {
        /// The transfer id.
        id: u64,
        /// The BLAKE3 digest of the bytes sent.
        #[serde(with = "serde_bytes")]
        checksum: Vec<u8>,
    },
    /// Send the file at `path` to the controller. Answered with
    /// [`Message::FetchHead`], the content as chunk frames, and a `Return`
    /// carrying a [`FileSummary`]; or a `Fail`.
    Fetch {
        /// The transfer id.
        id: u64,
        /// The source path, as raw bytes.
        #[serde(with = "serde_bytes")]
        path: Vec<u8>,
    },
    /// The file of a fetch is open; its content follows.
    FetchHead {
        /// The transfer id.
        id: u64,
        /// The file's size when it was opened.
        size: u64,
    },
    /// The most verbose `tracing` level the controller wants (see
    /// [`trace`](crate::trace)): 0 off, 1 error to 5 trace.
    TraceLevel {
        /// The level's number.
        level: u8,
    },
    /// A `tracing` event of the agent.
    Trace(crate::trace::TraceEvent),
    /// Call `id`, which follows, takes an input stream: its data follows as
    /// STREAM frames with the call's id, then [`Message::InputEnd`].
    Input {
        /// The call's id.
        id: u64,
    },
    /// The input of call `id` is complete.
    InputEnd {
        /// The call's id.
        id: u64,
    },
    /// The receiver of stream `id` lets its sender have `bytes` more of
    /// stream data in flight (see [`flow`](crate::flow)).
    Credit {
        /// The stream's call id.
        id: u64,
        /// How many more bytes the sender may send.
        bytes: u64,
    },
}

impl Message {
    /// The message's kind, as errors name it: never its content, which the
    /// peer chose and which may be large or hostile.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "a Hello",
            Message::Call { .. } => "a Call",
            Message::Return { .. } => "a Return",
            Message::Fail { .. } => "a Fail",
            Message::Cancel { .. } => "a Cancel",
            Message::Shutdown => "a Shutdown",
            Message::Heartbeat => "a Heartbeat",
            Message::Put { .. } => "a Put",
            Message::PutEnd { .. } => "a PutEnd",
            Message::Fetch { .. } => "a Fetch",
            Message::FetchHead { .. } => "a FetchHead",
            Message::Credit { .. } => "a Credit",
            Message::Input { .. } => "an Input",
            Message::TraceLevel { .. } => "a TraceLevel",
            Message::Trace(_) => "a Trace",
            Message::InputEnd { .. } => "an InputEnd",
        }
    }
}

/// How many bytes of text a peer may put into one error message.
pub const MAX_PEER_TEXT: usize = 4096;

/// How many bytes of backtrace a peer may put into one error.
pub const MAX_PEER_BACKTRACE: usize = 32 * 1024;

/// `text` cut to at most about `limit` bytes by eliding its middle, at
/// character boundaries: the start and the end of a long message or
/// backtrace are the parts that explain it.
pub fn bounded_text(text: &str, limit: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= limit {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut head = limit / 2;
    while !text.is_char_boundary(head) {
        head -= 1;
    }
    let mut tail = text.len() - limit / 2;
    while !text.is_char_boundary(tail) {
        tail += 1;
    }
    std::borrow::Cow::Owned(format!(
        "{} [… {} bytes elided …] {}",
        &text[..head],
        tail - head,
        &text[tail..]
    ))
}

/// What a [`Message::Put`] asks of the agent: one struct from the
/// controller's builder to the agent's writer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutRequest {
    /// The target path, as raw bytes.
    #[serde(with = "serde_bytes")]
    pub path: Vec<u8>,
    /// How many bytes follow.
    pub size: u64,
    /// The permission bits to give the file.
    pub mode: u32,
    /// Whether the agent's umask is applied to `mode` (when the mode is the source's, not chosen).
    pub apply_umask: bool,
    /// Whether the file and its rename are synced to disk before the reply.
    pub sync: bool,
    /// Whether missing parent directories are created.
    pub create_dirs: bool,
    /// The modification time to give the file, if any.
    pub mtime: Option<FileTime>,
    /// The owner to give the file, a user name or decimal id resolved on the agent.
    pub owner: Option<String>,
    /// The group to give the file, a group name or decimal id resolved on the agent.
    pub group: Option<String>,
}

/// What a finished put or fetch moved, as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSummary {
    /// Bytes moved.
    pub size: u64,
    /// BLAKE3 digest of the content.
    #[serde(with = "serde_bytes")]
    pub checksum: Vec<u8>,
    /// The permission bits of the file on the agent.
    pub mode: u32,
    /// The modification time of the file on the agent.
    pub mtime: FileTime,
}

/// The agent's introduction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// The protocol version the agent speaks.
    pub protocol: u32,
    /// The GNU build-id of the agent program (or the SHA-256 of its file).
    #[serde(with = "serde_bytes")]
    pub binary_id: Vec<u8>,
    /// The agent's process id on its machine.
    pub pid: u32,
    /// `uname -s` of the agent's machine.
    pub os: String,
    /// `uname -m` of the agent's machine.
    pub arch: String,
    /// How many agents deep this one is (1 for an agent a program started directly).
    pub depth: u32,
}

/// A value that is either inline in its message or follows as chunk frames.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    /// The bytes themselves.
    Inline(#[serde(with = "serde_bytes")] Vec<u8>),
    /// This many bytes follow in chunk frames with the same call id.
    Streamed {
        /// Total length of the payload in bytes.
        len: u64,
    },
}

/// Names a function both ends can run.
///
/// An enum so that named, registered functions (for agents cross-built for
/// another target) can join later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum FunctionRef {
    /// A monomorphised trampoline's entry in read-only data, by its offset
    /// from the anchor static. Valid only between two processes of the same
    /// binary, which the hello proves.
    Offset {
        /// Entry address minus anchor address.
        offset: i64,
        /// `type_name` of the function, for errors and traces.
        name: Cow<'static, str>,
    },
    /// A function registered with `register!`, by its name: for an agent
    /// that is another build of the program.
    Named {
        /// `module_path::name`.
        name: Cow<'static, str>,
        /// The type names of its arguments and result, in the caller's build.
        signature: String,
    },
}

impl FunctionRef {
    /// The function's name for errors and traces.
    pub fn name(&self) -> &str {
        match self {
            FunctionRef::Offset { name, .. } | FunctionRef::Named { name, .. } => name,
        }
    }
}

/// How the agent runs a function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CallMode {
    /// A plain `fn`, run on the agent's blocking pool.
    Blocking,
    /// An `async fn`, run as a task on the agent's runtime.
    Async,
    /// A plain `fn` returning an iterator, iterated on the agent's blocking
    /// pool; its items stream back as they come.
    BlockingStream,
    /// A plain `fn` returning a `Stream`, polled as a task on the agent's
    /// runtime; its items stream back as they come.
    AsyncStream,
}

impl CallMode {
    /// Whether the call's result is a stream of items.
    pub fn is_stream(self) -> bool {
        matches!(self, CallMode::BlockingStream | CallMode::AsyncStream)
    }
}

/// Why a call failed on the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The kind of failure.
    pub kind: FailureKind,
    /// A human-readable message (the panic message, the decoding error).
    pub message: String,
    /// A backtrace, when the agent captured one.
    pub backtrace: Option<String>,
}

/// Kinds of [`Failure`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum FailureKind {
    /// The function panicked.
    Panic,
    /// The arguments could not be decoded.
    Arguments,
    /// The result could not be encoded.
    Result,
    /// The function reference does not name a function in this binary.
    UnknownFunction,
    /// A file operation of a put or fetch failed.
    File(FileFailure),
}

/// What kind of file failure a [`FailureKind::File`] was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum FileFailure {
    /// The system refused with this `errno`.
    Os(i32),
    /// The bytes received do not match the size or checksum sent.
    Corrupt,
    /// The source changed while it was read; what was read is not a
    /// consistent copy.
    Changed,
    /// Anything else.
    Other,
}

impl FileFailure {
    /// The failure kind for `error`.
    pub fn of(error: &std::io::Error) -> FileFailure {
        use std::io::ErrorKind;
        match (error.raw_os_error(), error.kind()) {
            (Some(code), _) => FileFailure::Os(code),
            (None, ErrorKind::InvalidData) => FileFailure::Corrupt,
            (None, ErrorKind::ResourceBusy) => FileFailure::Changed,
            (None, ErrorKind::IsADirectory) => FileFailure::Os(libc::EISDIR),
            (None, ErrorKind::NotFound) => FileFailure::Os(libc::ENOENT),
            (None, ErrorKind::PermissionDenied) => FileFailure::Os(libc::EACCES),
            (None, ErrorKind::InvalidInput) => FileFailure::Os(libc::EINVAL),
            _ => FileFailure::Other,
        }
    }

    /// The `std::io::ErrorKind` this failure corresponds to.
    pub fn io_kind(self) -> std::io::ErrorKind {
        match self {
            FileFailure::Os(code) => std::io::Error::from_raw_os_error(code).kind(),
            FileFailure::Corrupt => std::io::ErrorKind::InvalidData,
            FileFailure::Changed => std::io::ErrorKind::ResourceBusy,
            FileFailure::Other => std::io::ErrorKind::Other,
        }
    }
}

impl Failure {
    /// A failure of `kind` with `message` and no backtrace.
    pub fn new(kind: FailureKind, message: impl Into<String>) -> Self {
        Failure {
            kind,
            message: message.into(),
            backtrace: None,
        }
    }

    /// The failure with its message cut to [`MAX_PEER_TEXT`] bytes and its
    /// backtrace to [`MAX_PEER_BACKTRACE`] (see [`bounded_text`]), as it is
    /// shown to users.
    pub fn bounded(self) -> Failure {
        let cut = |text: String, limit: usize| match bounded_text(&text, limit) {
            std::borrow::Cow::Borrowed(_) => text,
            std::borrow::Cow::Owned(cut) => cut,
        };
        Failure {
            kind: self.kind,
            message: cut(self.message, MAX_PEER_TEXT),
            backtrace: self
                .backtrace
                .map(|backtrace| cut(backtrace, MAX_PEER_BACKTRACE)),
        }
    }

    /// The message, prefixed with what kind of failure it was.
    pub fn describe(&self) -> String {
        match self.kind {
            FailureKind::Panic => format!("panicked: {}", self.message),
            FailureKind::Arguments => format!("could not decode its arguments: {}", self.message),
            FailureKind::Result => format!("could not encode its result: {}", self.message),
            FailureKind::UnknownFunction => format!("is not a function: {}", self.message),
            FailureKind::File(_) => self.message.clone(),
        }
    }
}

/// CBOR-encodes a value.
pub fn encode_value<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, String> {
    crate::cbor::to_vec(value).map_err(|error| error.to_string())
}

/// Decodes a CBOR value. Nesting depth is bounded, so hostile input cannot overflow the stack.
pub fn decode_value<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    crate::cbor::from_slice(bytes).map_err(|error| error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_text_keeps_short_text_and_elides_the_middle_of_long_text() {
        assert_eq!(bounded_text("short", 10), "short");
        let long = format!("head{}tail", "é".repeat(1000));
        let cut = bounded_text(&long, 100);
        assert!(cut.len() < 160, "{cut}");
        assert!(cut.starts_with("head") && cut.ends_with("tail"), "{cut}");
        assert!(cut.contains("bytes elided"), "{cut}");
        let failure = Failure {
            kind: FailureKind::Panic,
            message: "m".repeat(MAX_PEER_TEXT * 3),
            backtrace: Some("b".repeat(MAX_PEER_BACKTRACE * 3)),
        }
        .bounded();
        assert!(failure.message.len() < MAX_PEER_TEXT + 64);
        assert!(
            failure
                .backtrace
                .is_some_and(|text| text.len() < MAX_PEER_BACKTRACE + 64)
        );
    }

    #[test]
    fn messages_round_trip() {
        let messages = [
            Message::Hello(Hello {
                protocol: PROTOCOL_VERSION,
                binary_id: vec![1, 2, 3],
                pid: 42,
                os: "Linux".into(),
                arch: "x86_64".into(),
                depth: 1,
            }),
            Message::Call {
                id: 7,
                function: FunctionRef::Offset {
                    offset: -1234,
                    name: "demo::f".into(),
                },
                mode: CallMode::Async,
                args: Payload::Inline(vec![0x80]),
            },
            Message::Return {
                id: 7,
                value: Payload::Streamed { len: 1 << 30 },
            },
            Message::Fail {
                id: 8,
                failure: Failure::new(FailureKind::Panic, "boom"),
            },
            Message::Cancel { id: 9 },
            Message::Shutdown,
            Message::Heartbeat,
            Message::Put {
                id: 10,
                request: PutRequest {
                    path: b"/srv/\xffapp".to_vec(),
                    size: 1 << 33,
                    mode: 0o640,
                    apply_umask: false,
                    sync: false,
                    create_dirs: true,
                    mtime: Some(FileTime {
                        seconds: -5,
                        nanos: 7,
                    }),
                    owner: Some("www-data".into()),
                    group: Some("33".into()),
                },
            },
            Message::PutEnd {
                id: 10,
                checksum: vec![7; 32],
            },
            Message::Fetch {
                id: 11,
                path: b"/var/log/syslog".to_vec(),
            },
            Message::FetchHead { id: 11, size: 0 },
            Message::Credit {
                id: 12,
                bytes: 1 << 20,
            },
            Message::Input { id: 13 },
            Message::TraceLevel { level: 3 },
            Message::Trace(crate::trace::TraceEvent {
                level: 3,
                target: "app::db".into(),
                message: "connected".into(),
                fields: "pool=4".into(),
                hosts: vec!["db1".into()],
            }),
            Message::InputEnd { id: 13 },
            Message::Fail {
                id: 11,
                failure: Failure::new(FailureKind::File(FileFailure::Os(2)), "missing"),
            },
        ];
        for message in messages {
            let bytes = encode_value(&message).expect("encode");
            assert_eq!(decode_value::<Message>(&bytes).expect("decode"), message);
        }
    }
}
