//! Framing: length-delimited frames carrying either one CBOR message or one raw data chunk.
//!
//! ```text
//!  0        4        5                                     4+length
//!  +--------+--------+--------------------------------------+
//!  | length |  tag   | body                                 |
//!  | u32 BE |   u8   |                                      |
//!  +--------+--------+--------------------------------------+
//!
//!  tag 0x01  MESSAGE   body = one CBOR-encoded protocol::Message
//!  tag 0x02  CHUNK     body = call id (u64 BE) + raw payload bytes
//!  tag 0x03  CALL      body = id u64 | mode u8 | offset i64 | name length u16 | name
//!                             | payload
//!  tag 0x04  RETURN    body = id u64 | payload
//!  tag 0x05  STREAM    body = call id (u64 BE) + the next bytes of that call's stream
//!
//!  payload = 0x00 | raw bytes to the end of the frame      (Payload::Inline)
//!          | 0x01 | total length u64                       (Payload::Streamed)
//!
//!  Integers are big-endian. length counts the tag and the body; it never
//!  exceeds MAX_FRAME_LEN.
//! ```
//!
//! `Call` and `Return` carry every call, so they have fixed binary layouts
//! (no CBOR parsing, no key strings); every other message is CBOR, which
//! keeps the rare ones easy to extend. Both decode to the same
//! [`Message`] values.
//!
//! A payload larger than [`INLINE_LIMIT`] is announced by its message as
//! `Payload::Streamed { len }` and follows as CHUNK frames of at most
//! [`CHUNK_LEN`] bytes. Chunks bypass CBOR entirely, so bulk data costs one
//! copy on each side. The [`Outbox`] keeps two queues: small frames go out
//! first, and at most one chunk joins each write batch, so a 10 GB transfer
//! never delays a ping by more than one chunk.
//!
//! A stream (a call's items, or input fed to a call) is a byte stream of
//! its own, carried in STREAM frames of at most [`STREAM_FRAME_LEN`] bytes
//! and paced by the receiver's credit (see [`flow`](crate::flow)). Items
//! are length-prefixed CBOR values in it; raw bytes are just bytes.
//!
//! The length prefix is decoded by `tokio_util`'s `LengthDelimitedCodec`
//! with an explicit maximum: an oversized or garbled length closes the
//! connection with an `InvalidData` error instead of allocating.

use std::io;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, LengthDelimitedCodec};

use crate::protocol::{CallMode, FunctionRef, Message, Payload};

pub mod direct;
mod outbox;

pub use outbox::{Assemblies, Outbox, OutboxClosed, OutboxReceiver, write_frames};

/// The largest frame either end accepts (tag and body).
pub const MAX_FRAME_LEN: usize = CHUNK_LEN + 64 * 1024;
/// Payloads larger than this are streamed as chunks instead of inlined.
pub const INLINE_LIMIT: usize = 64 * 1024;
/// The size of one data chunk.
pub const CHUNK_LEN: usize = 256 * 1024;
/// The most stream bytes one STREAM frame carries: a chunk's worth. Stream
/// frames share the small-frame queue with calls, so a call waits behind at
/// most one such frame per stream with credit.
pub const STREAM_FRAME_LEN: usize = CHUNK_LEN;
/// The largest streamed payload either end accepts by default.
pub const MAX_PAYLOAD_LEN: u64 = 4 << 30;

const TAG_MESSAGE: u8 = 0x01;
const TAG_CHUNK: u8 = 0x02;
const TAG_CALL: u8 = 0x03;
const TAG_RETURN: u8 = 0x04;
const TAG_STREAM: u8 = 0x05;
const PAYLOAD_INLINE: u8 = 0x00;
const PAYLOAD_STREAMED: u8 = 0x01;
/// Bodies at least this large are written straight from their buffer instead of being batched.
const DIRECT_WRITE_LEN: usize = 16 * 1024;
/// A write batch is flushed once it holds this many bytes.
const BATCH_LEN: usize = 256 * 1024;
/// How many chunk frames may wait in the bulk queue.
const BULK_QUEUE_LEN: usize = 4;

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A protocol message.
    Message(Message),
    /// A piece of a streamed payload.
    Chunk {
        /// The call id the payload belongs to.
        id: u64,
        /// The bytes.
        data: Bytes,
    },
    /// The next bytes of a call's stream.
    Stream {
        /// The call id the stream belongs to.
        id: u64,
        /// The bytes.
        data: Bytes,
    },
}

