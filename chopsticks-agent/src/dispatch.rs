//! The agent's dispatcher: frames in, what to do out.
//!
//! [`Dispatcher::handle`] takes each frame the reader decodes and returns
//! one [`Action`]. It owns only what the order of frames decides: streamed
//! arguments being reassembled, the calls waiting for them, and which ids
//! are puts (so a chunk goes to its file, not to an argument). Running
//! calls, writing files and replying are the reader's (`serve.rs`), so this
//! part is tested with frames made in memory.

use std::collections::{HashMap, HashSet};

use bytes::Bytes;
use chopsticks_core::__private::protocol::{CallMode, FunctionRef, Message, Payload, PutRequest};
use chopsticks_core::__private::wire::{Assemblies, Frame};

/// What the reader does with a frame.
#[derive(Debug)]
pub(crate) enum Action {
    /// Run a call whose arguments are complete. `inline` when they came in
    /// the call's own frame (a blocking one may then run on the reader).
    Call {
        id: u64,
        function: FunctionRef,
        mode: CallMode,
        args: Vec<u8>,
        inline: bool,
    },
    /// Start receiving a file.
    StartPut { id: u64, request: PutRequest },
    /// The next piece of put `id`.
    PutChunk { id: u64, data: Bytes },
    /// Put `id` is complete; its checksum as the controller computed it.
    EndPut { id: u64, checksum: Vec<u8> },
    /// Send the file at `path`.
    Fetch { id: u64, path: Vec<u8> },
    /// Stop request `id` (its call, put or fetch); its partial arguments are already dropped.
    Cancel { id: u64 },
    /// The controller lets stream `id` send `bytes` more.
    Credit { id: u64, bytes: u64 },
    /// Forward `tracing` events at this level number or above.
    TraceLevel { level: u8 },
    /// Call `id` takes an input stream; its data may come before the call.
    OpenInput { id: u64 },
    /// The next bytes of call `id`'s input.
    InputData { id: u64, data: Bytes },
    /// Call `id`'s input is complete.
    EndInput { id: u64 },
    /// Exit cleanly.
    Shutdown,
    /// Nothing to do (a heartbeat, a chunk of an argument still arriving,
    /// a late chunk of a cancelled request).
    Nothing,
    /// The controller broke the protocol; the agent exits.
    Violation(String),
}

/// The dispatcher's state; see the [module](self).
#[derive(Default)]
pub(crate) struct Dispatcher {
    assemblies: Assemblies,
    awaiting_payload: HashMap<u64, (FunctionRef, CallMode)>,
    puts: HashSet<u64>,
    /// Calls whose input the controller announced and has not ended.
    inputs: HashSet<u64>,
}

