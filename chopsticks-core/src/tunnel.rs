//! [`Tunnel`]: a cheap, cloneable handle to one agent on one target.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::connection::{self, ConnectOptions, Connection};
use crate::error::{Error, Phase, Result, ValueAction, ValuePart};
use crate::protocol::{CallMode, FunctionRef, decode_value, encode_value};
use crate::remote::{AsyncRemoteFn, RemoteFn, async_function_ref, function_ref};
use crate::stderr::{self, StderrSink};
use crate::stream::CallStream;
use crate::transfer::{Fetch, Put, PutSource};
use crate::transport::Transport;

/// The default bound on starting an agent and receiving its hello.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// The default bound on waiting for the agent to exit on [`Tunnel::close`].
pub const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A handle to an agent on one target. Cheap to clone; clones share the agent.
///
/// The agent starts on first use ([`connect`](Self::connect) or the first
/// call). If it dies or is closed, the next call starts a new one. When the
/// last clone is dropped, the agent is stopped.
///
/// The first connect in a process raises its soft limit on open descriptors
/// (`RLIMIT_NOFILE`) to the hard limit: each local tunnel holds four.
#[derive(Clone)]
pub struct Tunnel {
    inner: Arc<TunnelInner>,
}

struct TunnelInner {
    host: String,
    transport: Box<dyn Transport>,
    connect_timeout: Duration,
    call_timeout: Option<Duration>,
    options: ConnectOptions,
    current: Mutex<Option<Arc<Connection>>>,
    connecting: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Tunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tunnel")
            .field("host", &self.inner.host)
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

/// Configures a [`Tunnel`] before it is built.
pub struct TunnelBuilder {
    transport: Box<dyn Transport>,
    connect_timeout: Duration,
    call_timeout: Option<Duration>,
    heartbeat_timeout: Duration,
    stderr_sink: StderrSink,
    bundle_libraries: Option<bool>,
    programs: Vec<(String, std::path::PathBuf)>,
}

impl TunnelBuilder {
    /// Bounds starting the agent and receiving its hello (default 30 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Bounds every call that does not set its own timeout (default: unbounded).
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.call_timeout = Some(timeout);
        self
    }

    /// How long either end of the tunnel waits without hearing from the
    /// other before it gives up (default 60 s, at least 1 s).
    ///
    /// Each end sends a heartbeat every quarter of this while connected, so
    /// an idle tunnel stays up. When the controller is gone without closing
    /// anything (a network partition, a frozen machine), the agent exits
    /// after this long and drops what it had staged; when the agent is, the
    /// calls in flight fail with [`Error::Disconnected`] and the transport's
    /// process (the `ssh` client, say) is killed. Time spent waiting on this
    /// end's own disk does not count as silence.
    pub fn heartbeat_timeout(mut self, timeout: Duration) -> Self {
        self.heartbeat_timeout = crate::heartbeat::clamp(timeout);
        self
    }

    /// Whether the shell bootstrap ships this program with its dynamic
    /// loader, shared libraries and the C library's name-service modules,
    /// so that it runs on a target without them: another distribution's
    /// older C library, musl or no libc at all, a minimal image. The agent
    /// then runs as `lib/LOADER --library-path lib agent` from a cached
    /// `bundle-ID/` directory, every file checked against its SHA-256
    /// before each start.
    ///
    /// By default the program goes alone, which starts a little faster;
    /// if it dies before it answers (no loader, an older C library), the
    /// connect starts again with the bundle, and this tunnel keeps using
    /// it. `true` always bundles; `false` never does, and an agent that
    /// cannot start says which loader it needs. A statically linked program
    /// always goes alone, and transports that do not use the shell
    /// bootstrap (`Local`, `Docker`) ignore this.
    pub fn bundle_libraries(mut self, bundle: bool) -> Self {
        self.bundle_libraries = Some(bundle);
        self
    }

    /// Names another build of this program as the agent for targets of
    /// `platform`, as `uname -sm` prints it there (`"Linux aarch64"`,
    /// `"Linux x86_64"`): the same crate built for another target (`cargo
    /// build --release --target aarch64-unknown-linux-musl`) or with
    /// another profile. The shell bootstrap sends that file in place of
    /// this program to such targets, and calls go by name: only functions
    /// listed in [`register!`](crate::register) run there, and one whose
    /// argument or result types differ between the builds is refused.
    /// Naming this machine's own platform makes every target of it use the
    /// other build.
    pub fn program_for(
        mut self,
        platform: impl Into<String>,
        program: impl Into<std::path::PathBuf>,
    ) -> Self {
        self.programs.push((platform.into(), program.into()));
        self
    }

