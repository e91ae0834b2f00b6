//! Forged `Call` frames against a live agent: random offsets, offsets near
//! genuine entries, code addresses and the wrong mode. Every one gets a
//! `Fail` reply and the agent keeps serving; none makes it jump anywhere.

use std::time::Duration;

use bytes::BytesMut;
use chopsticks_core::__private::protocol::{
    CallMode, FailureKind, FunctionRef, Message, PROTOCOL_VERSION, Payload, decode_value,
    encode_value,
};
use chopsticks_core::__private::remote::{async_function_ref, function_ref};
use chopsticks_core::__private::wire::{Frame, FrameDecoder, OutFrame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::Decoder;

fn add(a: u64, b: u64) -> u64 {
    a + b
}

async fn double(x: u64) -> u64 {
    x * 2
}

/// A small deterministic generator (xorshift64*), so a failure can be replayed.
struct Random(u64);

impl Random {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

fn offset(function: &FunctionRef) -> i64 {
    match function {
        FunctionRef::Offset { offset, .. } => *offset,
        other => panic!("not an offset: {other:?}"),
    }
}

/// An agent started by hand, as a controller would, read and written frame by frame.
struct RawAgent {
    child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::process::ChildStdout,
    buffer: BytesMut,
    decoder: FrameDecoder,
}

impl RawAgent {
    async fn start() -> RawAgent {
        let mut child = tokio::process::Command::new("/proc/self/exe")
            .env("CHOPSTICKS_AGENT", PROTOCOL_VERSION.to_string())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn the agent");
        let mut agent = RawAgent {
            stdin: child.stdin.take().expect("stdin"),
            stdout: child.stdout.take().expect("stdout"),
            child,
            buffer: BytesMut::new(),
            decoder: FrameDecoder::default(),
        };
        match agent.next().await {
            Frame::Message(Message::Hello(_)) => agent,
            other => panic!("expected the hello, got {other:?}"),
        }
    }

    async fn next(&mut self) -> Frame {
        loop {
            if let Some(frame) = self.decoder.decode(&mut self.buffer).expect("valid frames") {
                return frame;
            }
            let read = tokio::time::timeout(
                Duration::from_secs(10),
                self.stdout.read_buf(&mut self.buffer),
            )
            .await
            .expect("the agent answers within 10 s")
            .expect("read");
            assert!(read > 0, "the agent died: {:?}", self.child.try_wait());
        }
    }

    /// The next reply to a call (heartbeats skipped): its id and outcome.
    async fn reply(&mut self) -> (u64, Result<Vec<u8>, FailureKind>) {
        loop {
            match self.next().await {
                Frame::Message(Message::Return {
                    id,
                    value: Payload::Inline(value),
                }) => return (id, Ok(value)),
                Frame::Message(Message::Fail { id, failure }) => return (id, Err(failure.kind)),
                Frame::Message(Message::Heartbeat) => {}
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }
}

fn call(id: u64, offset: i64, mode: CallMode, args: &[u8]) -> Vec<u8> {
    OutFrame::message(&Message::Call {
        id,
        function: FunctionRef::Offset {
            offset,
            name: "forged".into(),
        },
        mode,
        args: Payload::Inline(args.to_vec()),
    })
    .to_bytes()
}

#[tokio::test]
async fn forged_call_frames_never_crash_a_live_agent() {
    let cases: usize = std::env::var("CHOPSTICKS_FUZZ_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(5_000);
    let mut agent = RawAgent::start().await;
    let blocking = offset(&function_ref(add));
    let asynchronous = offset(&async_function_ref(double));
    // Arguments no function of this program takes (a bare string, not a
    // tuple), so a forged offset that lands on another genuine entry fails
    // to decode instead of running something.
    let foreign = encode_value(&"forged").expect("encode");
    let mut random = Random(0x5eed_c0ff_ee15_600d);
    let mut unknown = 0usize;
    let mut undecodable = 0usize;
    let mut id = 0u64;
    while (id as usize) < cases {
        let mut batch = Vec::new();
        let first = id + 1;
        for _ in 0..256.min(cases - id as usize) {
            id += 1;
            let mode = if random.next().is_multiple_of(2) {
                CallMode::Blocking
            } else {
                CallMode::Async
            };
            let near = if random.next().is_multiple_of(2) {
                blocking
            } else {
                asynchronous
            };
            let offset = match random.next() % 4 {
                0 => random.next() as i64,
                1 => near.wrapping_add((random.next() % 8192) as i64 - 4096),
                2 => near.wrapping_add((random.next() % 64) as i64 - 32),
                // The genuine entry, in a random mode.
                _ => near,
            };
            batch.extend(call(id, offset, mode, &foreign));
        }
        agent.stdin.write_all(&batch).await.expect("write");
        let mut answered = std::collections::HashSet::new();
        while (answered.len() as u64) < id + 1 - first {
            let (reply_id, outcome) = agent.reply().await;
            assert!((first..=id).contains(&reply_id), "reply to {reply_id}");
            assert!(answered.insert(reply_id), "two replies to {reply_id}");
            match outcome {
                Err(FailureKind::UnknownFunction) => unknown += 1,
                Err(FailureKind::Arguments) => undecodable += 1,
                other => panic!("call {reply_id} ran: {other:?}"),
            }
        }
    }
    // Still serving, and genuine calls still work.
    id += 1;
    let args = encode_value(&(40u64, 2u64)).expect("encode");
    agent
        .stdin
        .write_all(&call(id, blocking, CallMode::Blocking, &args))
        .await
        .expect("write");
    let (reply_id, outcome) = agent.reply().await;
    assert_eq!(reply_id, id);
    let sum: u64 = decode_value(&outcome.expect("add runs")).expect("decode");
    assert_eq!(sum, 42);
    assert!(
        agent.child.try_wait().expect("wait").is_none(),
        "the agent is alive"
    );
    assert!(unknown > cases / 2, "{unknown} refused of {cases}");
    eprintln!(
        "{cases} forged calls: {unknown} refused as unknown, {undecodable} genuine entries refused their arguments"
    );
}