impl Dispatcher {
    /// What to do with `frame`.
    pub(crate) fn handle(&mut self, frame: Frame) -> Action {
        match frame {
            Frame::Message(Message::Call {
                id,
                function,
                mode,
                args: Payload::Inline(args),
            }) => Action::Call {
                id,
                function,
                mode,
                args,
                inline: true,
            },
            Frame::Message(Message::Call {
                id,
                function,
                mode,
                args: Payload::Streamed { len },
            }) => match self.assemblies.start(id, len) {
                Ok(()) => {
                    self.awaiting_payload.insert(id, (function, mode));
                    Action::Nothing
                }
                Err(message) => Action::Violation(message),
            },
            Frame::Message(Message::Put { id, request }) => {
                self.puts.insert(id);
                Action::StartPut { id, request }
            }
            Frame::Message(Message::PutEnd { id, checksum }) => {
                if self.puts.remove(&id) {
                    Action::EndPut { id, checksum }
                } else {
                    Action::Nothing
                }
            }
            Frame::Message(Message::Fetch { id, path }) => Action::Fetch { id, path },
            Frame::Chunk { id, data } if self.puts.contains(&id) => Action::PutChunk { id, data },
            Frame::Chunk { id, data } => match self.assemblies.add(id, &data) {
                Ok(Some(args)) => match self.awaiting_payload.remove(&id) {
                    Some((function, mode)) => Action::Call {
                        id,
                        function,
                        mode,
                        args,
                        inline: false,
                    },
                    None => Action::Nothing,
                },
                Ok(None) => Action::Nothing,
                Err(message) => Action::Violation(message),
            },
            Frame::Message(Message::Cancel { id }) => {
                self.assemblies.cancel(id);
                self.awaiting_payload.remove(&id);
                self.puts.remove(&id);
                self.inputs.remove(&id);
                Action::Cancel { id }
            }
            Frame::Message(Message::Credit { id, bytes }) => Action::Credit { id, bytes },
            Frame::Message(Message::TraceLevel { level }) => Action::TraceLevel { level },
            Frame::Message(Message::Input { id }) => {
                if self.inputs.insert(id) {
                    Action::OpenInput { id }
                } else {
                    Action::Violation(format!(
                        "the controller opened the input of request {id} twice"
                    ))
                }
            }
            Frame::Stream { id, data } if self.inputs.contains(&id) => {
                Action::InputData { id, data }
            }
            Frame::Stream { id, .. } => Action::Violation(format!(
                "the controller sent stream data for request {id}, which takes no input"
            )),
            Frame::Message(Message::InputEnd { id }) => {
                if self.inputs.remove(&id) {
                    Action::EndInput { id }
                } else {
                    Action::Violation(format!(
                        "the controller ended the input of request {id}, which takes none"
                    ))
                }
            }
            Frame::Message(Message::Shutdown) => Action::Shutdown,
            Frame::Message(Message::Heartbeat) => Action::Nothing,
            Frame::Message(other) => Action::Violation(format!(
                "the controller sent {}, which only an agent may send",
                other.kind()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chopsticks_core::__private::wire::INLINE_LIMIT;

    fn function() -> FunctionRef {
        FunctionRef::Offset {
            offset: 64,
            name: "tests::f".into(),
        }
    }

    fn call(id: u64, args: Payload) -> Frame {
        Frame::Message(Message::Call {
            id,
            function: function(),
            mode: CallMode::Blocking,
            args,
        })
    }

    fn chunk(id: u64, data: &[u8]) -> Frame {
        Frame::Chunk {
            id,
            data: Bytes::copy_from_slice(data),
        }
    }

    fn put(id: u64, size: u64) -> Frame {
        Frame::Message(Message::Put {
            id,
            request: PutRequest {
                path: b"/tmp/target".to_vec(),
                size,
                mode: 0o600,
                apply_umask: false,
                sync: false,
                create_dirs: false,
                mtime: None,
                owner: None,
                group: None,
            },
        })
    }

    /// A payload just over the inline limit, in two chunks.
    fn streamed_args() -> (Vec<u8>, Vec<u8>) {
        let first: Vec<u8> = (0..INLINE_LIMIT).map(|i| i as u8).collect();
        (first, vec![7u8; 100])
    }

    #[test]
    fn inline_calls_run_in_order_with_their_own_arguments() {
        let mut dispatcher = Dispatcher::default();
        for id in 1..=3u64 {
            match dispatcher.handle(call(id, Payload::Inline(vec![id as u8; 3]))) {
                Action::Call {
                    id: got,
                    args,
                    inline: true,
                    mode: CallMode::Blocking,
                    ..
                } => assert_eq!((got, args), (id, vec![id as u8; 3])),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn streamed_arguments_start_the_call_on_their_last_chunk_interleaved_with_others() {
        let mut dispatcher = Dispatcher::default();
        let (first, second) = streamed_args();
        let len = (first.len() + second.len()) as u64;
        assert!(matches!(
            dispatcher.handle(call(1, Payload::Streamed { len })),
            Action::Nothing
        ));
        assert!(matches!(
            dispatcher.handle(chunk(1, &first)),
            Action::Nothing
        ));
        // A small call overtakes the rest of the payload.
        assert!(matches!(
            dispatcher.handle(call(2, Payload::Inline(vec![2]))),
            Action::Call { id: 2, .. }
        ));
        match dispatcher.handle(chunk(1, &second)) {
            Action::Call {
                id: 1,
                args,
                inline: false,
                ..
            } => assert_eq!(args, [first, second].concat()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_cancel_mid_payload_drops_it_and_late_chunks_do_nothing() {
        let mut dispatcher = Dispatcher::default();
        let (first, second) = streamed_args();
        let len = (first.len() + second.len()) as u64;
        dispatcher.handle(call(1, Payload::Streamed { len }));
        dispatcher.handle(chunk(1, &first));
        assert!(matches!(
            dispatcher.handle(Frame::Message(Message::Cancel { id: 1 })),
            Action::Cancel { id: 1 }
        ));
        // The rest arrives after the cancel (it was queued before it): no call.
        assert!(matches!(
            dispatcher.handle(chunk(1, &second)),
            Action::Nothing
        ));
        assert!(dispatcher.awaiting_payload.is_empty());
    }

    #[test]
    fn a_cancel_after_the_call_started_reaches_the_running_call() {
        let mut dispatcher = Dispatcher::default();
        dispatcher.handle(call(5, Payload::Inline(vec![])));
        assert!(matches!(
            dispatcher.handle(Frame::Message(Message::Cancel { id: 5 })),
            Action::Cancel { id: 5 }
        ));
    }

    #[test]
    fn bytes_beyond_an_announced_payload_are_a_violation() {
        let mut dispatcher = Dispatcher::default();
        let (first, _) = streamed_args();
        dispatcher.handle(call(
            1,
            Payload::Streamed {
                len: first.len() as u64 + 1,
            },
        ));
        dispatcher.handle(chunk(1, &first));
        assert!(matches!(
            dispatcher.handle(chunk(1, b"too much")),
            Action::Violation(message) if message.contains("announced")
        ));
    }

    #[test]
    fn a_payload_claim_over_the_limit_is_a_violation() {
        let mut dispatcher = Dispatcher::default();
        assert!(matches!(
            dispatcher.handle(call(1, Payload::Streamed { len: u64::MAX })),
            Action::Violation(_)
        ));
        assert!(dispatcher.awaiting_payload.is_empty());
    }

    #[test]
    fn put_chunks_go_to_the_put_and_a_put_failing_halfway_ends_cleanly() {
        let mut dispatcher = Dispatcher::default();
        assert!(matches!(
            dispatcher.handle(put(9, 6)),
            Action::StartPut { id: 9, request } if request.size == 6
        ));
        assert!(matches!(
            dispatcher.handle(chunk(9, b"abc")),
            Action::PutChunk { id: 9, data } if data.as_ref() == b"abc"
        ));
        // The writer failed (a full disk, say) and replied; the controller
        // cancels, and what it had already queued arrives after the cancel.
        assert!(matches!(
            dispatcher.handle(Frame::Message(Message::Cancel { id: 9 })),
            Action::Cancel { id: 9 }
        ));
        assert!(matches!(
            dispatcher.handle(chunk(9, b"def")),
            Action::Nothing
        ));
        assert!(matches!(
            dispatcher.handle(Frame::Message(Message::PutEnd {
                id: 9,
                checksum: vec![0; 32]
            })),
            Action::Nothing
        ));
    }

    #[test]
    fn a_finished_put_takes_no_more_chunks_as_its_own() {
        let mut dispatcher = Dispatcher::default();
        dispatcher.handle(put(3, 0));
        assert!(matches!(
            dispatcher.handle(Frame::Message(Message::PutEnd {
                id: 3,
                checksum: vec![1; 32]
            })),
            Action::EndPut { id: 3, .. }
        ));
        assert!(matches!(
            dispatcher.handle(chunk(3, b"late")),
            Action::Nothing
        ));
    }

    #[test]
    fn messages_only_an_agent_sends_are_violations() {
        let mut dispatcher = Dispatcher::default();
        let from_an_agent = Frame::Message(Message::FetchHead { id: 1, size: 3 });
        assert!(matches!(
            dispatcher.handle(from_an_agent),
            Action::Violation(message) if message.contains("a FetchHead")
        ));
        assert!(matches!(
            dispatcher.handle(Frame::Message(Message::Heartbeat)),
            Action::Nothing
        ));
        assert!(matches!(
            dispatcher.handle(Frame::Message(Message::Shutdown)),
            Action::Shutdown
        ));
    }

    fn stream(id: u64, data: &[u8]) -> Frame {
        Frame::Stream {
            id,
            data: Bytes::copy_from_slice(data),
        }
    }

    #[test]
    fn input_data_goes_to_announced_inputs_only_until_their_end_or_cancel() {
        let mut dispatcher = Dispatcher::default();
        assert!(matches!(
            dispatcher.handle(stream(1, b"unasked")),
            Action::Violation(message) if message.contains("takes no input")
        ));
        assert!(matches!(
            dispatcher.handle(Frame::Message(Message::Input { id: 2 })),
            Action::OpenInput { id: 2 }
        ));
        assert!(matches!(
            dispatcher.handle(Frame::Message(Message::Input { id: 2 })),
            Action::Violation(message) if message.contains("twice")
        ));
        assert!(matches!(
            dispatcher.handle(stream(2, b"data")),
            Action::InputData { id: 2, data } if &data[..] == b"data"
        ));
        assert!(matches!(
            dispatcher.handle(Frame::Message(Message::InputEnd { id: 2 })),
            Action::EndInput { id: 2 }
        ));
        assert!(matches!(
            dispatcher.handle(stream(2, b"after the end")),
            Action::Violation(_)
        ));
        assert!(matches!(
            dispatcher.handle(Frame::Message(Message::InputEnd { id: 2 })),
            Action::Violation(message) if message.contains("takes none")
        ));
        dispatcher.handle(Frame::Message(Message::Input { id: 3 }));
        assert!(matches!(
            dispatcher.handle(Frame::Message(Message::Cancel { id: 3 })),
            Action::Cancel { id: 3 }
        ));
        assert!(matches!(
            dispatcher.handle(stream(3, b"after a cancel")),
            Action::Violation(_)
        ));
    }

    #[test]
    fn credit_and_trace_levels_are_passed_on() {
        let mut dispatcher = Dispatcher::default();
        assert!(matches!(
            dispatcher.handle(Frame::Message(Message::Credit { id: 4, bytes: 9 })),
            Action::Credit { id: 4, bytes: 9 }
        ));
        assert!(matches!(
            dispatcher.handle(Frame::Message(Message::TraceLevel { level: 3 })),
            Action::TraceLevel { level: 3 }
        ));
        let from_an_agent = Frame::Message(Message::Trace(
            chopsticks_core::__private::trace::TraceEvent {
                level: 1,
                target: "t".into(),
                message: "m".into(),
                fields: String::new(),
                hosts: Vec::new(),
            },
        ));
        assert!(matches!(
            dispatcher.handle(from_an_agent),
            Action::Violation(message) if message.contains("a Trace")
        ));
    }
}