    /// Where the agent's stderr lines go (default: this process's stderr, as `[host] line`).
    /// Every line is also emitted as a `tracing` event with target `chopsticks::stderr`.
    pub fn stderr(mut self, sink: StderrSink) -> Self {
        self.stderr_sink = sink;
        self
    }

    /// Builds the tunnel. Nothing starts until the first use.
    pub fn build(self) -> Tunnel {
        Tunnel {
            inner: Arc::new(TunnelInner {
                host: self.transport.host().to_string(),
                transport: self.transport,
                connect_timeout: self.connect_timeout,
                call_timeout: self.call_timeout,
                options: ConnectOptions {
                    stderr_sink: self.stderr_sink,
                    heartbeat_timeout: self.heartbeat_timeout,
                    bundle_libraries: self.bundle_libraries,
                    bundle_learned: Default::default(),
                    programs: self.programs,
                },
                current: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(()),
            }),
        }
    }
}

impl Tunnel {
    /// A tunnel through `transport` with default settings.
    pub fn new(transport: impl Transport) -> Tunnel {
        Tunnel::builder(transport).build()
    }

    /// A builder for a tunnel through `transport`.
    pub fn builder(transport: impl Transport) -> TunnelBuilder {
        TunnelBuilder {
            transport: Box::new(transport),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            call_timeout: None,
            heartbeat_timeout: crate::heartbeat::DEFAULT_HEARTBEAT_TIMEOUT,
            bundle_libraries: None,
            programs: Vec::new(),
            stderr_sink: stderr::print_to_stderr(),
        }
    }

    /// The target's name, as the transport gives it.
    pub fn host(&self) -> &str {
        &self.inner.host
    }

    /// Where this tunnel's agent stderr lines go ([`TunnelBuilder::stderr`]),
    /// for helpers that print on the host's behalf the same way.
    pub fn stderr_sink(&self) -> &StderrSink {
        &self.inner.options.stderr_sink
    }

    /// Whether an agent is running for this tunnel now.
    pub fn is_connected(&self) -> bool {
        self.current_connection().is_some()
    }

    /// The agent's process id on its machine, when connected.
    pub fn agent_pid(&self) -> Option<u32> {
        self.current_connection()
            .map(|connection| connection.hello().pid)
    }

    /// Starts the agent now instead of on the first call.
    pub async fn connect(&self) -> Result<()> {
        self.connection().await.map(drop)
    }

    /// Stops the agent: asks it to exit, waits up to 5 s, then kills it.
    /// Calls still in flight then fail with [`Error::Disconnected`]. The next
    /// call starts a new agent.
    pub async fn close(&self) -> Result<()> {
        let _serialized = self.inner.connecting.lock().await;
        let connection = self.lock_current().take();
        if let Some(connection) = connection
            && !connection.shutdown(DEFAULT_CLOSE_TIMEOUT).await
        {
            tracing::warn!(host = %self.inner.host, "the agent did not exit within the close timeout; killing it");
            connection.kill(
                "the tunnel was closed and the agent, which did not exit in time, was killed",
            );
        }
        Ok(())
    }

    /// Calls the blocking function `function` with the argument tuple `args` on the agent.
    ///
    /// `function` must capture nothing (a `fn` item or a closure without
    /// captures). This is checked when the program is built: by `cargo
    /// build` and `cargo test`, not by `cargo check`, which stable Rust does
    /// not let a library reach. A capturing closure fails the build with one
    /// error (E0080, "chopsticks can only call functions that capture
    /// nothing") whose note "the above error was encountered while
    /// instantiating" points at your call. The returned [`Call`] can take a
    /// [`timeout`](Call::timeout) before it is awaited.
    ///
    /// A function that returns `Result<T, E>` gives `Ok(Err(e))` when it ran
    /// and failed; the outer `Err` is chopsticks' own ([`Error`]). Returning
    /// [`RemoteError`](crate::RemoteError) lets it use `?` on any error.
    pub fn call<F, Args>(&self, function: F, args: Args) -> Call<'_, F::Output>
    where
        F: RemoteFn<Args>,
        Args: Serialize + DeserializeOwned,
        F::Output: Serialize + DeserializeOwned,
    {
        let () = crate::remote::CapturesNothing::<F>::CHECK;
        let function_ref = function_ref(function);
        Call::new(self, function_ref, CallMode::Blocking, encode_value(&args))
    }

