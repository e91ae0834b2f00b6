//! Serving: say hello, then read and run calls until the controller goes away.
//!
//! One `CallPool` thread at a time holds the reader role ([`lead`]): it reads
//! frames, reassembles streamed payloads, handles cancels, and dispatches
//! calls. Blocking functions run on the pool (the last one read runs on the
//! reader itself), `async` functions as tasks on their own runtime, so calls
//! overlap. Running calls are kept by id, so a `Cancel` aborts an async
//! function and discards the result of a blocking one. A panic becomes a
//! `Fail` reply and the agent keeps serving. The agent exits when its input
//! ends, on `Shutdown`, on a protocol violation, or when nothing has come
//! from the controller for the heartbeat timeout, without waiting for
//! blocking calls still running; unfinished puts drop their staged data
//! first. Exit codes: 0 for an end of input or `Shutdown`, 2 for broken
//! input, 3 for a silent controller, 70 when the reader panicked, 71 when
//! the agent could not start.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chopsticks_core::__private::flow::{End, Out, Outflow, WINDOW};
use chopsticks_core::__private::heartbeat::{self, SilenceClock};
use chopsticks_core::__private::identity::{binary_id, uname};
use chopsticks_core::__private::input::{InputQueue, provide, providing};
use chopsticks_core::__private::protocol::{
    CallMode, Failure, FailureKind, FunctionRef, Hello, Message, PROTOCOL_VERSION, Payload,
    PutRequest, encode_value,
};
use chopsticks_core::__private::remote::{CallOutcome, OutcomeFuture, Resolved, resolve};
use chopsticks_core::__private::trace::Forwarder;
use chopsticks_core::__private::wire::{
    Frame, INLINE_LIMIT, MAX_PAYLOAD_LEN, OutFrame, Outbox, write_frames,
};
use futures_util::FutureExt;
use tokio::task::AbortHandle;

use crate::AgentError;
use crate::dispatch::{Action, Dispatcher};
use crate::fds;
use crate::files::IncomingPut;
use crate::pool::CallPool;
use crate::reader::{INPUT, Reader};
use crate::watchdog::Watchdog;

/// A call in progress, by id, so that a `Cancel` can reach it.
enum RunningCall {
    /// An async call, or the stream of any call's large result: aborted on cancel.
    Task(AbortHandle),
    /// A blocking call: runs on, but its result is discarded.
    Blocking(Arc<AtomicBool>),
    /// A streaming call: its producer is stopped (and its task aborted, if async).
    Stream(Arc<Outflow>, Option<AbortHandle>),
}

type Running = Arc<Mutex<HashMap<u64, RunningCall>>>;

fn lock(running: &Running) -> std::sync::MutexGuard<'_, HashMap<u64, RunningCall>> {
    running.lock().unwrap_or_else(|poison| poison.into_inner())
}

/// What every call needs: where to send its reply and how to register for cancellation.
struct Dispatch {
    outbox: Outbox,
    running: Running,
    pool: CallPool,
    /// The runtime that reads and writes the protocol.
    io: tokio::runtime::Handle,
    /// The runtime that runs `async fn`s (and that blocking functions can enter),
    /// so that a function that blocks cannot stall the protocol.
    calls: tokio::runtime::Handle,
    /// Input streams of calls, by id, from their announcement to the call's end.
    inputs: Inputs,
}

type Inputs = Arc<InputQueues>;

/// The input queues by call id, and how many there are, so that a call
/// without input (nearly every call) never takes the lock to look.
#[derive(Default)]
struct InputQueues {
    queues: Mutex<HashMap<u64, Arc<InputQueue>>>,
    open: AtomicU64,
}

fn lock_inputs(inputs: &Inputs) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<InputQueue>>> {
    inputs
        .queues
        .lock()
        .unwrap_or_else(|poison| poison.into_inner())
}

/// Longest panic message or backtrace sent back, so a failure always fits in one frame.
const MAX_FAILURE_TEXT: usize = 32 * 1024;

