//! [`Request`]: one exchange in flight on a connection, the only way calls
//! and transfers talk to it.
//!
//! A request is registered under a fresh id, sends its messages (small ones
//! ahead of bulk data, bulk ones and chunks behind it), may receive a stream
//! of events (a fetch's head and chunks), and ends with one final reply.
//! Dropped before that reply, it withdraws itself: its waiter, stream and
//! any partial result are forgotten, the agent is told to cancel it (behind
//! whatever bulk data of it is already queued, so the agent can drop a
//! partial payload), and its blocking senders stop.

use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::{Connection, Inflow, Reply, STREAM_QUEUE_LEN, StreamEvent};
use crate::error::Result;
use crate::flow::Allowance;
use crate::protocol::{CallMode, Failure, FunctionRef, Message, Payload};
use crate::wire::{OutFrame, Outbox};

pub(crate) use crate::wire::CHUNK_LEN;

/// How a request ended on the agent.
pub(crate) enum Answer {
    /// It succeeded; the encoded value.
    Value(Vec<u8>),
    /// It failed there.
    Failed(Failure),
}

/// One exchange in flight; see the [module](self). It borrows its
/// connection, or holds it (`Request<Arc<Connection>>`) when it lives in a
/// stream the caller keeps.
pub(crate) struct Request<C: Deref<Target = Connection>> {
    connection: C,
    id: u64,
    reply: Option<oneshot::Receiver<Reply>>,
    /// Whether some of it went through the bulk queue, so its cancel must too.
    bulk: bool,
    /// Whether it still waits for its final reply; dropping it then withdraws it.
    armed: bool,
    /// Set when the request ends, for its blocking senders.
    stop: Option<Arc<AtomicBool>>,
}

impl Connection {
    /// A new request, or the error of a closed connection.
    pub(crate) fn request(&self) -> Result<Request<&Connection>> {
        self.request_alone().map(|(request, _alone)| request)
    }

    /// Like [`request`](Self::request), also saying whether no other
    /// request is waiting for a reply (a lone call may be written at once).
    pub(crate) fn request_alone(&self) -> Result<(Request<&Connection>, bool)> {
        let (id, reply, alone) = self.register_alone()?;
        Ok((Request::new(self, id, reply), alone))
    }

    /// A new request that holds its connection, and whether no other
    /// request is waiting for a reply.
    pub(crate) fn owned_request(self: &Arc<Self>) -> Result<(Request<Arc<Connection>>, bool)> {
        let (id, reply, alone) = self.register_alone()?;
        Ok((Request::new(self.clone(), id, reply), alone))
    }
}

impl<C: Deref<Target = Connection>> Request<C> {
    fn new(connection: C, id: u64, reply: oneshot::Receiver<Reply>) -> Self {
        Request {
            connection,
            id,
            reply: Some(reply),
            bulk: false,
            armed: true,
            stop: None,
        }
    }

    /// The request's id, which its messages carry.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Sends a small message ahead of any bulk data. A closed connection is
    /// reported by [`answer`](Self::answer).
    pub(crate) fn send(&self, message: &Message) {
        let _ = self.connection.outbox.send(OutFrame::message(message));
    }

    /// Sends a message behind the bulk data already queued, waiting while
    /// that queue is full.
    pub(crate) async fn send_bulk(&mut self, message: &Message) {
        self.bulk = true;
        let _ = self
            .connection
            .outbox
            .send_bulk(OutFrame::message(message))
            .await;
    }

    /// Sends the message `message` makes of `data`: inline when small (and
    /// written at once when `write_now` and the writer is idle), otherwise
    /// announced and streamed in chunks through the bulk queue.
    pub(crate) async fn send_payload(
        &mut self,
        data: Vec<u8>,
        message: impl FnOnce(Payload) -> Message,
        write_now: bool,
    ) {
        self.bulk = data.len() > crate::wire::INLINE_LIMIT;
        let _ = self
            .connection
            .outbox
            .send_payload(self.id, data, message, write_now)
            .await;
    }

    /// Sends the call of `function` with the encoded `args` (see
    /// [`send_payload`](Self::send_payload) for `write_now`).
    pub(crate) async fn send_call(
        &mut self,
        function: &FunctionRef,
        mode: CallMode,
        args: Vec<u8>,
        write_now: bool,
    ) {
        let id = self.id;
        self.send_payload(
            args,
            |args| Message::Call {
                id,
                function: function.clone(),
                mode,
                args,
            },
            write_now,
        )
        .await;
    }

    /// The events of this request's stream (a fetch's head and chunks),
    /// until its final reply arrives or the connection closes.
    pub(crate) fn stream(&self) -> mpsc::Receiver<StreamEvent> {
        let (sender, receiver) = mpsc::channel(STREAM_QUEUE_LEN);
        let mut pending = self.connection.shared.lock();
        if pending.closed.is_none() {
            pending.streams.insert(self.id, sender);
        }
        receiver
    }