    /// Calls the `async` function `function` with `args`; it runs as a task on the agent's runtime.
    pub fn call_async<F, Args>(&self, function: F, args: Args) -> Call<'_, F::Output>
    where
        F: AsyncRemoteFn<Args>,
        Args: Serialize + DeserializeOwned + Send + 'static,
        F::Output: Serialize + DeserializeOwned + 'static,
    {
        let () = crate::remote::CapturesNothing::<F>::CHECK;
        let function_ref = async_function_ref(function);
        Call::new(self, function_ref, CallMode::Async, encode_value(&args))
    }

    /// Calls `function`, a plain function that returns an iterator, and
    /// streams its items back as they are produced.
    ///
    /// The function runs on the agent's blocking pool; each item is sent
    /// as soon as the iterator yields it, and the returned [`CallStream`]
    /// yields it on this side. Polling the stream slowly holds the
    /// iterator back; dropping it stops the iterator, which is not advanced
    /// again. `function` must capture nothing, as for [`call`](Self::call).
    ///
    /// ```no_run
    /// # async fn demo(tun: &chopsticks_core::Tunnel) -> chopsticks_core::Result<()> {
    /// use futures_util::StreamExt;
    ///
    /// fn lines(path: String) -> impl Iterator<Item = String> {
    ///     use std::io::BufRead;
    ///     let file = std::fs::File::open(path).expect("readable");
    ///     std::io::BufReader::new(file).lines().map_while(Result::ok)
    /// }
    ///
    /// let mut lines = tun.call_stream(lines, ("/var/log/syslog".to_string(),));
    /// while let Some(line) = lines.next().await {
    ///     println!("{}", line?);
    /// }
    /// # Ok(())
    /// # }
    /// ```
    pub fn call_stream<F, Args>(
        &self,
        function: F,
        args: Args,
    ) -> CallStream<'_, <F::Output as IntoIterator>::Item>
    where
        F: RemoteFn<Args>,
        Args: Serialize + DeserializeOwned,
        F::Output: IntoIterator,
        <F::Output as IntoIterator>::Item: Serialize + DeserializeOwned + Send + 'static,
    {
        let () = crate::remote::CapturesNothing::<F>::CHECK;
        let _ = function;
        let function_ref = crate::remote::stream_function_ref_of::<F, Args>();
        CallStream::new(
            self,
            function_ref,
            CallMode::BlockingStream,
            encode_value(&args),
        )
    }

    /// Calls `function`, a plain function that returns an iterator of byte
    /// pieces (`Vec<u8>`, `Bytes`, `String`: anything `Into<Bytes>`), and
    /// streams them back as raw bytes, never encoded: a process's output,
    /// a file. The returned stream yields the bytes in pieces as they
    /// arrive (not necessarily the pieces the function made). Otherwise as
    /// [`call_stream`](Self::call_stream).
    pub fn call_byte_stream<F, Args>(&self, function: F, args: Args) -> CallStream<'_, bytes::Bytes>
    where
        F: RemoteFn<Args>,
        Args: Serialize + DeserializeOwned,
        F::Output: IntoIterator,
        <F::Output as IntoIterator>::Item: Into<bytes::Bytes>,
    {
        let () = crate::remote::CapturesNothing::<F>::CHECK;
        let _ = function;
        let function_ref = crate::remote::byte_stream_function_ref_of::<F, Args>();
        CallStream::bytes(self, function_ref, encode_value(&args))
    }