thread_local! {
    /// The message and backtrace of the last panic in a call on this thread.
    static LAST_PANIC: RefCell<Option<(String, Option<String>)>> = const { RefCell::new(None) };
    /// Whether this thread is running a remote function right now.
    static IN_CALL: Cell<bool> = const { Cell::new(false) };
}

/// Marks the current thread as running a call while `run` executes.
fn in_call<T>(run: impl FnOnce() -> T) -> T {
    IN_CALL.with(|flag| flag.set(true));
    LAST_PANIC.with(|last| last.borrow_mut().take());
    let result = run();
    IN_CALL.with(|flag| flag.set(false));
    result
}

/// A future whose polls count as running a call (for panic capture).
struct InCall<F>(F);

impl<F: std::future::Future + Unpin> std::future::Future for InCall<F> {
    type Output = F::Output;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        in_call(|| std::pin::Pin::new(&mut self.0).poll(cx))
    }
}

/// Runs the agent to completion and returns its exit code.
pub(crate) fn run(
    depth: u32,
    heartbeat_timeout: Duration,
    own_payload: Option<std::path::PathBuf>,
) -> Result<i32, AgentError> {
    let descriptors = fds::take_protocol_fds().map_err(AgentError::Descriptors)?;
    if let Some(own) = own_payload {
        // Housekeeping beside serving, once the descriptors are in place:
        // it never delays the hello.
        let _ = std::thread::Builder::new()
            .name("chopsticks-evict".into())
            .spawn(move || crate::evict::stale_payloads(&own));
    }
    chopsticks_core::__private::agent_env::set_depth(depth);
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if IN_CALL.with(Cell::get) {
            record_panic(info);
        } else {
            previous_hook(info);
        }
    }));
    let calls = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("chopsticks-async")
        .build()
        .map_err(AgentError::Runtime)?;
    let io = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("chopsticks-agent")
        .build()
        .map_err(AgentError::Runtime)?;
    let serving = serve(
        descriptors,
        depth,
        heartbeat_timeout,
        calls.handle().clone(),
    );
    let code = io.block_on(serving)?;
    // Exit without dropping the runtime: it would wait for blocking calls still running.
    std::process::exit(code);
}

fn record_panic(info: &std::panic::PanicHookInfo<'_>) {
    let payload = info.payload();
    let text = payload
        .downcast_ref::<&str>()
        .map(|text| text.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic with a non-string payload".to_string());
    let message = match info.location() {
        Some(location) => format!("{text} at {location}"),
        None => text,
    };
    let backtrace = std::backtrace::Backtrace::capture();
    let backtrace = (backtrace.status() == std::backtrace::BacktraceStatus::Captured)
        .then(|| backtrace.to_string());
    LAST_PANIC.with(|last| *last.borrow_mut() = Some((message, backtrace)));
}

fn panic_failure() -> Failure {
    let (message, backtrace) = LAST_PANIC
        .with(|last| last.borrow_mut().take())
        .unwrap_or_else(|| ("the function panicked".to_string(), None));
    Failure {
        kind: FailureKind::Panic,
        message,
        backtrace,
    }
}

async fn serve(
    descriptors: fds::ProtocolFds,
    depth: u32,
    heartbeat_timeout: Duration,
    calls: tokio::runtime::Handle,
) -> Result<i32, AgentError> {
    let reader = Reader::new(descriptors.input).map_err(AgentError::Descriptors)?;
    let sink = fds::writer(descriptors.output).map_err(AgentError::Descriptors)?;
    // Replies of the pool may be written by their own thread when the writer is idle.
    let (outbox, outbox_receiver, mut writer) = Outbox::with_direct_writes(Box::new(sink));
    tokio::spawn(async move {
        let _ = write_frames(outbox_receiver, &mut writer).await;
    });
    let (os, arch) = uname();
    let hello = Message::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        binary_id: binary_id().to_vec(),
        pid: std::process::id(),
        os,
        arch,
        depth,
    });
    let _ = outbox.send(OutFrame::message(&hello));

    // Pool threads give buffers back outside any runtime; release the spare from here.
    tokio::spawn(release_memory_when_idle());
    let (exit, mut exit_code) = tokio::sync::mpsc::unbounded_channel();
    // The agent's own process never ran the program's main: this is its
    // only subscriber, off until the controller says what it wants.
    let forwarder = Arc::new(Forwarder::new(outbox.clone()));
    let _ = tracing::subscriber::set_global_default(forwarder.clone());
    let agent = Arc::new(Agent {
        dispatch: Dispatch {
            outbox: outbox.clone(),
            running: Running::default(),
            pool: CallPool::default(),
            io: tokio::runtime::Handle::current(),
            calls,
            inputs: Inputs::default(),
        },
        reader: Mutex::new(ReadState {
            reader,
            dispatcher: Dispatcher::default(),
        }),
        puts: Mutex::default(),
        exit,
        forwarder: forwarder.clone(),
    });
    let watchdog = Arc::new(Watchdog::new().map_err(AgentError::Runtime)?);
    let ticks = watchdog.clone();
    let pool = agent.dispatch.pool.clone();
    std::thread::Builder::new()
        .name("chopsticks-watch".into())
        .spawn(move || {
            while ticks.wait().is_ok() {
                pool.tick();
            }
        })
        .map_err(AgentError::Runtime)?;
    tokio::spawn(heartbeat(agent.clone(), heartbeat_timeout));
    let leading = agent.clone();
    agent.dispatch.pool.start_reading(
        move || {
            // Whatever unwinds out of the reader, the agent still ends.
            if std::panic::catch_unwind(AssertUnwindSafe(|| lead(&leading))).is_err() {
                crate::warn(format_args!("the reader failed; exiting"));
                finish(&leading, 70);
            }
        },
        watchdog,
    );

    // The reader role does everything else; this task only learns when to
    // exit, and drops unfinished puts (their staged data) before it does.
    let code = exit_code.recv().await.unwrap_or(0);
    agent.drop_unfinished_puts();
    Ok(code)
}

