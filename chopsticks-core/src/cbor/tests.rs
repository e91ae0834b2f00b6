//! Codec tests: RFC 8949 vectors, round trips, and hostile input.

use std::collections::{BTreeMap, VecDeque};

use proptest::prelude::*;
use serde::{Deserialize, Serialize};

use super::{CodecError, from_slice, to_vec};

fn hex(text: &str) -> Vec<u8> {
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn rfc_8949_vectors_encode_and_decode() {
    assert_eq!(to_vec(&0u8).expect("enc"), hex("00"));
    assert_eq!(to_vec(&1_000_000u32).expect("enc"), hex("1a000f4240"));
    assert_eq!(to_vec(&-1000i32).expect("enc"), hex("3903e7"));
    assert_eq!(to_vec(&u64::MAX).expect("enc"), hex("1bffffffffffffffff"));
    assert_eq!(to_vec("IETF").expect("enc"), hex("6449455446"));
    assert_eq!(
        to_vec(&(1u8, (2u8, 3u8), [4u8, 5u8])).expect("enc"),
        hex("8301820203820405")
    );
    assert_eq!(to_vec(&1.1f64).expect("enc"), hex("fb3ff199999999999a"));
    assert_eq!(to_vec(&true).expect("enc"), hex("f5"));
    assert_eq!(to_vec(&None::<u8>).expect("enc"), hex("f6"));
    assert_eq!(from_slice::<f32>(&hex("f93e00")).expect("half"), 1.5);
    assert_eq!(
        from_slice::<f32>(&hex("f90001")).expect("subnormal half"),
        5.960_464_5e-8
    );
    assert_eq!(
        from_slice::<f32>(&hex("f9fc00")).expect("half"),
        f32::NEG_INFINITY
    );
    assert_eq!(
        from_slice::<u128>(&hex("c249010000000000000000")).expect("bignum"),
        1u128 << 64
    );
    assert_eq!(
        from_slice::<i128>(&hex("c349010000000000000000")).expect("bignum"),
        -1 - (1i128 << 64)
    );
    let map: BTreeMap<String, serde_json_like::Value> =
        from_slice(&hex("a26161016162820203")).expect("map");
    assert_eq!(map.len(), 2);
    assert_eq!(
        from_slice::<String>(&hex("7f657374726561646d696e67ff")).expect("chunks"),
        "streaming"
    );
    assert_eq!(
        from_slice::<Vec<u8>>(&hex("9f0102ff")).expect("indefinite array"),
        [1, 2]
    );
}

/// A tiny self-describing value type, to prove `deserialize_any` works.
mod serde_json_like {
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(untagged)]
    pub enum Value {
        Number(u64),
        List(Vec<Value>),
        Text(String),
    }
}

#[test]
fn byte_sequences_become_byte_strings() {
    let bytes: Vec<u8> = (0..=255).collect();
    let encoded = to_vec(&bytes).expect("enc");
    assert_eq!(
        &encoded[..3],
        &[0x59, 0x01, 0x00],
        "a byte string of 256 bytes"
    );
    assert_eq!(from_slice::<Vec<u8>>(&encoded).expect("dec"), bytes);
    assert_eq!(
        from_slice::<VecDeque<u8>>(&encoded).expect("dec"),
        VecDeque::from(bytes.clone())
    );
    assert_eq!(
        from_slice::<serde_bytes::ByteBuf>(&encoded)
            .expect("dec")
            .into_vec(),
        bytes
    );
    let deque: VecDeque<u8> = bytes.iter().copied().collect();
    assert_eq!(to_vec(&deque).expect("enc"), encoded);
    // Wider integers stay arrays.
    assert_eq!(to_vec(&vec![1u16, 2]).expect("enc"), hex("820102"));
}