impl Frame {
    /// The frame's kind, as errors name it (never its content).
    pub fn kind(&self) -> &'static str {
        match self {
            Frame::Message(message) => message.kind(),
            Frame::Chunk { .. } => "a chunk",
            Frame::Stream { .. } => "stream data",
        }
    }
}

/// An encoded frame ready to write: a small head and an optional large body.
#[derive(Debug, Clone)]
pub struct OutFrame {
    head: Bytes,
    body: Bytes,
}

impl OutFrame {
    /// Encodes a message frame: `Call` and `Return` in their binary layouts, the rest as CBOR.
    pub fn message(message: &Message) -> OutFrame {
        match message {
            Message::Call {
                id,
                function: FunctionRef::Offset { offset, name },
                mode,
                args,
            } => {
                // Names longer than a u16 are cut; they only label errors and traces.
                let name = &name.as_bytes()[..name.len().min(usize::from(u16::MAX))];
                let mut head = BytesMut::with_capacity(4 + 1 + 8 + 1 + 8 + 2 + name.len() + 9);
                head.put_u32(0);
                head.put_u8(TAG_CALL);
                head.put_u64(*id);
                head.put_u8(match mode {
                    CallMode::Blocking => 0,
                    CallMode::Async => 1,
                    CallMode::BlockingStream => 2,
                    CallMode::AsyncStream => 3,
                });
                head.put_i64(*offset);
                head.put_u16(name.len() as u16);
                head.put_slice(name);
                OutFrame::with_payload(head, args)
            }
            Message::Return { id, value } => {
                let mut head = BytesMut::with_capacity(4 + 1 + 8 + 9);
                head.put_u32(0);
                head.put_u8(TAG_RETURN);
                head.put_u64(*id);
                OutFrame::with_payload(head, value)
            }
            other => {
                // Encoding fails only if a Serialize impl fails; ours are derived.
                let body = crate::cbor::to_vec(other).unwrap_or_else(|error| {
                    unreachable_encoding(other, &error);
                    Vec::new()
                });
                let mut head = BytesMut::with_capacity(5 + body.len());
                head.put_u32(1 + body.len() as u32);
                head.put_u8(TAG_MESSAGE);
                head.put_slice(&body);
                OutFrame {
                    head: head.freeze(),
                    body: Bytes::new(),
                }
            }
        }
    }

    /// Finishes a binary frame whose head ends where its payload starts.
    fn with_payload(mut head: BytesMut, payload: &Payload) -> OutFrame {
        let body = match payload {
            Payload::Inline(bytes) => {
                head.put_u8(PAYLOAD_INLINE);
                if bytes.len() < DIRECT_WRITE_LEN {
                    head.put_slice(bytes);
                    Bytes::new()
                } else {
                    Bytes::copy_from_slice(bytes)
                }
            }
            Payload::Streamed { len } => {
                head.put_u8(PAYLOAD_STREAMED);
                head.put_u64(*len);
                Bytes::new()
            }
        };
        let length = (head.len() - 4 + body.len()) as u32;
        head[..4].copy_from_slice(&length.to_be_bytes());
        OutFrame {
            head: head.freeze(),
            body,
        }
    }

    /// Encodes a chunk frame; `data` must be at most [`CHUNK_LEN`] bytes.
    pub fn chunk(id: u64, data: Bytes) -> OutFrame {
        debug_assert!(data.len() <= CHUNK_LEN);
        let mut head = BytesMut::with_capacity(13);
        head.put_u32((1 + 8 + data.len()) as u32);
        head.put_u8(TAG_CHUNK);
        head.put_u64(id);
        OutFrame {
            head: head.freeze(),
            body: data,
        }
    }