/// Sends a heartbeat every quarter of `timeout`, and ends the agent once the
/// reader has waited for the whole `timeout` without receiving anything:
/// the controller is gone without closing anything (a network partition, a
/// frozen machine), and the agent must not hold its calls and staged files
/// for ever.
async fn heartbeat(agent: Arc<Agent>, timeout: Duration) {
    let beat = OutFrame::message(&Message::Heartbeat);
    let mut ticks = tokio::time::interval(heartbeat::interval(timeout));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut silence = SilenceClock::new(std::time::Instant::now());
    loop {
        ticks.tick().await;
        let _ = agent.dispatch.outbox.send(beat.clone());
        if silence.tick(&INPUT, std::time::Instant::now()) >= timeout {
            crate::warn(format_args!(
                "nothing came from the controller for {timeout:?}; exiting"
            ));
            return finish(&agent, EXIT_SILENCE);
        }
    }
}

/// The exit code of an agent that gave up on a silent controller.
const EXIT_SILENCE: i32 = 3;

/// Calls finished so far, to tell an idle agent from a busy one.
static CALLS_FINISHED: AtomicU64 = AtomicU64::new(0);

/// Once calls have stopped for [`SPARE_IDLE`](chopsticks_core::__private::buffer::SPARE_IDLE),
/// drops the spare buffer and hands freed heap memory back to the system, so
/// an idle agent stays small whichever threads freed its payloads. Enlarged
/// pipes go back to their size a tick after bulk data stops.
async fn release_memory_when_idle() {
    let idle = chopsticks_core::__private::buffer::SPARE_IDLE;
    let mut tick = tokio::time::interval(idle / 2);
    let mut seen = 0;
    let mut quiet_since = std::time::Instant::now();
    let mut trimmed = true;
    loop {
        tick.tick().await;
        crate::pipe_size::shrink_if_quiet();
        let finished = CALLS_FINISHED.load(Ordering::Relaxed);
        if finished != seen {
            seen = finished;
            quiet_since = std::time::Instant::now();
            trimmed = false;
            continue;
        }
        chopsticks_core::__private::buffer::release_if_idle();
        if !trimmed && quiet_since.elapsed() >= idle {
            trimmed = true;
            #[cfg(target_env = "gnu")]
            // SAFETY: malloc_trim only returns free heap pages to the system.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    }
}

/// Everything the reader, the pool and the serve loop share.
struct Agent {
    dispatch: Dispatch,
    reader: Mutex<ReadState>,
    /// Puts whose data is arriving, by id. Apart from the reader's state, so
    /// that the agent can drop them on its way out while the reader is blocked.
    puts: Mutex<HashMap<u64, IncomingPut>>,
    /// The exit code, once the input has ended, broken or asked for shutdown.
    exit: tokio::sync::mpsc::UnboundedSender<i32>,
    /// Sends the functions' `tracing` events to the controller.
    forwarder: Arc<Forwarder>,
}

/// How long an exiting agent waits for the writers of unfinished puts to
/// drop their staged files.
const STAGED_DROP_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl Agent {
    fn puts(&self) -> std::sync::MutexGuard<'_, HashMap<u64, IncomingPut>> {
        self.puts
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Drops every unfinished put and waits (at most [`STAGED_DROP_WAIT`])
    /// until their writers have removed what they staged. An unnamed
    /// `O_TMPFILE` would vanish with the process anyway; a named staging
    /// file would not.
    fn drop_unfinished_puts(&self) {
        let abandoned: Vec<_> = self.puts().drain().map(|(_, put)| put.abandon()).collect();
        let deadline = std::time::Instant::now() + STAGED_DROP_WAIT;
        for writer in abandoned {
            writer.wait_until(deadline);
        }
    }
}

/// What only the reader touches: the input and the dispatcher's state.
struct ReadState {
    reader: Reader,
    dispatcher: Dispatcher,
}

/// The reader role: runs on a pool thread, reads frames and does what the
/// [`Dispatcher`] says.
///
/// The last blocking call of what has been read runs right here, and its
/// reply goes straight to the pipe, so a lone call costs no thread hand-off
/// at all. The watchdog hands reading to another thread if the call runs
/// across two of its ticks; the reader then returns to the pool. Streamed
/// payloads are reassembled here too, and cancels handled, so bulk data
/// never crosses threads chunk by chunk.
fn lead(agent: &Agent) {
    let pool = &agent.dispatch.pool;
    let mut state = agent
        .reader
        .lock()
        .unwrap_or_else(|poison| poison.into_inner());
    loop {
        let frame = match state.reader.next_frame() {
            Ok(Some(frame)) => frame,
            Ok(None) => return finish(agent, 0),
            Err(error) => {
                crate::warn(format_args!(
                    "the controller's input is unreadable ({error}); exiting"
                ));
                return finish(agent, 2);
            }
        };
        if matches!(frame, Frame::Chunk { .. } | Frame::Stream { .. }) {
            crate::pipe_size::bulk();
        }
        match state.dispatcher.handle(frame) {
            Action::Call {
                id,
                function,
                mode: mode @ (CallMode::Blocking | CallMode::BlockingStream),
                args,
                inline: true,
            } => {
                // An iterator runs here too: its first item leaves at once.
                let job = match mode {
                    CallMode::Blocking => agent.dispatch.prepare_blocking(id, &function, args),
                    _ => agent.dispatch.prepare_stream(id, &function, args),
                };
                let Some(job) = job else {
                    continue;
                };
                if state.reader.more_buffered() {
                    pool.submit(job);
                    continue;
                }
                drop(state);
                let generation = pool.leader_busy();
                job();
                if !pool.leader_done(generation) {
                    return;
                }
                state = agent
                    .reader
                    .lock()
                    .unwrap_or_else(|poison| poison.into_inner());
            }
            Action::Call {
                id,
                function,
                mode,
                args,
                ..
            } => agent.dispatch.start(id, &function, mode, args),
            Action::StartPut { id, request } => agent.start_put(id, request),
            Action::PutChunk { id, data } => {
                // The chunk is handed over without the lock: a writer behind on
                // a slow disk must not hold up the exit path, which needs it.
                let put = agent.puts().get(&id).map(IncomingPut::handle);
                // False when the writer failed and replied; later chunks are ignored.
                if let Some(put) = put
                    && !put.write(data)
                {
                    agent.puts().remove(&id);
                }
            }
            Action::EndPut { id, checksum } => {
                let put = agent.puts().remove(&id);
                if let Some(put) = put {
                    put.end(checksum);
                }
            }
            Action::Fetch { id, path } => agent.start_fetch(id, path),
            Action::Cancel { id } => agent.cancel(id),
            Action::OpenInput { id } => agent.dispatch.open_input(id),
            Action::TraceLevel { level } => agent.forwarder.set_level(level),
            Action::InputData { id, data } => {
                if let Err(message) = agent.dispatch.input_data(id, data) {
                    crate::warn(format_args!("protocol violation: {message}; exiting"));
                    return finish(agent, 2);
                }
            }
            Action::EndInput { id } => agent.dispatch.end_input(id),
            Action::Credit { id, bytes } => {
                if let Err(message) = agent.credit(id, bytes) {
                    crate::warn(format_args!("protocol violation: {message}; exiting"));
                    return finish(agent, 2);
                }
            }
            Action::Shutdown => return finish(agent, 0),
            Action::Nothing => {}
            Action::Violation(message) => {
                crate::warn(format_args!("protocol violation: {message}; exiting"));
                return finish(agent, 2);
            }
        }
    }
}

impl Agent {
    /// Starts receiving a file: its writer runs on the pool, fed by the reader.
    fn start_put(&self, id: u64, request: PutRequest) {
        match IncomingPut::start(request) {
            Ok((put, writer)) => {
                self.puts().insert(id, put);
                let outbox = self.dispatch.outbox.clone();
                self.dispatch.pool.submit(move || {
                    let outcome = writer();
                    CALLS_FINISHED.fetch_add(1, Ordering::Relaxed);
                    if let Some(outcome) = outcome {
                        let _ = outbox.send(reply(id, outcome));
                    }
                });
            }
            Err(failure) => {
                let _ = self.dispatch.outbox.send(reply(id, Err(failure)));
            }
        }
    }

    /// Sends a file from a pool thread; a cancel stops it.
    fn start_fetch(&self, id: u64, path: Vec<u8>) {
        let cancelled = Arc::new(AtomicBool::new(false));
        lock(&self.dispatch.running).insert(id, RunningCall::Blocking(cancelled.clone()));
        let (outbox, running) = (self.dispatch.outbox.clone(), self.dispatch.running.clone());
        self.dispatch.pool.submit(Box::new(move || {
            crate::files::send_file(id, path, &outbox, &cancelled, reply);
            lock(&running).remove(&id);
            CALLS_FINISHED.fetch_add(1, Ordering::Relaxed);
        }));
    }

    /// Stops request `id`: drops its staged put, aborts its task (an async
    /// call or a result's stream), or marks its blocking call or fetch.
    fn cancel(&self, id: u64) {
        self.puts().remove(&id);
        self.dispatch.close_input(id);
        // Out of the lock first: a stream's cancel sends its end, which takes it.
        let running = lock(&self.dispatch.running).remove(&id);
        match running {
            Some(RunningCall::Task(handle)) => handle.abort(),
            Some(RunningCall::Blocking(cancelled)) => cancelled.store(true, Ordering::Relaxed),
            Some(RunningCall::Stream(flow, task)) => {
                flow.cancel();
                if let Some(task) = task {
                    task.abort();
                }
            }
            None => {}
        }
    }

    /// Gives stream `id` more credit. Credit for a stream that has ended
    /// (or never was) is dropped: it may have crossed the stream's end.
    fn credit(&self, id: u64, bytes: u64) -> Result<(), String> {
        // Out of the lock first: credit may send the stream's end, which takes it.
        let flow = match lock(&self.dispatch.running).get(&id) {
            Some(RunningCall::Stream(flow, _)) => flow.clone(),
            _ => return Ok(()),
        };
        flow.grant(bytes)
            .map_err(|why| format!("request {id}: {why}"))
    }
}

/// Ends the agent with `code`: the serve task drops unfinished puts (and
/// their staged data) and exits. The reader role stays taken, so nothing
/// reads any more.
fn finish(agent: &Agent, code: i32) {
    let _ = agent.exit.send(code);
}

impl Dispatch {
    fn start(&self, id: u64, function: &FunctionRef, mode: CallMode, args: Vec<u8>) {
        // SAFETY: this agent's controller checked at hello that it runs this
        // same executable, so its references name entries of this program;
        // `resolve` still refuses any that do not.
        match unsafe { resolve(function, mode) } {
            Ok(Resolved::Blocking(_)) => {
                if let Some(job) = self.prepare_blocking(id, function, args) {
                    self.pool.submit(job);
                }
            }
            Ok(Resolved::Async(trampoline)) => {
                let (outbox, running) = (self.outbox.clone(), self.running.clone());
                // Registered before the task can unregister itself: it takes
                // this lock to do so. It stays registered while its result
                // streams, so that a cancel stops the stream too.
                let mut calls_running = lock(&self.running);
                let (input, inputs) = (self.input_of(id), self.inputs.clone());
                let task = self.calls.spawn(async move {
                    let run: OutcomeFuture = match input {
                        None => trampoline.run(args),
                        input => Box::pin(providing(input, trampoline.run(args))),
                    };
                    let outcome = AssertUnwindSafe(InCall(run))
                        .catch_unwind()
                        .await
                        .unwrap_or_else(|_| Err(panic_failure()));
                    CALLS_FINISHED.fetch_add(1, Ordering::Relaxed);
                    close_input(&inputs, id);
                    send_outcome(&outbox, id, outcome).await;
                    lock(&running).remove(&id);
                });
                calls_running.insert(id, RunningCall::Task(task.abort_handle()));
            }
            Ok(Resolved::BlockingStream(_)) => {
                if let Some(job) = self.prepare_stream(id, function, args) {
                    self.pool.submit(job);
                }
            }
            Ok(Resolved::AsyncStream(trampoline)) => {
                let flow = self.outflow(id);
                let producer = flow.clone();
                // Registered before the task runs, as for async calls; a
                // cancel aborts it, and the cancel sends the stream's end.
                let mut calls_running = lock(&self.running);
                let (input, inputs) = (self.input_of(id), self.inputs.clone());
                let task = self.calls.spawn(async move {
                    let run = providing(input, trampoline.run(args, producer.clone()));
                    let outcome = AssertUnwindSafe(InCall(Box::pin(run))).catch_unwind().await;
                    close_input(&inputs, id);
                    producer.finish(stream_end(outcome));
                });
                calls_running.insert(id, RunningCall::Stream(flow, Some(task.abort_handle())));
            }
            Err(failure) => {
                let _ = self.outbox.send(reply(id, Err(failure)));
            }
        }
    }

    /// The sending half of stream `id`: its frames go out from whichever
    /// thread lets them (the producer's, or the reader's with credit), then
    /// its end: the item count (also after a cancel, so the controller knows
    /// no more comes) or the producer's failure.
    fn outflow(&self, id: u64) -> Arc<Outflow> {
        let (outbox, running) = (self.outbox.clone(), self.running.clone());
        let end = move |outcome: CallOutcome| {
            lock(&running).remove(&id);
            CALLS_FINISHED.fetch_add(1, Ordering::Relaxed);
            let _ = outbox.send_or_write_now(reply(id, outcome));
        };
        let data = self.outbox.clone();
        let flow = Arc::new(Outflow::new(
            WINDOW,
            Box::new(move |out| match out {
                Out::Data(bytes) => {
                    let _ = data.send_or_write_now(OutFrame::stream(id, bytes));
                }
                Out::End(End::Finished, items) | Out::Cancelled(items) => {
                    end(Ok(encode_value(&items).unwrap_or_default()));
                }
                Out::End(End::Failed(failure), _) => end(Err(failure)),
            }),
        ));
        let (flushing, io) = (Arc::downgrade(&flow), self.io.clone());
        flow.flush_when_needed(move || {
            io.spawn(async move {
                if let Some(flow) = flushing.upgrade() {
                    flow.flush().await;
                }
            });
        });
        flow
    }
}

impl Dispatch {
    /// Makes room for call `id`'s input; its credit goes back as the function takes it.
    fn open_input(&self, id: u64) {
        let outbox = self.outbox.clone();
        let queue = InputQueue::new(move |bytes| {
            let _ = outbox.send(OutFrame::message(&Message::Credit { id, bytes }));
        });
        if lock_inputs(&self.inputs).insert(id, queue).is_none() {
            self.inputs.open.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Queues input data; dropped when its call has ended already.
    fn input_data(&self, id: u64, data: bytes::Bytes) -> Result<(), String> {
        let queue = lock_inputs(&self.inputs).get(&id).cloned();
        match queue {
            Some(queue) => queue
                .receive(data)
                .map_err(|why| format!("the controller {why} (request {id})")),
            None => Ok(()),
        }
    }

    /// The controller's input of call `id` is complete.
    fn end_input(&self, id: u64) {
        if let Some(queue) = lock_inputs(&self.inputs).get(&id) {
            queue.end();
        }
    }

    fn close_input(&self, id: u64) {
        close_input(&self.inputs, id);
    }

    /// The input of call `id`, if it takes one.
    fn input_of(&self, id: u64) -> Option<Arc<InputQueue>> {
        if inputs_empty(&self.inputs) {
            return None;
        }
        lock_inputs(&self.inputs).get(&id).cloned()
    }
}

fn inputs_empty(inputs: &Inputs) -> bool {
    inputs.open.load(Ordering::Relaxed) == 0
}

/// Forgets call `id`'s input: the function is done with it, or the call
/// was cancelled; what is queued is dropped.
fn close_input(inputs: &Inputs, id: u64) {
    let removed = lock_inputs(inputs).remove(&id);
    if let Some(queue) = removed {
        inputs.open.fetch_sub(1, Ordering::Relaxed);
        queue.close();
    }
}

/// How a streaming function ended, from its trampoline's outcome.
fn stream_end(outcome: std::thread::Result<Result<(), Failure>>) -> End {
    match outcome {
        Ok(Ok(())) => End::Finished,
        Ok(Err(failure)) => End::Failed(failure),
        Err(_) => End::Failed(panic_failure()),
    }
}

impl Dispatch {
    /// Resolves an iterator-returning call, registers its stream for
    /// cancellation; returns the job that iterates,
    /// or `None` after replying with a failure.
    fn prepare_stream(
        &self,
        id: u64,
        function: &FunctionRef,
        args: Vec<u8>,
    ) -> Option<Box<dyn FnOnce() + Send>> {
        // SAFETY: as in `start`: the controller runs this same executable.
        let trampoline = match unsafe { resolve(function, CallMode::BlockingStream) } {
            Ok(Resolved::BlockingStream(trampoline)) => trampoline,
            Ok(_) => return None,
            Err(failure) => {
                let _ = self.outbox.send(reply(id, Err(failure)));
                return None;
            }
        };
        let flow = self.outflow(id);
        lock(&self.running).insert(id, RunningCall::Stream(flow.clone(), None));
        let calls = self.calls.clone();
        let (input, inputs) = (self.input_of(id), self.inputs.clone());
        Some(Box::new(move || {
            let _runtime = calls.enter();
            let outcome = in_call(|| {
                std::panic::catch_unwind(AssertUnwindSafe(|| {
                    provide(input, || trampoline.run(&args, &flow))
                }))
            });
            close_input(&inputs, id);
            flow.finish(stream_end(outcome));
        }))
    }

    /// Resolves a blocking call and registers it for cancellation; returns the
    /// job that runs it, or `None` after replying with a failure.
    fn prepare_blocking(
        &self,
        id: u64,
        function: &FunctionRef,
        args: Vec<u8>,
    ) -> Option<Box<dyn FnOnce() + Send>> {
        // SAFETY: as in `start`: the controller runs this same executable.
        let trampoline = match unsafe { resolve(function, CallMode::Blocking) } {
            Ok(Resolved::Blocking(trampoline)) => trampoline,
            Ok(_) => return None,
            Err(failure) => {
                let _ = self.outbox.send(reply(id, Err(failure)));
                return None;
            }
        };
        let cancelled = Arc::new(AtomicBool::new(false));
        lock(&self.running).insert(id, RunningCall::Blocking(cancelled.clone()));
        let (outbox, running, io, calls, pool) = (
            self.outbox.clone(),
            self.running.clone(),
            self.io.clone(),
            self.calls.clone(),
            self.pool.clone(),
        );
        let input = self.input_of(id);
        let inputs = input.is_some().then(|| self.inputs.clone());
        Some(Box::new(move || {
            // Blocking functions may use tokio (`Handle::current()`, `block_on`).
            let _runtime = calls.enter();
            let outcome = in_call(|| {
                std::panic::catch_unwind(AssertUnwindSafe(|| {
                    provide(input, || trampoline.run(&args))
                }))
            })
            .unwrap_or_else(|_| Err(panic_failure()));
            if let Some(inputs) = &inputs {
                close_input(inputs, id);
            }
            // The next large payload reuses these pages instead of fresh ones.
            chopsticks_core::__private::buffer::give(args);
            CALLS_FINISHED.fetch_add(1, Ordering::Relaxed);
            let mut calls_running = lock(&running);
            // A cancel sets the flag under this lock.
            if cancelled.load(Ordering::Relaxed) {
                return;
            }
            match outcome {
                Ok(value) if value.len() > INLINE_LIMIT => {
                    // The stream is a task a cancel can abort; it unregisters
                    // itself once sent, after the insert (it needs this lock).
                    let unregister = running.clone();
                    let sending = io.spawn(async move {
                        send_outcome(&outbox, id, Ok(value)).await;
                        lock(&unregister).remove(&id);
                    });
                    calls_running.insert(id, RunningCall::Task(sending.abort_handle()));
                }
                outcome => {
                    calls_running.remove(&id);
                    drop(calls_running);
                    // The last reply of a burst goes straight to the pipe when the
                    // writer is idle (one thread hand-off fewer); replies with more
                    // calls queued behind them are batched by the writer.
                    let frame = reply(id, outcome);
                    let _ = if pool.queue_is_empty() {
                        outbox.send_or_write_now(frame)
                    } else {
                        outbox.send(frame)
                    };
                }
            }
        }))
    }
}

/// Sends a call's outcome: inline, streamed, or a failure if the value is too large to send.
async fn send_outcome(outbox: &Outbox, id: u64, outcome: CallOutcome) {
    let outcome = match outcome {
        Ok(value) if value.len() as u64 > MAX_PAYLOAD_LEN => Err(Failure::new(
            FailureKind::Result,
            format!(
                "its result of {} bytes exceeds the limit of {MAX_PAYLOAD_LEN} bytes for one value",
                value.len()
            ),
        )),
        outcome => outcome,
    };
    let _ = match outcome {
        Ok(value) if value.len() > INLINE_LIMIT => outbox
            .send_payload(id, value, |value| Message::Return { id, value }, false)
            .await
            .map(drop),
        outcome => outbox.send(reply(id, outcome)),
    };
}

/// Cuts `text` to at most `limit` bytes, at a character boundary.
fn bounded(mut text: String, limit: usize) -> String {
    if text.len() > limit {
        let mut end = limit;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
        text.push_str(" [cut]");
    }
    text
}

/// The reply frame for a finished call whose value is small enough to inline.
fn reply(id: u64, outcome: CallOutcome) -> OutFrame {
    OutFrame::message(&match outcome {
        Ok(value) => Message::Return {
            id,
            value: Payload::Inline(value),
        },
        Err(failure) => Message::Fail {
            id,
            failure: Failure {
                message: bounded(failure.message, MAX_FAILURE_TEXT),
                backtrace: failure
                    .backtrace
                    .map(|text| bounded(text, MAX_FAILURE_TEXT)),
                ..failure
            },
        },
    })
}