    /// Calls `function`, a plain function that returns a
    /// [`Stream`](futures_util::Stream), and streams its items back as they
    /// are produced. The stream is polled as a task on the agent's runtime;
    /// dropping the returned [`CallStream`] aborts it. Otherwise as
    /// [`call_stream`](Self::call_stream).
    pub fn call_stream_async<F, Args>(
        &self,
        function: F,
        args: Args,
    ) -> CallStream<'_, <F::Output as futures_util::Stream>::Item>
    where
        F: RemoteFn<Args>,
        Args: Serialize + DeserializeOwned + Send + 'static,
        F::Output: futures_util::Stream + Send + 'static,
        <F::Output as futures_util::Stream>::Item: Serialize + DeserializeOwned + Send + 'static,
    {
        let () = crate::remote::CapturesNothing::<F>::CHECK;
        let _ = function;
        let function_ref = crate::remote::async_stream_function_ref_of::<F, Args>();
        CallStream::new(
            self,
            function_ref,
            CallMode::AsyncStream,
            encode_value(&args),
        )
    }

    /// Calls the blocking function `function`, whose first argument is a
    /// [`Receiver`](crate::Receiver) (items) or a
    /// [`ByteReceiver`](crate::ByteReceiver) (raw bytes), with the other
    /// arguments `args`, and feeds it `input` while it runs.
    ///
    /// The function sees the items as they come; the input is read only as
    /// fast as the function takes it (the receiver's window), and ends
    /// when `input` ends. When the function returns, the feeding stops.
    /// Dropping the returned future cancels the call and drops `input`.
    ///
    /// ```no_run
    /// # async fn demo(tun: &chopsticks_core::Tunnel) -> chopsticks_core::Result<()> {
    /// use chopsticks_core::Receiver;
    ///
    /// fn count_matching(lines: Receiver<String>, needle: String) -> usize {
    ///     lines.filter(|line| line.contains(&needle)).count()
    /// }
    ///
    /// let lines = futures_util::stream::iter(["a error", "fine", "an error"].map(String::from));
    /// let count = tun
    ///     .call_with_input(count_matching, ("error".to_string(),), lines)
    ///     .await?;
    /// assert_eq!(count, 2);
    /// # Ok(())
    /// # }
    /// ```
    pub fn call_with_input<'t, F, Args, I, S>(
        &'t self,
        function: F,
        args: Args,
        input: S,
    ) -> impl Future<Output = Result<F::Output>> + Send + 't
    where
        I: crate::InputEnd + 'static,
        Args: crate::WithInput<I>,
        Args::Whole: Serialize + DeserializeOwned,
        F: RemoteFn<Args::Whole>,
        F::Output: Serialize + DeserializeOwned + Send + 'static,
        S: futures_util::Stream<Item = I::Item> + Send + 't,
        I::Item: Send,
    {
        let () = crate::remote::CapturesNothing::<F>::CHECK;
        let function_ref = function_ref(function);
        let args = encode_value(&args.with_input(I::placeholder()));
        crate::feed::call_with_input::<F::Output, I, S>(
            self,
            function_ref,
            CallMode::Blocking,
            args,
            input,
        )
    }

    /// Calls `function`, whose first argument is a
    /// [`Receiver`](crate::Receiver) or [`ByteReceiver`](crate::ByteReceiver)
    /// and which returns an iterator, feeding it `input` and streaming its
    /// items back: a filter, both ends flow-controlled. Otherwise as
    /// [`call_with_input`](Self::call_with_input) and
    /// [`call_stream`](Self::call_stream).
    ///
    /// ```no_run
    /// # async fn demo(tun: &chopsticks_core::Tunnel) -> chopsticks_core::Result<()> {
    /// use chopsticks_core::Receiver;
    /// use futures_util::StreamExt;
    ///
    /// fn shout(lines: Receiver<String>) -> impl Iterator<Item = String> {
    ///     lines.map(|line| line.to_uppercase())
    /// }
    ///
    /// let lines = futures_util::stream::iter(["a", "b"].map(String::from));
    /// let loud: Vec<String> = tun
    ///     .call_stream_with_input(shout, (), lines)
    ///     .map(|line| line.expect("a line"))
    ///     .collect()
    ///     .await;
    /// assert_eq!(loud, ["A", "B"]);
    /// # Ok(())
    /// # }
    /// ```
    pub fn call_stream_with_input<'t, F, Args, I, S>(
        &'t self,
        function: F,
        args: Args,
        input: S,
    ) -> CallStream<'t, <F::Output as IntoIterator>::Item>
    where
        I: crate::InputEnd + 'static,
        Args: crate::WithInput<I>,
        Args::Whole: Serialize + DeserializeOwned,
        F: RemoteFn<Args::Whole>,
        F::Output: IntoIterator,
        <F::Output as IntoIterator>::Item: Serialize + DeserializeOwned + Send + 'static,
        S: futures_util::Stream<Item = I::Item> + Send + 't,
        I::Item: Send,
    {
        let () = crate::remote::CapturesNothing::<F>::CHECK;
        let _ = function;
        let function_ref = crate::remote::stream_function_ref_of::<F, Args::Whole>();
        let args = encode_value(&args.with_input(I::placeholder()));
        CallStream::with_input::<I, S>(self, function_ref, args, input)
    }

    /// Like [`call_with_input`](Self::call_with_input) for an `async` function.
    pub fn call_async_with_input<'t, F, Args, I, S>(
        &'t self,
        function: F,
        args: Args,
        input: S,
    ) -> impl Future<Output = Result<F::Output>> + Send + 't
    where
        I: crate::InputEnd + Send + 'static,
        Args: crate::WithInput<I>,
        Args::Whole: Serialize + DeserializeOwned + Send + 'static,
        F: AsyncRemoteFn<Args::Whole>,
        F::Output: Serialize + DeserializeOwned + Send + 'static,
        S: futures_util::Stream<Item = I::Item> + Send + 't,
        I::Item: Send,
    {
        let () = crate::remote::CapturesNothing::<F>::CHECK;
        let function_ref = async_function_ref(function);
        let args = encode_value(&args.with_input(I::placeholder()));
        crate::feed::call_with_input::<F::Output, I, S>(
            self,
            function_ref,
            CallMode::Async,
            args,
            input,
        )
    }

    /// Copies the local file `local` to `remote` on the host.
    ///
    /// The file is written beside `remote` under a hidden name, verified
    /// (size and BLAKE3), synced and renamed over `remote`, so `remote` is
    /// either untouched or complete. See [`Put`] for options.
    pub fn put(&self, local: impl AsRef<Path>, remote: impl AsRef<Path>) -> Put<'_> {
        let local = PutSource::File(local.as_ref().to_path_buf());
        Put::new(self, local, remote.as_ref())
    }

    /// Writes `contents` (bytes or a string: a rendered configuration, a
    /// key) to `remote` on the host, with the guarantees and options of
    /// [`put`](Self::put). Unless a [`mode`](Put::mode) is given, the file
    /// gets 0666 minus the host's umask, as a newly created file would.
    ///
    pub fn put_bytes(&self, contents: impl Into<Vec<u8>>, remote: impl AsRef<Path>) -> Put<'_> {
        let contents = PutSource::Memory(bytes::Bytes::from(contents.into()));
        Put::new(self, contents, remote.as_ref())
    }

    /// Copies the file `remote` on the host to `local`, with the same
    /// guarantees as [`put`](Self::put). A missing remote file creates
    /// nothing locally.
    pub fn fetch(&self, remote: impl AsRef<Path>, local: impl AsRef<Path>) -> Fetch<'_> {
        Fetch::new(self, remote.as_ref(), local.as_ref())
    }

    fn lock_current(&self) -> std::sync::MutexGuard<'_, Option<Arc<Connection>>> {
        self.inner
            .current
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    fn current_connection(&self) -> Option<Arc<Connection>> {
        self.lock_current()
            .as_ref()
            .filter(|connection| connection.is_alive())
            .cloned()
    }

    pub(crate) async fn connection(&self) -> Result<Arc<Connection>> {
        if let Some(connection) = self.current_connection() {
            return Ok(connection);
        }
        let _serialized = self.inner.connecting.lock().await;
        if let Some(connection) = self.current_connection() {
            return Ok(connection);
        }
        let inner = &self.inner;
        let connecting = connection::connect(&*inner.transport, &inner.options);
        let connection = tokio::time::timeout(inner.connect_timeout, connecting)
            .await
            .map_err(|_| Error::Timeout {
                host: inner.host.clone(),
                phase: Phase::Connect,
                after: inner.connect_timeout,
            })??;
        let connection = Arc::new(connection);
        *self.lock_current() = Some(connection.clone());
        Ok(connection)
    }
}

