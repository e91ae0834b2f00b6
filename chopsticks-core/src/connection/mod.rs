//! One live agent process: the task that writes frames and the task that
//! routes replies to waiting calls by id. How it starts (spawn, bootstrap,
//! hello, stderr forwarder, process supervisor) is in [`start`].
//!
//! When the agent's output ends, every pending call fails at once with
//! `Disconnected`, naming the host, how the process ended and its last stderr lines.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::codec::FramedRead;

use crate::error::{Error, Result};
use crate::flow::Allowance;
use crate::heartbeat::{self, InputWatch, SilenceClock};
use crate::protocol::{CallMode, Failure, FunctionRef, Hello, Message, Payload};
use crate::stderr::{StderrSink, StderrTail};
use crate::transport::ExitReport;
use crate::wire::{
    Assemblies, Frame, FrameDecoder, MAX_PAYLOAD_LEN, OutFrame, Outbox, write_frames,
};

mod request;
mod start;

pub(crate) use request::{Answer, CHUNK_LEN, InputSender, Request, RequestSender};
pub(crate) use start::connect;

/// How long a closing connection waits for stderr and the exit status, to explain itself.
const EXPLAIN_WAIT: Duration = Duration::from_millis(300);

type Frames = FramedRead<Box<dyn AsyncRead + Send + Unpin>, FrameDecoder>;

/// What a waiting call receives.
pub(crate) enum Reply {
    Value(Vec<u8>),
    Failed(Failure),
    Closed(ClosureRef),
}

/// Why a connection ended, shared by every request it failed.
#[derive(Debug, Clone)]
pub(crate) struct ClosureRef(Arc<Closure>);

/// Why a connection ended.
#[derive(Debug)]
struct Closure {
    protocol_violation: bool,
    reason: String,
    stderr_tail: Vec<String>,
}

impl Closure {
    fn to_error(&self, host: &str) -> Error {
        if self.protocol_violation {
            Error::Protocol {
                host: host.to_string(),
                message: self.reason.clone(),
            }
        } else {
            Error::Disconnected {
                host: host.to_string(),
                reason: self.reason.clone(),
                stderr_tail: self.stderr_tail.clone(),
            }
        }
    }
}

/// How the agent's process ended, as its supervisor learned it.
#[derive(Debug, Clone)]
pub(crate) enum Ending {
    /// The process ended with this status.
    Exited(ExitReport),
    /// The transport lost the process without learning how it ended (its
    /// connection broke, say); why, as a clause.
    Lost(Arc<str>),
}

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ending::Exited(status) => write!(f, "the agent process {status}"),
            Ending::Lost(why) => f.write_str(why),
        }
    }
}

/// What the reader forwards to a fetch before its final reply.
#[derive(Debug)]
pub(crate) enum StreamEvent {
    /// The agent opened the file; this many bytes follow.
    Head(u64),
    /// The next piece of the file.
    Data(bytes::Bytes),
}

/// How many events may wait for a fetch's writer before the reader waits too.
const STREAM_QUEUE_LEN: usize = 16;

#[derive(Default)]
struct Pending {
    waiters: HashMap<u64, oneshot::Sender<Reply>>,
    /// Fetches, by id: where their head and chunks go. Dropped at their final reply.
    streams: HashMap<u64, tokio::sync::mpsc::Sender<StreamEvent>>,
    /// Streaming calls, by id: where their stream data goes. Dropped at their final reply.
    flows: HashMap<u64, Inflow>,
    /// Calls fed an input stream, by id: the agent's credit goes there. Dropped at their final reply.
    inputs: HashMap<u64, Arc<crate::flow::Outflow>>,
    closed: Option<Arc<Closure>>,
}

/// The receiving end of a streaming call's data, as the reader sees it.
struct Inflow {
    /// Where the data goes; `None` once the call was withdrawn, when its
    /// data is dropped until the agent's end of it.
    data: Option<tokio::sync::mpsc::UnboundedSender<bytes::Bytes>>,
    /// What the agent may still send.
    allowance: Arc<Allowance>,
}

/// State shared by the connection handle, its reader task and its calls.
struct Shared {
    host: Arc<str>,
    pending: Mutex<Pending>,
    /// The agent's last stderr lines, to explain an ending.
    tail: Arc<StderrTail>,
    /// How the process ended, once it has.
    exit: watch::Receiver<Option<Ending>>,
    /// What the reader reports to the heartbeat: waiting, or frames came.
    input: InputWatch,
    /// Dropping or sending on it makes the supervisor kill the agent.
    kill: Mutex<Option<oneshot::Sender<()>>>,
    /// Set by `Tunnel::close`: an ending that follows is the close, not a fault.
    closing: std::sync::atomic::AtomicBool,
    /// Streamed results being reassembled. Apart from `pending` so that
    /// copying a chunk never holds up a call being registered; a withdrawn
    /// call's partial result is dropped here at once.
    assemblies: Mutex<Assemblies>,
}