    /// Encodes a stream frame; `data` must be at most [`STREAM_FRAME_LEN`] bytes.
    pub fn stream(id: u64, data: Bytes) -> OutFrame {
        debug_assert!(data.len() <= STREAM_FRAME_LEN);
        let mut head = BytesMut::with_capacity(13);
        head.put_u32((1 + 8 + data.len()) as u32);
        head.put_u8(TAG_STREAM);
        head.put_u64(id);
        if data.len() < DIRECT_WRITE_LEN {
            // Small stream frames are batched with calls: one buffer.
            head.put_slice(&data);
            return OutFrame {
                head: head.freeze(),
                body: Bytes::new(),
            };
        }
        OutFrame {
            head: head.freeze(),
            body: data,
        }
    }

    /// A frame that writes nothing; queuing it wakes the writer, which then flushes.
    pub fn empty() -> OutFrame {
        OutFrame {
            head: Bytes::new(),
            body: Bytes::new(),
        }
    }

    /// The frame's bytes when they are in one buffer (small frames), else `None`.
    pub fn contiguous(&self) -> Option<&[u8]> {
        self.body.is_empty().then_some(&self.head[..])
    }

    /// The frame's bytes on the wire, concatenated (for tests and tools).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.head.len() + self.body.len());
        bytes.extend_from_slice(&self.head);
        bytes.extend_from_slice(&self.body);
        bytes
    }
}

#[cold]
fn unreachable_encoding(message: &Message, error: &crate::cbor::CodecError) {
    tracing::error!(?message, %error, "a protocol message could not be CBOR-encoded");
}