/// A pending call: a future, which can take a [`timeout`](Self::timeout) before it is first polled.
///
/// Dropping the call before it completes cancels it on the agent: an `async`
/// function is aborted, a blocking one runs on and its result is discarded.
///
/// # Panics
///
/// When polled again after it completed, as the future of an `async fn` does.
#[must_use = "a call does nothing until it is awaited"]
pub struct Call<'t, R> {
    tunnel: &'t Tunnel,
    state: CallState<'t, R>,
}

type BoxedCall<'t, R> = Pin<Box<dyn Future<Output = Result<R>> + Send + 't>>;

enum CallState<'t, R> {
    Ready {
        function: FunctionRef,
        mode: CallMode,
        args: std::result::Result<Vec<u8>, String>,
        timeout: Option<Duration>,
    },
    Running(BoxedCall<'t, R>),
    Finished,
}

impl<R> std::fmt::Debug for Call<'_, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut call = f.debug_struct("Call");
        call.field("host", &self.tunnel.host());
        match &self.state {
            CallState::Ready {
                function, timeout, ..
            } => call
                .field("function", &function.name())
                .field("timeout", timeout),
            CallState::Running(_) => call.field("state", &"running"),
            CallState::Finished => call.field("state", &"finished"),
        };
        call.finish_non_exhaustive()
    }
}