impl Shared {
    fn new(
        host: Arc<str>,
        tail: Arc<StderrTail>,
        exit: watch::Receiver<Option<Ending>>,
        kill: oneshot::Sender<()>,
    ) -> Shared {
        Shared {
            host,
            pending: Mutex::new(Pending::default()),
            tail,
            exit,
            input: InputWatch::default(),
            kill: Mutex::new(Some(kill)),
            assemblies: Mutex::new(Assemblies::default()),
            closing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn assemblies(&self) -> std::sync::MutexGuard<'_, Assemblies> {
        self.assemblies
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Forgets request `id`: its waiter, its stream and any part of its
    /// result received so far. Returns whether a waiter was still there.
    fn forget(&self, id: u64) -> bool {
        let (was_waiting, input) = {
            let mut pending = self.lock();
            pending.streams.remove(&id);
            if let Some(flow) = pending.flows.get_mut(&id) {
                flow.data = None;
            }
            let input = pending.inputs.remove(&id);
            (pending.waiters.remove(&id).is_some(), input)
        };
        if let Some(input) = input {
            input.cancel();
        }
        // After the waiter is gone: the reader starts an assembly only for a
        // waiting id, and checks under this lock.
        self.assemblies().cancel(id);
        was_waiting
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Makes the supervisor kill the agent's process.
    fn kill_process(&self) {
        let sender = self
            .kill
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        drop(sender);
    }

    fn deliver(&self, id: u64, reply: Reply) {
        self.tail.settle();
        let (waiter, input) = {
            let mut pending = self.lock();
            if !pending.streams.is_empty() {
                pending.streams.remove(&id);
            }
            if !pending.flows.is_empty() {
                pending.flows.remove(&id);
            }
            let input = if pending.inputs.is_empty() {
                None
            } else {
                pending.inputs.remove(&id)
            };
            (pending.waiters.remove(&id), input)
        };
        if let Some(input) = input {
            input.cancel();
        }
        if let Some(waiter) = waiter {
            let _ = waiter.send(reply);
        }
    }

    fn stream(&self, id: u64) -> Option<tokio::sync::mpsc::Sender<StreamEvent>> {
        let pending = self.lock();
        if pending.streams.is_empty() {
            return None;
        }
        pending.streams.get(&id).cloned()
    }

    /// Hands stream data to call `id`; an error when no such stream is
    /// open or the agent had no credit for it.
    fn stream_data(&self, id: u64, data: bytes::Bytes) -> std::result::Result<(), String> {
        let pending = self.lock();
        let Some(flow) = pending.flows.get(&id) else {
            return Err(format!(
                "the agent sent stream data for request {id}, which has no open stream"
            ));
        };
        flow.allowance
            .receive(data.len())
            .map_err(|why| format!("the agent {why} (request {id})"))?;
        if let Some(sender) = &flow.data {
            let _ = sender.send(data);
        }
        Ok(())
    }

    /// Gives the input of call `id` the agent's credit. Credit for an input
    /// that has ended is dropped: it may have crossed the end.
    fn input_credit(&self, id: u64, bytes: u64) -> std::result::Result<(), String> {
        let input = self.lock().inputs.get(&id).cloned();
        match input {
            Some(input) => input
                .grant(bytes)
                .map_err(|why| format!("the agent {why} (request {id})")),
            None => Ok(()),
        }
    }

    fn is_waiting(&self, id: u64) -> bool {
        self.lock().waiters.contains_key(&id)
    }

    /// Marks the connection closed and fails every pending call.
    fn close(&self, closure: Closure) {
        let closure = Arc::new(closure);
        let (waiters, inputs) = {
            let mut pending = self.lock();
            if pending.closed.is_some() {
                return;
            }
            pending.closed = Some(closure.clone());
            pending.streams.clear();
            pending.flows.clear();
            let inputs = std::mem::take(&mut pending.inputs);
            (std::mem::take(&mut pending.waiters), inputs)
        };
        for input in inputs.into_values() {
            input.cancel();
        }
        self.assemblies().clear();
        for (_, waiter) in waiters {
            let _ = waiter.send(Reply::Closed(ClosureRef(closure.clone())));
        }
    }

    /// Waits briefly for the exit status and the last stderr lines, then closes.
    async fn close_explained(&self, what: String) {
        self.tail.wait_closed(EXPLAIN_WAIT).await;
        let mut exit = self.exit.clone();
        let ending = tokio::time::timeout(EXPLAIN_WAIT, exit.wait_for(Option::is_some))
            .await
            .ok()
            .and_then(|ending| ending.ok().and_then(|ending| ending.clone()));
        let reason = match ending {
            Some(ending) => format!("{what}; {ending}"),
            None => what,
        };
        self.close(Closure {
            protocol_violation: false,
            reason,
            stderr_tail: self.tail.snapshot(),
        });
    }
}

/// Options a connection is made with.
#[derive(Clone)]
pub(crate) struct ConnectOptions {
    pub(crate) stderr_sink: StderrSink,
    /// How long either end may hear nothing from the other (already clamped).
    pub(crate) heartbeat_timeout: Duration,
    /// Whether the shell bootstrap ships the loader and libraries with the
    /// program; `None`: alone until that fails (see `bundle_learned`).
    pub(crate) bundle_libraries: Option<bool>,
    /// Set once a program that went alone could not start on the target:
    /// later connects of the tunnel bring the bundle at once.
    pub(crate) bundle_learned: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Other builds of this program, by the platform (`uname -sm`) they serve.
    pub(crate) programs: Vec<(String, std::path::PathBuf)>,
}

impl ConnectOptions {
    /// The build named for `platform`, if any.
    pub(crate) fn program_for(&self, platform: &str) -> Option<std::path::PathBuf> {
        self.programs
            .iter()
            .find(|(serves, _)| serves == platform)
            .map(|(_, program)| program.clone())
    }
}

/// A live agent process.
pub(crate) struct Connection {
    shared: Arc<Shared>,
    outbox: Outbox,
    next_id: AtomicU64,
    hello: Hello,
    /// The agent is another build of this program: calls go by name.
    foreign: bool,
    reader: JoinHandle<()>,
    /// Writes queued frames to the agent's stdin, which it closes when it
    /// ends; a kill aborts it and closes the stdin even while a write is
    /// blocked (for an exec, closing stdin is how the agent ends).
    writer: JoinHandle<()>,
    /// Sends heartbeats and gives up on an agent that went silent.
    heartbeat: JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.kill("the tunnel was closed");
    }
}

impl Connection {
    /// Starts the writer and reader tasks of an agent that has said hello.
    fn start(
        shared: Arc<Shared>,
        frames: Frames,
        stdin: Box<dyn AsyncWrite + Send + Unpin>,
        hello: Hello,
        heartbeat_timeout: Duration,
        foreign: bool,
    ) -> Connection {
        let (outbox, outbox_receiver, mut sink) = Outbox::with_direct_writes(stdin);
        let writer_shared = shared.clone();
        let writer = tokio::spawn(async move {
            let written = write_frames(outbox_receiver, &mut sink).await;
            sink.close();
            if let Err(error) = written {
                // Calls must not wait for replies to requests that never left.
                writer_shared
                    .close_explained(format!("writing to the agent failed: {error}"))
                    .await;
            }
        });
        // Before any call: the agent forwards the events this process wants.
        let _ = outbox.send(OutFrame::message(&Message::TraceLevel {
            level: crate::trace::wanted_level(),
        }));
        let reader = tokio::spawn(read_replies(frames, shared.clone()));
        let heartbeat = tokio::spawn(heartbeat(shared.clone(), outbox.clone(), heartbeat_timeout));
        Connection {
            shared,
            outbox,
            next_id: AtomicU64::new(1),
            hello,
            foreign,
            reader,
            writer,
            heartbeat,
        }
    }

    /// Whether the agent is still there to take calls.
    pub(crate) fn is_alive(&self) -> bool {
        self.shared.lock().closed.is_none()
    }

    /// The agent's hello.
    pub(crate) fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Runs one call and returns its encoded result.
    pub(crate) async fn call(
        &self,
        function: &FunctionRef,
        mode: CallMode,
        args: Vec<u8>,
    ) -> Result<Vec<u8>> {
        let function = self.callable(function, mode, &args)?;
        let (mut request, alone) = self.request_alone()?;
        // Alone, the call is written at once if the writer is idle; with
        // others in flight it is queued, and queued calls share writes.
        request.send_call(&function, mode, args, alone).await;
        match request.answer().await? {
            Answer::Value(value) => Ok(value),
            Answer::Failed(failure) => {
                Err(Error::remote(&self.shared.host, function.name(), failure))
            }
        }
    }

    /// Starts a streaming call: the request, which ends with the item count
    /// or the failure, the receiver of its stream data, and what
    /// `before_call` made of the request before its call was sent (an input).
    pub(crate) async fn call_stream<T>(
        self: &Arc<Self>,
        function: &FunctionRef,
        mode: CallMode,
        args: Vec<u8>,
        before_call: impl FnOnce(&Request<Arc<Connection>>) -> T,
    ) -> Result<(
        Request<Arc<Connection>>,
        tokio::sync::mpsc::UnboundedReceiver<bytes::Bytes>,
        T,
    )> {
        let function = self.callable(function, mode, &args)?;
        let (mut request, alone) = self.owned_request()?;
        let data = request.flow();
        let before = before_call(&request);
        // Written at once when alone and the writer is idle, as a call is.
        request.send_call(&function, mode, args, alone).await;
        Ok((request, data, before))
    }

    /// The reference to send for `function`: itself, or its registered name
    /// when the agent is another build. Fails for arguments over the limit.
    pub(crate) fn callable<'f>(
        &self,
        function: &'f FunctionRef,
        mode: CallMode,
        args: &[u8],
    ) -> Result<std::borrow::Cow<'f, FunctionRef>> {
        if args.len() as u64 > MAX_PAYLOAD_LEN {
            return Err(Error::Value {
                host: self.shared.host.to_string(),
                function: function.name().to_string(),
                what: crate::error::ValuePart::Arguments,
                action: crate::error::ValueAction::Send,
                message: format!(
                    "{} bytes exceed the limit of {MAX_PAYLOAD_LEN} bytes for one value",
                    args.len()
                ),
            });
        }
        if !self.foreign {
            return Ok(std::borrow::Cow::Borrowed(function));
        }
        // Another build has other offsets: a registered function goes by name.
        crate::named::by_reference(function, mode)
            .map(std::borrow::Cow::Owned)
            .ok_or_else(|| Error::NotRegistered {
                host: self.shared.host.to_string(),
                function: function.name().to_string(),
            })
    }