/// Decodes frames from a byte stream; use with `tokio_util::codec::FramedRead`.
///
/// Malformed input yields an `io::Error` of kind `InvalidData`.
#[derive(Debug)]
pub struct FrameDecoder {
    lengths: LengthDelimitedCodec,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder {
            lengths: LengthDelimitedCodec::builder()
                .big_endian()
                .length_field_type::<u32>()
                .max_frame_length(MAX_FRAME_LEN)
                .new_codec(),
        }
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

impl Decoder for FrameDecoder {
    type Item = Frame;
    type Error = io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> io::Result<Option<Frame>> {
        let Some(mut body) = self.lengths.decode(src)? else {
            return Ok(None);
        };
        if body.is_empty() {
            return Err(invalid("received an empty frame".into()));
        }
        match body.get_u8() {
            TAG_MESSAGE => crate::cbor::from_slice::<Message>(&body[..])
                .map(|message| Some(Frame::Message(message)))
                .map_err(|error| invalid(format!("received an undecodable message: {error}"))),
            TAG_CHUNK => {
                let id = take_u64(&mut body, "chunk")?;
                Ok(Some(Frame::Chunk {
                    id,
                    data: body.freeze(),
                }))
            }
            TAG_CALL => {
                let id = take_u64(&mut body, "call")?;
                let mode = match take_u8(&mut body, "call")? {
                    0 => CallMode::Blocking,
                    1 => CallMode::Async,
                    2 => CallMode::BlockingStream,
                    3 => CallMode::AsyncStream,
                    other => {
                        return Err(invalid(format!(
                            "received a call with unknown mode {other}"
                        )));
                    }
                };
                let offset = take_u64(&mut body, "call")? as i64;
                let name_len = usize::from(take_u16(&mut body, "call")?);
                if body.len() < name_len {
                    return Err(invalid(
                        "received a call frame cut short in its name".into(),
                    ));
                }
                let name = String::from_utf8_lossy(&body.split_to(name_len)).into_owned();
                let args = take_payload(&mut body, "call")?;
                Ok(Some(Frame::Message(Message::Call {
                    id,
                    function: FunctionRef::Offset {
                        offset,
                        name: name.into(),
                    },
                    mode,
                    args,
                })))
            }
            TAG_STREAM => {
                let id = take_u64(&mut body, "stream")?;
                if body.len() > STREAM_FRAME_LEN {
                    return Err(invalid(format!(
                        "received a stream frame of {} bytes, over the limit of {STREAM_FRAME_LEN}",
                        body.len()
                    )));
                }
                Ok(Some(Frame::Stream {
                    id,
                    data: body.freeze(),
                }))
            }
            TAG_RETURN => {
                let id = take_u64(&mut body, "return")?;
                let value = take_payload(&mut body, "return")?;
                Ok(Some(Frame::Message(Message::Return { id, value })))
            }
            tag => Err(invalid(format!(
                "received a frame with unknown tag {tag:#04x}"
            ))),
        }
    }
}

fn short(what: &str) -> io::Error {
    invalid(format!("received a {what} frame that is too short"))
}

fn take_u8(body: &mut BytesMut, what: &str) -> io::Result<u8> {
    if body.remaining() < 1 {
        return Err(short(what));
    }
    Ok(body.get_u8())
}

fn take_u16(body: &mut BytesMut, what: &str) -> io::Result<u16> {
    if body.remaining() < 2 {
        return Err(short(what));
    }
    Ok(body.get_u16())
}

fn take_u64(body: &mut BytesMut, what: &str) -> io::Result<u64> {
    if body.remaining() < 8 {
        return Err(short(what));
    }
    Ok(body.get_u64())
}

fn take_payload(body: &mut BytesMut, what: &str) -> io::Result<Payload> {
    match take_u8(body, what)? {
        PAYLOAD_INLINE => Ok(Payload::Inline(body.to_vec())),
        PAYLOAD_STREAMED if body.remaining() == 8 => Ok(Payload::Streamed {
            len: body.get_u64(),
        }),
        PAYLOAD_STREAMED => Err(invalid(format!(
            "received a {what} frame with a malformed streamed length"
        ))),
        other => Err(invalid(format!(
            "received a {what} frame with unknown payload kind {other}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{CallMode, FunctionRef};

    fn decode_all(bytes: &[u8]) -> io::Result<Vec<Frame>> {
        let mut decoder = FrameDecoder::default();
        let mut buffer = BytesMut::from(bytes);
        let mut frames = Vec::new();
        while let Some(frame) = decoder.decode(&mut buffer)? {
            frames.push(frame);
        }
        Ok(frames)
    }

    #[test]
    fn message_and_chunk_frames_round_trip() {
        let message = Message::Cancel { id: 3 };
        let mut bytes = OutFrame::message(&message).to_bytes();
        bytes.extend(OutFrame::chunk(3, Bytes::from_static(b"abc")).to_bytes());
        let frames = decode_all(&bytes).expect("decode");
        assert_eq!(
            frames,
            vec![
                Frame::Message(message),
                Frame::Chunk {
                    id: 3,
                    data: Bytes::from_static(b"abc")
                }
            ]
        );
    }

    #[test]
    fn stream_frames_round_trip_small_and_large_and_refuse_oversized_ones() {
        for len in [0, 9, DIRECT_WRITE_LEN, STREAM_FRAME_LEN] {
            let data = Bytes::from(vec![0xa5; len]);
            let bytes = OutFrame::stream(u64::MAX - 1, data.clone()).to_bytes();
            assert_eq!(
                decode_all(&bytes).expect("decode"),
                vec![Frame::Stream {
                    id: u64::MAX - 1,
                    data
                }]
            );
        }
        let mut oversized = vec![0, 0, 0, 0, TAG_STREAM];
        oversized.extend_from_slice(&7u64.to_be_bytes());
        oversized.extend(vec![0; STREAM_FRAME_LEN + 1]);
        let len = (oversized.len() - 4) as u32;
        oversized[..4].copy_from_slice(&len.to_be_bytes());
        let error = decode_all(&oversized).expect_err("must fail");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(error.to_string().contains("stream frame"), "{error}");
    }

    #[test]
    fn call_and_return_use_binary_layouts_and_round_trip() {
        let messages = [
            Message::Call {
                id: 9,
                function: FunctionRef::Offset {
                    offset: -77,
                    name: "crate::f".into(),
                },
                mode: CallMode::Async,
                args: Payload::Inline(vec![1, 2, 3]),
            },
            Message::Call {
                id: 10,
                function: FunctionRef::Offset {
                    offset: 5,
                    name: "".into(),
                },
                mode: CallMode::Blocking,
                args: Payload::Streamed { len: 1 << 40 },
            },
            Message::Call {
                id: 13,
                function: FunctionRef::Offset {
                    offset: 6,
                    name: "s".into(),
                },
                mode: CallMode::BlockingStream,
                args: Payload::Inline(vec![0x80]),
            },
            Message::Call {
                id: 14,
                function: FunctionRef::Offset {
                    offset: 7,
                    name: "t".into(),
                },
                mode: CallMode::AsyncStream,
                args: Payload::Inline(vec![0x80]),
            },
            Message::Return {
                id: 11,
                value: Payload::Inline(vec![0; DIRECT_WRITE_LEN + 1]),
            },
            Message::Return {
                id: 12,
                value: Payload::Streamed { len: 70_000 },
            },
        ];
        for message in messages {
            let bytes = OutFrame::message(&message).to_bytes();
            assert_ne!(bytes[4], TAG_MESSAGE);
            let frames = decode_all(&bytes).expect("decode");
            assert_eq!(frames, vec![Frame::Message(message)]);
        }
    }

    #[test]
    fn truncated_binary_frames_are_rejected() {
        let call = OutFrame::message(&Message::Call {
            id: 1,
            function: FunctionRef::Offset {
                offset: 0,
                name: "name".into(),
            },
            mode: CallMode::Blocking,
            args: Payload::Streamed { len: 99 },
        })
        .to_bytes();
        for cut in 5..call.len() {
            let mut bytes = call[..cut].to_vec();
            bytes[..4].copy_from_slice(&((cut - 4) as u32).to_be_bytes());
            let error = decode_all(&bytes).expect_err("must fail");
            assert_eq!(error.kind(), io::ErrorKind::InvalidData, "cut at {cut}");
        }
    }

    #[test]
    fn oversized_length_is_rejected_without_allocating() {
        // A header claiming 4 GiB, then a little of the body: the decoder
        // must refuse before it reserves room for the claim.
        let mut buffer = BytesMut::with_capacity(64);
        buffer.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, TAG_MESSAGE, 1, 2, 3]);
        let error = FrameDecoder::default()
            .decode(&mut buffer)
            .expect_err("must fail");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(
            buffer.capacity() < 1 << 20,
            "the decoder reserved {} bytes for the claim",
            buffer.capacity()
        );
    }

    #[test]
    fn unknown_tag_and_short_chunk_are_rejected() {
        for bytes in [
            &[0, 0, 0, 1, 0x7f][..],
            &[0, 0, 0, 3, TAG_CHUNK, 0, 0][..],
            &[0, 0, 0, 0][..],
        ] {
            let error = decode_all(bytes).expect_err("must fail");
            assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        }
    }

    #[tokio::test]
    async fn streamed_payload_reassembles_in_order() {
        let (outbox, receiver) = Outbox::new();
        let data: Vec<u8> = (0..(3 * CHUNK_LEN + 17)).map(|i| i as u8).collect();
        let expected = data.clone();
        let sender = tokio::spawn(async move {
            let streamed = outbox
                .send_payload(
                    5,
                    data,
                    |args| Message::Call {
                        id: 5,
                        function: FunctionRef::Offset {
                            offset: 0,
                            name: "f".into(),
                        },
                        mode: CallMode::Blocking,
                        args,
                    },
                    false,
                )
                .await
                .expect("send");
            assert!(streamed);
            outbox
                .send(OutFrame::message(&Message::Shutdown))
                .expect("send");
        });
        let mut wire = Vec::new();
        write_frames(receiver, &mut wire).await.expect("write");
        sender.await.expect("sender");

        let mut assemblies = Assemblies::default();
        let mut complete = None;
        for frame in decode_all(&wire).expect("decode") {
            match frame {
                Frame::Message(Message::Call {
                    id,
                    args: Payload::Streamed { len },
                    ..
                }) => assemblies.start(id, len).expect("start"),
                Frame::Chunk { id, data } => {
                    if let Some(whole) = assemblies.add(id, &data).expect("add") {
                        complete = Some(whole);
                    }
                }
                _ => {}
            }
        }
        assert_eq!(complete.as_deref(), Some(&expected[..]));
    }

    fn any_message() -> impl proptest::strategy::Strategy<Value = Message> {
        use proptest::prelude::*;
        prop_oneof![
            (
                any::<u64>(),
                any::<i64>(),
                ".{0,40}",
                0..4u8,
                proptest::collection::vec(any::<u8>(), 0..64)
            )
                .prop_map(|(id, offset, name, mode, args)| Message::Call {
                    id,
                    function: FunctionRef::Offset {
                        offset,
                        name: name.into()
                    },
                    mode: [
                        CallMode::Blocking,
                        CallMode::Async,
                        CallMode::BlockingStream,
                        CallMode::AsyncStream
                    ][usize::from(mode)],
                    args: Payload::Inline(args),
                }),
            (any::<u64>(), any::<u64>()).prop_map(|(id, bytes)| Message::Credit { id, bytes }),
            any::<u64>().prop_map(|id| Message::Input { id }),
            any::<u64>().prop_map(|id| Message::InputEnd { id }),
            any::<u8>().prop_map(|level| Message::TraceLevel { level }),
            (
                any::<u8>(),
                ".{0,20}",
                ".{0,40}",
                proptest::collection::vec(".{0,10}", 0..3)
            )
                .prop_map(|(level, target, message, hosts)| Message::Trace(
                    crate::trace::TraceEvent {
                        level,
                        target,
                        message,
                        fields: String::new(),
                        hosts,
                    }
                )),
            (any::<u64>(), any::<u64>()).prop_map(|(id, len)| Message::Return {
                id,
                value: Payload::Streamed { len },
            }),
            any::<u64>().prop_map(|id| Message::Cancel { id }),
            Just(Message::Shutdown),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(
            std::env::var("CHOPSTICKS_FUZZ_CASES").ok().and_then(|cases| cases.parse().ok()).unwrap_or(512)
        ))]

        /// Fuzzes the frame decoder with arbitrary bytes: errors are fine, panics are not.
        #[test]
        fn arbitrary_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = decode_all(&bytes);
        }

        /// Fuzzes with valid frames that have a few bytes flipped, which reaches deeper paths.
        #[test]
        fn mutated_frames_never_panic_the_decoder(
            messages in proptest::collection::vec(any_message(), 1..4),
            flips in proptest::collection::vec((proptest::prelude::any::<usize>(), proptest::prelude::any::<u8>()), 1..6),
            stream in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..96),
        ) {
            let mut bytes: Vec<u8> = messages.iter().flat_map(|message| OutFrame::message(message).to_bytes()).collect();
            bytes.extend(OutFrame::stream(3, Bytes::from(stream.clone())).to_bytes());
            let pristine = decode_all(&bytes).expect("valid frames decode");
            let mut expected: Vec<Frame> = messages.into_iter().map(Frame::Message).collect();
            expected.push(Frame::Stream { id: 3, data: Bytes::from(stream) });
            proptest::prop_assert_eq!(pristine, expected);
            for (at, mask) in flips {
                let len = bytes.len();
                bytes[at % len] ^= mask;
            }
            let _ = decode_all(&bytes);
        }
    }

    #[test]
    fn assemblies_refuse_overruns_and_huge_claims() {
        let mut assemblies = Assemblies::default();
        assert!(assemblies.start(1, MAX_PAYLOAD_LEN + 1).is_err());
        assemblies.start(1, INLINE_LIMIT as u64 + 1).expect("start");
        assert!(assemblies.add(1, &vec![0; INLINE_LIMIT + 2]).is_err());
        assert_eq!(assemblies.add(99, b"stray").expect("ignored"), None);
    }
}