#[test]
fn vec_u8_decodes_in_one_allocation() {
    // serde's growing visitor would end with a power-of-two capacity.
    let bytes: Vec<u8> = (0..3_000_001u32).map(|i| i as u8).collect();
    let decoded: Vec<u8> = from_slice(&to_vec(&bytes).expect("enc")).expect("dec");
    assert_eq!(decoded, bytes);
    assert_eq!(
        decoded.capacity(),
        bytes.len(),
        "the fast path for serde's Vec<u8> visitor was not taken"
    );

    /// A custom visitor producing Vec<u8> must still run: it keeps only even bytes.
    struct EvenBytes(Vec<u8>);
    impl<'de> Deserialize<'de> for EvenBytes {
        fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct Even;
            impl<'de> serde::de::Visitor<'de> for Even {
                type Value = Vec<u8>;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("bytes")
                }
                fn visit_seq<A: serde::de::SeqAccess<'de>>(
                    self,
                    mut seq: A,
                ) -> Result<Vec<u8>, A::Error> {
                    let mut kept = Vec::new();
                    while let Some(byte) = seq.next_element::<u8>()? {
                        if byte % 2 == 0 {
                            kept.push(byte);
                        }
                    }
                    Ok(kept)
                }
            }
            deserializer.deserialize_seq(Even).map(EvenBytes)
        }
    }
    let even: EvenBytes = from_slice(&to_vec(&vec![1u8, 2, 3, 4]).expect("enc")).expect("dec");
    assert_eq!(even.0, [2, 4]);
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Shape {
    Unit,
    Newtype(i64),
    Tuple(u8, String),
    Struct { name: String, tags: Vec<String> },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Everything {
    flag: bool,
    small: i8,
    big: i128,
    huge: u128,
    float: f64,
    single: f32,
    letter: char,
    text: String,
    bytes: Vec<u8>,
    maybe: Option<Box<Everything>>,
    shapes: Vec<Shape>,
    map: BTreeMap<u32, String>,
    unit: (),
    #[serde(skip_serializing_if = "Option::is_none", default)]
    skipped: Option<u8>,
}

fn shape() -> impl Strategy<Value = Shape> {
    prop_oneof![
        Just(Shape::Unit),
        any::<i64>().prop_map(Shape::Newtype),
        (any::<u8>(), ".*").prop_map(|(a, b)| Shape::Tuple(a, b)),
        (".*", proptest::collection::vec(".*", 0..3))
            .prop_map(|(name, tags)| Shape::Struct { name, tags }),
    ]
}

fn everything() -> impl Strategy<Value = Everything> {
    (
        (
            any::<bool>(),
            any::<i8>(),
            any::<i128>(),
            any::<u128>(),
            any::<f64>(),
            any::<f32>(),
            any::<char>(),
        ),
        (
            ".*",
            proptest::collection::vec(any::<u8>(), 0..300),
            proptest::collection::vec(shape(), 0..4),
        ),
        (
            proptest::collection::btree_map(any::<u32>(), ".*", 0..4),
            any::<Option<u8>>(),
        ),
    )
        .prop_map(
            |(
                (flag, small, big, huge, float, single, letter),
                (text, bytes, shapes),
                (map, skipped),
            )| {
                Everything {
                    flag,
                    small,
                    big,
                    huge,
                    float,
                    single,
                    letter,
                    text,
                    bytes,
                    maybe: None,
                    shapes,
                    map,
                    unit: (),
                    skipped,
                }
            },
        )
}

fn same(a: &Everything, b: &Everything) -> bool {
    // NaN never equals itself; compare floats by bits.
    a.float.to_bits() == b.float.to_bits()
        && a.single.to_bits() == b.single.to_bits()
        && Everything {
            float: 0.0,
            single: 0.0,
            ..a.clone()
        } == Everything {
            float: 0.0,
            single: 0.0,
            ..b.clone()
        }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(
        std::env::var("CHOPSTICKS_FUZZ_CASES").ok().and_then(|cases| cases.parse().ok()).unwrap_or(256)
    ))]

    #[test]
    fn values_round_trip(value in everything(), nested in everything()) {
        let value = Everything { maybe: Some(Box::new(nested)), ..value };
        let decoded: Everything = from_slice(&to_vec(&value).expect("enc")).expect("dec");
        prop_assert!(same(&decoded, &value));
        prop_assert!(same(decoded.maybe.as_deref().expect("nested"), value.maybe.as_deref().expect("nested")));
    }

    #[test]
    fn arbitrary_input_never_panics(input in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = from_slice::<Everything>(&input);
        let _ = from_slice::<serde_json_like::Value>(&input);
        let _ = from_slice::<(Vec<u8>, String, Option<i128>)>(&input);
    }

    #[test]
    fn mutated_encodings_never_panic(value in everything(), flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4)) {
        let mut encoded = to_vec(&value).expect("enc");
        for (at, byte) in flips {
            let len = encoded.len();
            encoded[at % len] ^= byte;
        }
        let _ = from_slice::<Everything>(&encoded);
    }
}

#[test]
fn hostile_lengths_and_nesting_are_refused() {
    // A byte string claiming 2^64-1 bytes.
    let error: CodecError =
        from_slice::<Vec<u8>>(&hex("5bffffffffffffffff")).expect_err("must fail");
    assert!(error.to_string().contains("exceeds"), "{error}");
    // An array claiming 2^32 elements with none present.
    assert!(from_slice::<Vec<u32>>(&hex("9affffffff")).is_err());
    // Nesting deeper than the limit.
    let deep = [vec![0x81u8; 10_000], vec![0x00]].concat();
    let error = from_slice::<serde_json_like::Value>(&deep).expect_err("must fail");
    assert!(error.to_string().contains("nest"), "{error}");
    // Trailing bytes and extra array elements.
    assert!(from_slice::<u8>(&hex("0000")).is_err());
    assert!(from_slice::<(u8,)>(&hex("820102")).is_err());
    // An indefinite byte string whose chunk claims far more than the input holds.
    assert!(from_slice::<Vec<u8>>(&hex("5f5b52cf3bb3f0e56a50ff")).is_err());
    assert!(from_slice::<String>(&hex("7f7b52cf3bb3f0e56a50ff")).is_err());
    // A byte string read as a tuple must not have bytes left over.
    assert!(from_slice::<(u8, u8)>(&hex("43010203")).is_err());
    assert_eq!(
        from_slice::<(u8, u8)>(&hex("420102")).expect("pair"),
        (1, 2)
    );
    // Invalid UTF-8 and reserved initial bytes.
    assert!(from_slice::<String>(&hex("62c328")).is_err());
    assert!(from_slice::<u8>(&hex("1c")).is_err());
}