impl<'t, R> Call<'t, R> {
    pub(crate) fn new(
        tunnel: &'t Tunnel,
        function: FunctionRef,
        mode: CallMode,
        args: std::result::Result<Vec<u8>, String>,
    ) -> Self {
        Call {
            tunnel,
            state: CallState::Ready {
                function,
                mode,
                args,
                timeout: tunnel.inner.call_timeout,
            },
        }
    }

    /// Bounds this call (including connecting, if the tunnel is not connected yet).
    /// On expiry the call fails with [`Error::Timeout`] and is cancelled on the agent.
    /// Has no effect once the call has been polled.
    pub fn timeout(mut self, after: Duration) -> Self {
        if let CallState::Ready { timeout, .. } = &mut self.state {
            *timeout = Some(after);
        }
        self
    }
}

async fn run_call<R: DeserializeOwned>(
    tunnel: &Tunnel,
    function: FunctionRef,
    mode: CallMode,
    args: std::result::Result<Vec<u8>, String>,
    timeout: Option<Duration>,
) -> Result<R> {
    let host = tunnel.host();
    let value_error = |what, action, message| Error::Value {
        host: host.to_string(),
        function: function.name().to_string(),
        what,
        action,
        message,
    };
    let args =
        args.map_err(|message| value_error(ValuePart::Arguments, ValueAction::Encode, message))?;
    // A timeout before the agent answered its hello is a connect that did
    // not finish (an unreachable host), not a slow function.
    let connected = std::sync::atomic::AtomicBool::new(false);
    let run = async {
        let connection = tunnel.connection().await?;
        connected.store(true, std::sync::atomic::Ordering::Relaxed);
        connection.call(&function, mode, args).await
    };
    let encoded = match timeout {
        None => run.await?,
        Some(after) => tokio::time::timeout(after, run)
            .await
            .map_err(|_| Error::Timeout {
                host: host.to_string(),
                phase: if connected.load(std::sync::atomic::Ordering::Relaxed) {
                    Phase::Call
                } else {
                    Phase::Connect
                },
                after,
            })??,
    };
    let value = decode_value(&encoded)
        .map_err(|message| value_error(ValuePart::Result, ValueAction::Decode, message));
    crate::buffer::give(encoded);
    value
}

impl<'t, R> Future for Call<'t, R>
where
    R: DeserializeOwned + Send + 't,
{
    type Output = Result<R>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<R>> {
        let this = &mut *self;
        if let CallState::Ready { .. } = this.state {
            let CallState::Ready {
                function,
                mode,
                args,
                timeout,
            } = std::mem::replace(&mut this.state, CallState::Finished)
            else {
                unreachable!("checked just above")
            };
            this.state = CallState::Running(Box::pin(run_call(
                this.tunnel,
                function,
                mode,
                args,
                timeout,
            )));
        }
        let CallState::Running(running) = &mut this.state else {
            // The `Future` contract: like the future of any `async fn`.
            panic!(
                "a Call on {} was polled after it had completed",
                this.tunnel.host()
            );
        };
        let result = std::task::ready!(running.as_mut().poll(cx));
        this.state = CallState::Finished;
        Poll::Ready(result)
    }
}