    /// A new request id with a waiter for its reply, and whether no other
    /// request is waiting; fails if the connection is closed.
    fn register_alone(&self) -> Result<(u64, oneshot::Receiver<Reply>, bool)> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = oneshot::channel();
        let mut pending = self.shared.lock();
        if let Some(closure) = &pending.closed {
            return Err(closure.to_error(&self.shared.host));
        }
        pending.waiters.insert(id, sender);
        Ok((id, receiver, pending.waiters.len() == 1))
    }

    /// Forgets request `id` (waiter and stream) and tells the agent to drop it,
    /// behind any bulk data already queued. Returns whether it was still pending.
    fn withdraw(&self, id: u64) -> bool {
        let was_waiting = self.shared.forget(id);
        if was_waiting {
            let cancel = OutFrame::message(&Message::Cancel { id });
            let outbox = self.outbox.clone();
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    let _ = outbox.send_bulk(cancel).await;
                });
            }
        }
        was_waiting
    }

    /// The error a reply turns into, for request kinds other than calls.
    fn closed_error(&self, closure: &ClosureRef) -> Error {
        closure.0.to_error(&self.shared.host)
    }

    /// The error for a reply that will never come because the connection was dropped.
    fn dropped_error(&self) -> Error {
        Error::Disconnected {
            host: self.shared.host.to_string(),
            reason: "the connection was dropped".into(),
            stderr_tail: Vec::new(),
        }
    }

    /// Kills the agent and fails every pending call and stream now, even
    /// while other handles to this connection (calls in flight) remain.
    pub(crate) fn kill(&self, reason: &str) {
        self.reader.abort();
        self.writer.abort();
        self.heartbeat.abort();
        self.outbox.close_sink();
        self.shared.close(Closure {
            protocol_violation: false,
            reason: reason.into(),
            stderr_tail: Vec::new(),
        });
        self.shared.kill_process();
    }

    /// Asks the agent to exit and waits for it, at most `bound`.
    pub(crate) async fn shutdown(&self, bound: Duration) -> bool {
        self.shared.closing.store(true, Ordering::Relaxed);
        let bound = if self.is_alive() {
            let _ = self.outbox.send(OutFrame::message(&Message::Shutdown));
            bound
        } else {
            // No reader is left to hear a Shutdown: a process that is still
            // there after a moment is not going to end by itself.
            bound.min(EXPLAIN_WAIT)
        };
        let mut exit = self.shared.exit.clone();
        tokio::time::timeout(bound, exit.wait_for(Option::is_some))
            .await
            .is_ok()
    }
}