    /// The data of this request's stream (a streaming call's items), until
    /// its final reply arrives or the connection closes. The agent may send
    /// a [`WINDOW`](crate::flow::WINDOW) of it; [`grant`](Self::grant) lets it send more.
    pub(crate) fn flow(&self) -> mpsc::UnboundedReceiver<Bytes> {
        let (sender, receiver) = mpsc::unbounded_channel();
        let mut pending = self.connection.shared.lock();
        if pending.closed.is_none() {
            pending.flows.insert(
                self.id,
                Inflow {
                    data: Some(sender),
                    allowance: Arc::new(Allowance::default()),
                },
            );
        }
        receiver
    }

    /// Announces that this request's call takes an input stream, which
    /// `flow` sends as the agent's credit allows; returns its sender.
    pub(crate) fn open_input(&self, flow: Arc<crate::flow::Outflow>) -> InputSender {
        {
            let mut pending = self.connection.shared.lock();
            if pending.closed.is_none() {
                pending.inputs.insert(self.id, flow);
            }
        }
        self.send(&Message::Input { id: self.id });
        InputSender {
            id: self.id,
            outbox: self.connection.outbox.clone(),
        }
    }

    /// Lets the agent send `bytes` more of this request's stream.
    pub(crate) fn grant(&self, bytes: u64) {
        let allowance = {
            let pending = self.connection.shared.lock();
            pending
                .flows
                .get(&self.id)
                .map(|flow| flow.allowance.clone())
        };
        if let Some(allowance) = allowance {
            // Before the credit leaves: the reader never sees data it did not allow.
            allowance.grant(bytes);
            self.send(&Message::Credit { id: self.id, bytes });
        }
    }

    /// The connection's host, for errors.
    pub(crate) fn host(&self) -> &str {
        &self.connection.shared.host
    }

    /// A sender for a blocking thread, which stops when the request ends.
    pub(crate) fn sender(&mut self) -> RequestSender {
        self.bulk = true;
        let stop = self
            .stop
            .get_or_insert_with(|| Arc::new(AtomicBool::new(false)))
            .clone();
        RequestSender {
            id: self.id,
            outbox: self.connection.outbox.clone(),
            stop,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    /// Waits for the final reply. A closed or dropped connection is an
    /// error naming the host and why; once a reply has come, dropping the
    /// request withdraws nothing. Cancel-safe: a wait given up (in a
    /// `select!`) can be taken up again.
    pub(crate) async fn answer(&mut self) -> Result<Answer> {
        let reply = match self.reply.as_mut() {
            Some(reply) => reply.await,
            None => return Err(self.connection.dropped_error()),
        };
        self.reply = None;
        self.armed = false;
        self.stop_senders();
        match reply {
            Ok(Reply::Value(value)) => Ok(Answer::Value(value)),
            Ok(Reply::Failed(failure)) => Ok(Answer::Failed(failure)),
            Ok(Reply::Closed(closure)) => Err(self.connection.closed_error(&closure)),
            Err(_) => Err(self.connection.dropped_error()),
        }
    }

    fn stop_senders(&self) {
        if let Some(stop) = &self.stop {
            stop.store(true, Ordering::Relaxed);
        }
    }
}

impl<C: Deref<Target = Connection>> Drop for Request<C> {
    fn drop(&mut self) {
        self.stop_senders();
        if !self.armed {
            return;
        }
        if self.bulk {
            // Behind the data already queued, so the agent can drop a partial payload.
            self.connection.withdraw(self.id);
        } else if self.connection.shared.forget(self.id) {
            let _ = self
                .connection
                .outbox
                .send(OutFrame::message(&Message::Cancel { id: self.id }));
        }
    }
}

/// Sends a request's bulk data from a blocking thread (a put's reader).
/// Every send gives up once the request has ended or the connection closed.
pub(crate) struct RequestSender {
    id: u64,
    outbox: Outbox,
    stop: Arc<AtomicBool>,
    runtime: tokio::runtime::Handle,
}

/// The request ended or the connection closed; nothing more can be sent.
#[derive(Debug)]
pub(crate) struct Stopped;

impl RequestSender {
    /// Queues one chunk of the request's data, at most [`CHUNK_LEN`] bytes.
    pub(crate) fn chunk(&self, data: Bytes) -> std::result::Result<(), Stopped> {
        self.queue(OutFrame::chunk(self.id, data))
    }

    /// Queues a message behind the chunks.
    pub(crate) fn message(&self, message: &Message) -> std::result::Result<(), Stopped> {
        self.queue(OutFrame::message(message))
    }

    /// The request's id.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Whether the request has ended.
    pub(crate) fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn queue(&self, frame: OutFrame) -> std::result::Result<(), Stopped> {
        if self.stopped() {
            return Err(Stopped);
        }
        self.outbox
            .send_bulk_blocking_unless(frame, &self.stop, &self.runtime)
            .map_err(|_| Stopped)
    }
}

/// Sends a call's input stream, behind its `Call`.
pub(crate) struct InputSender {
    id: u64,
    outbox: Outbox,
}

impl InputSender {
    /// Queues the next bytes of the input, at most a stream frame's worth.
    pub(crate) fn data(&self, data: Bytes) {
        let _ = self.outbox.send(OutFrame::stream(self.id, data));
    }

    /// Queues the input's end.
    pub(crate) fn end(&self) {
        let _ = self
            .outbox
            .send(OutFrame::message(&Message::InputEnd { id: self.id }));
    }
}