/// Large encodes and decodes leave the runtime worker to other tasks: on a
/// runtime with one worker, a hook inside the codec waits for a flag that
/// only another task sets. Run on the worker itself, that would never happen
/// and the hook would give up after 10 s.
mod off_the_runtime {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};

    use serde::de::{Deserialize, Deserializer, SeqAccess, Visitor};
    use serde::ser::{Serialize, Serializer};

    use crate::buffer::LARGE_WORK;
    use crate::cbor::{from_slice, to_vec};

    /// Waits for `flag`, at most 10 s; whether it was set.
    fn wait_for(flag: &AtomicBool) -> bool {
        let started = Instant::now();
        while !flag.load(Ordering::SeqCst) {
            if started.elapsed() > Duration::from_secs(10) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    std::thread_local! {
        static FLAG: std::cell::RefCell<Option<Arc<AtomicBool>>> = const { std::cell::RefCell::new(None) };
    }

    fn flag() -> Arc<AtomicBool> {
        FLAG.with(|flag| flag.borrow().clone()).expect("flag set")
    }

    /// Bytes whose serialization waits for the flag after the first byte.
    struct Waiting(usize);

    impl Serialize for Waiting {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let flag = flag();
            let mut first = true;
            let bytes = std::iter::repeat_n(7u8, self.0).inspect(move |_| {
                if std::mem::take(&mut first) {
                    assert!(wait_for(&flag), "the encoder held the only worker");
                }
            });
            serializer.collect_seq(ExactBytes(bytes, self.0))
        }
    }

    /// An iterator of `u8` that reports its exact length.
    struct ExactBytes<I>(I, usize);

    impl<I: Iterator<Item = u8>> Iterator for ExactBytes<I> {
        type Item = u8;
        fn next(&mut self) -> Option<u8> {
            let next = self.0.next();
            self.1 = self.1.saturating_sub(usize::from(next.is_some()));
            next
        }
        fn size_hint(&self) -> (usize, Option<usize>) {
            (self.1, Some(self.1))
        }
    }

    /// A value whose decoding waits for the flag.
    struct WaitingDecode;

    impl<'de> Deserialize<'de> for WaitingDecode {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            struct Waits;
            impl<'de> Visitor<'de> for Waits {
                type Value = WaitingDecode;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("bytes")
                }
                fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<WaitingDecode, A::Error> {
                    Err(serde::de::Error::custom("bytes expected"))
                }
                fn visit_bytes<E: serde::de::Error>(self, _: &[u8]) -> Result<WaitingDecode, E> {
                    assert!(wait_for(&flag()), "the decoder held the only worker");
                    Ok(WaitingDecode)
                }
                fn visit_byte_buf<E: serde::de::Error>(
                    self,
                    bytes: Vec<u8>,
                ) -> Result<WaitingDecode, E> {
                    self.visit_bytes(&bytes)
                }
            }
            deserializer.deserialize_bytes(Waits)
        }
    }

    fn one_worker() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime")
    }

    /// Runs `codec` in a task on a one-worker runtime while another task sets the flag.
    fn run_beside_a_task(codec: impl FnOnce() + Send + 'static) {
        let runtime = one_worker();
        let flag = Arc::new(AtomicBool::new(false));
        let setter = flag.clone();
        let outcome = runtime.block_on(async move {
            let coded = tokio::spawn(async move {
                FLAG.with(|cell| *cell.borrow_mut() = Some(flag));
                codec();
            });
            // The codec's task goes first; this one runs only on a free worker.
            tokio::task::yield_now().await;
            let set = tokio::spawn(async move { setter.store(true, Ordering::SeqCst) });
            let coded = coded.await;
            let _ = set.await;
            coded
        });
        outcome.expect("the codec's task");
    }

    #[test]
    fn a_large_encode_frees_the_worker() {
        run_beside_a_task(|| {
            let encoded = to_vec(&Waiting(2 * LARGE_WORK)).expect("encode");
            assert!(encoded.len() > 2 * LARGE_WORK);
        });
    }

    #[test]
    fn a_large_decode_frees_the_worker() {
        let encoded =
            to_vec(&serde_bytes::ByteBuf::from(vec![1u8; 2 * LARGE_WORK])).expect("encode");
        run_beside_a_task(move || {
            from_slice::<WaitingDecode>(&encoded).expect("decode");
        });
    }
}