/// Sends a heartbeat every quarter of `timeout`, and gives the agent up
/// once nothing has come from it for the whole `timeout` while the reader
/// waited: every pending call fails with `Disconnected`, and the process
/// (or the ssh client, say) is killed. Ends with the connection.
async fn heartbeat(shared: Arc<Shared>, outbox: Outbox, timeout: Duration) {
    let beat = OutFrame::message(&Message::Heartbeat);
    let mut ticks = tokio::time::interval(heartbeat::interval(timeout));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut silence = SilenceClock::new(std::time::Instant::now());
    loop {
        ticks.tick().await;
        if outbox.send(beat.clone()).is_err() || shared.lock().closed.is_some() {
            return;
        }
        if silence.tick(&shared.input, std::time::Instant::now()) >= timeout {
            shared.close(Closure {
                protocol_violation: false,
                reason: format!(
                    "nothing came from the agent for {timeout:?}, though each end sends a \
                     heartbeat every {:?}; the host, or the network to it, is down or stalled, \
                     and this end of the connection was stopped",
                    heartbeat::interval(timeout)
                ),
                stderr_tail: shared.tail.snapshot(),
            });
            outbox.close_sink();
            shared.kill_process();
            return;
        }
    }
}

/// Routes replies to waiting calls until the agent's output ends or breaks the protocol.
async fn read_replies(mut frames: Frames, shared: Arc<Shared>) {
    let (violation, what) = loop {
        shared.input.waiting();
        let next = frames.next().await;
        shared.input.received();
        let frame = match next {
            Some(Ok(frame)) => frame,
            Some(Err(error)) if error.kind() == std::io::ErrorKind::InvalidData => {
                break (true, error.to_string());
            }
            Some(Err(error)) => break (false, format!("reading from the agent failed: {error}")),
            None if shared.closing.load(Ordering::Relaxed) => {
                break (
                    false,
                    "the tunnel was closed (Tunnel::close) while this was pending".to_string(),
                );
            }
            None => break (false, "the agent's output ended".to_string()),
        };
        let result = match frame {
            Frame::Message(Message::Return { id, value }) => match value {
                Payload::Inline(value) => {
                    shared.deliver(id, Reply::Value(value));
                    Ok(())
                }
                Payload::Streamed { len } => {
                    let mut assemblies = shared.assemblies();
                    if shared.is_waiting(id) {
                        assemblies.start(id, len)
                    } else {
                        Ok(())
                    }
                }
            },
            Frame::Message(Message::Fail { id, failure }) => {
                shared.deliver(id, Reply::Failed(failure.bounded()));
                Ok(())
            }
            Frame::Message(Message::Heartbeat) => Ok(()),
            Frame::Stream { id, data } => shared.stream_data(id, data),
            Frame::Message(Message::Credit { id, bytes }) => shared.input_credit(id, bytes),
            Frame::Message(Message::Trace(event)) => {
                crate::trace::emit(&shared.host, event);
                Ok(())
            }
            Frame::Message(Message::FetchHead { id, size }) => {
                if let Some(stream) = shared.stream(id) {
                    let _ = stream.send(StreamEvent::Head(size)).await;
                }
                Ok(())
            }
            Frame::Chunk { id, data } => match shared.stream(id) {
                // A writer that stopped early drops its receiver; the rest is discarded.
                Some(stream) => {
                    let _ = stream.send(StreamEvent::Data(data)).await;
                    Ok(())
                }
                None => {
                    let added = shared.assemblies().add(id, &data);
                    added.map(|complete| {
                        if let Some(value) = complete {
                            shared.deliver(id, Reply::Value(value));
                        }
                    })
                }
            },
            Frame::Message(other) => Err(format!(
                "the agent sent {}, which only a controller may send",
                other.kind()
            )),
        };
        if let Err(message) = result {
            break (true, message);
        }
    };
    if violation {
        // Nothing the agent says next can be trusted, and nothing explains a
        // violation better than the violation itself: fail every call now and
        // stop the process.
        shared.close(Closure {
            protocol_violation: true,
            reason: what,
            stderr_tail: shared.tail.snapshot(),
        });
        shared.kill_process();
    } else {
        shared.close_explained(what).await;
    }
}
