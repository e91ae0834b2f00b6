//! Forged `Call` frames against a live agent: random offsets, offsets near
//! genuine entries, code addresses and the wrong mode. Every one gets a
//! `Fail` reply and the agent keeps serving; none makes it jump anywhere.

use chopsticks_core::__private::protocol::{
    CallMode, FailureKind, FunctionRef, decode_value, encode_value,
};
use chopsticks_core::__private::remote::{async_function_ref, function_ref};

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

fn call(id: u64, offset: i64, mode: CallMode, args: &[u8]) -> Vec<u8> {
    let function = FunctionRef::Offset {
        offset,
        name: "forged".into(),
    };
    crate::support::raw_call(id, &function, mode, args)
}

#[tokio::test]
async fn forged_call_frames_never_crash_a_live_agent() {
    let cases: usize = std::env::var("CHOPSTICKS_FUZZ_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(5_000);
    let mut agent = crate::support::RawAgent::start().await;
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
            let mode = [
                CallMode::Blocking,
                CallMode::Async,
                CallMode::BlockingStream,
                CallMode::AsyncStream,
            ][(random.next() % 4) as usize];
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
        agent.send(&batch).await;
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
        .send(&call(id, blocking, CallMode::Blocking, &args))
        .await;
    let (reply_id, outcome) = agent.reply().await;
    assert_eq!(reply_id, id);
    let sum: u64 = decode_value(&outcome.expect("add runs")).expect("decode");
    assert_eq!(sum, 42);
    assert!(agent.is_alive(), "the agent is alive");
    assert!(unknown > cases / 2, "{unknown} refused of {cases}");
    eprintln!(
        "{cases} forged calls: {unknown} refused as unknown, {undecodable} genuine entries refused their arguments"
    );
}
