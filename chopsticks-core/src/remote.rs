//! Naming plain functions across the pipe.
//!
//! `tun.call(f, (a, b))` works for any `f` that captures nothing: a `fn`
//! item or a non-capturing closure is a zero-sized type, so the *type* is the
//! whole function. For each such type the controller instantiates a
//! trampoline, `blocking_trampoline::<F, Args, R>`, which decodes `Args`,
//! conjures the zero-sized `F`, calls it and encodes `R`, and beside it an
//! *entry*: a constant in read-only data holding a tag, the mode (blocking
//! or async) and the trampoline's address. The call names the entry by its
//! address minus the address of an anchor static. The agent is the same file
//! (the hello proves it by build-id before any call), so adding the offset
//! to its own anchor lands on the same entry.
//!
//! A reference names data, never code. [`resolve`] reads the tag and the
//! mode as plain integers, and only from this program's read-only data,
//! before it calls anything: a forged or corrupted reference (any offset,
//! either mode) fails with `UnknownFunction` and cannot make the agent jump
//! anywhere but to a genuine trampoline of the mode asked for.
//!
//! Offsets are never keys or fingerprints: one entry can exist in several
//! copies, and identical closures may share one. Both are harmless.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use futures_util::{Stream, StreamExt};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::flow::{MAX_ITEM_LEN, Outflow};
use crate::protocol::{CallMode, Failure, FailureKind, FunctionRef, decode_value, encode_value};

/// What a trampoline returns: the encoded result, or why there is none.
pub type CallOutcome = Result<Vec<u8>, Failure>;
/// A boxed future of a [`CallOutcome`].
pub type OutcomeFuture = Pin<Box<dyn Future<Output = CallOutcome> + Send + 'static>>;

/// A boxed future of a streaming function's end.
pub type StreamFuture = Pin<Box<dyn Future<Output = Result<(), Failure>> + Send + 'static>>;

type BlockingTrampoline = fn(&[u8]) -> CallOutcome;
type AsyncTrampoline = fn(Vec<u8>) -> OutcomeFuture;
type BlockingStreamTrampoline = fn(&[u8], &Outflow) -> Result<(), Failure>;
type AsyncStreamTrampoline = fn(Vec<u8>, Arc<Outflow>) -> StreamFuture;

mod sealed {
    /// Only the blanket implementations below make a type a [`RemoteFn`](super::RemoteFn).
    pub trait Blocking<Args> {}
    /// Only the blanket implementations below make a type an [`AsyncRemoteFn`](super::AsyncRemoteFn).
    pub trait Async<Args> {}
}

/// A plain function (or non-capturing closure) taking the tuple `Args`.
///
/// Implemented for every `Fn(A1, .., An) -> R + Copy + Send + Sync + 'static`
/// with `n` from 0 to 8; `Args` is `(A1, .., An)`. The trait is sealed: the
/// agent conjures the zero-sized function value instead of receiving it, which
/// is sound for `fn` items and closures but not for arbitrary types. A closure
/// that captures only zero-sized `Copy` values also qualifies; those values are
/// conjured on the agent too.
pub trait RemoteFn<Args>: sealed::Blocking<Args> + Copy + Send + Sync + 'static {
    /// What the function returns.
    type Output;
    /// Calls the function with the unpacked tuple.
    fn invoke(self, args: Args) -> Self::Output;
}

/// An `async fn` (or non-capturing closure returning a future) taking the tuple `Args`.
/// Sealed, like [`RemoteFn`].
pub trait AsyncRemoteFn<Args>: sealed::Async<Args> + Copy + Send + Sync + 'static {
    /// What the future resolves to.
    type Output;
    /// The future the function returns.
    type Future: Future<Output = Self::Output> + Send + 'static;
    /// Calls the function with the unpacked tuple.
    fn invoke(self, args: Args) -> Self::Future;
}

macro_rules! impl_remote_fn {
    ($($arg:ident),*) => {
        impl<Func, Ret, $($arg,)*> sealed::Blocking<($($arg,)*)> for Func
        where
            Func: Fn($($arg),*) -> Ret + Copy + Send + Sync + 'static,
        {
        }

        impl<Func, Fut, $($arg,)*> sealed::Async<($($arg,)*)> for Func
        where
            Func: Fn($($arg),*) -> Fut + Copy + Send + Sync + 'static,
            Fut: Future + Send + 'static,
        {
        }

        impl<Func, Ret, $($arg,)*> RemoteFn<($($arg,)*)> for Func
        where
            Func: Fn($($arg),*) -> Ret + Copy + Send + Sync + 'static,
        {
            type Output = Ret;
            #[allow(non_snake_case)]
            fn invoke(self, ($($arg,)*): ($($arg,)*)) -> Ret {
                self($($arg),*)
            }
        }

        impl<Func, Fut, $($arg,)*> AsyncRemoteFn<($($arg,)*)> for Func
        where
            Func: Fn($($arg),*) -> Fut + Copy + Send + Sync + 'static,
            Fut: Future + Send + 'static,
        {
            type Output = Fut::Output;
            type Future = Fut;
            #[allow(non_snake_case)]
            fn invoke(self, ($($arg,)*): ($($arg,)*)) -> Fut {
                self($($arg),*)
            }
        }
    };
}

impl_remote_fn!();
impl_remote_fn!(A1);
impl_remote_fn!(A1, A2);
impl_remote_fn!(A1, A2, A3);
impl_remote_fn!(A1, A2, A3, A4);
impl_remote_fn!(A1, A2, A3, A4, A5);
impl_remote_fn!(A1, A2, A3, A4, A5, A6);
impl_remote_fn!(A1, A2, A3, A4, A5, A6, A7);
impl_remote_fn!(A1, A2, A3, A4, A5, A6, A7, A8);

/// What a function reference names: one entry per trampoline instantiation,
/// in this program's read-only data.
///
/// A reference is the entry's offset from [`ENTRY_ANCHOR`], never a code
/// address. The agent reads the tag and the mode as plain integers, and
/// calls the trampoline only when both are right, so no frame, however
/// forged, can make it jump anywhere but to a genuine trampoline of the mode
/// the call asks for.
#[repr(C)]
struct Entry {
    /// [`ENTRY_TAG`]: tells an entry from any other data.
    tag: u64,
    /// [`BLOCKING`], [`ASYNC`], [`BLOCKING_STREAM`] or [`ASYNC_STREAM`].
    mode: u64,
    /// The trampoline, of the mode's kind.
    trampoline: Trampoline,
}

/// An entry's trampoline; its variant always matches the entry's mode.
#[derive(Clone, Copy)]
enum Trampoline {
    Blocking(BlockingTrampoline),
    Async(AsyncTrampoline),
    BlockingStream(BlockingStreamTrampoline),
    AsyncStream(AsyncStreamTrampoline),
}

impl Trampoline {
    fn address(self) -> usize {
        match self {
            Trampoline::Blocking(code) => code as usize,
            Trampoline::Async(code) => code as usize,
            Trampoline::BlockingStream(code) => code as usize,
            Trampoline::AsyncStream(code) => code as usize,
        }
    }
}

/// The tag every entry starts with. Code never holds this value: the check
/// computes it from two halves at run time (see [`expected_tag`]), so the
/// entries are the only place in the program where it is stored.
const ENTRY_TAG: u64 = TAG_HALVES.0 ^ TAG_HALVES.1;
const TAG_HALVES: (u64, u64) = (0x6368_6f70_7374_6963, 0x9e37_79b9_7f4a_7c15);
const BLOCKING: u64 = 0x0b10_c00b;
const ASYNC: u64 = 0x0a5e_c00a;
const BLOCKING_STREAM: u64 = 0x0b10_5eed;
const ASYNC_STREAM: u64 = 0x0a5e_5eed;

fn mode_tag(mode: CallMode) -> u64 {
    match mode {
        CallMode::Blocking => BLOCKING,
        CallMode::Async => ASYNC,
        CallMode::BlockingStream => BLOCKING_STREAM,
        CallMode::AsyncStream => ASYNC_STREAM,
    }
}

/// The point entry offsets are measured from.
static ENTRY_ANCHOR: u8 = 0;

fn anchor_address() -> usize {
    std::ptr::addr_of!(ENTRY_ANCHOR).expose_provenance()
}

fn offset_of(entry: &'static Entry) -> i64 {
    (entry as *const Entry)
        .expose_provenance()
        .wrapping_sub(anchor_address()) as i64
}

#[inline(never)]
fn expected_tag() -> u64 {
    std::hint::black_box(TAG_HALVES.0) ^ std::hint::black_box(TAG_HALVES.1)
}

/// Conjures the zero-sized function value.
///
/// # Safety
/// `F` must be zero-sized and `Copy`: the caller held a value of it (so the
/// type is inhabited), and a zero-sized `Copy` value carries no state and no
/// invariant a fresh value could break.
unsafe fn conjure<F: Copy>() -> F {
    let () = CapturesNothing::<F>::CHECK;
    // SAFETY: F is zero-sized and Copy (see the function's contract).
    unsafe { std::mem::zeroed() }
}

fn blocking_trampoline<F, Args, R>(args: &[u8]) -> CallOutcome
where
    F: RemoteFn<Args, Output = R>,
    Args: DeserializeOwned,
    R: Serialize,
{
    let args: Args =
        decode_value(args).map_err(|message| Failure::new(FailureKind::Arguments, message))?;
    // SAFETY: `function_ref` asserted at compile time that F is zero-sized; F is Copy.
    let function: F = unsafe { conjure() };
    let result = function.invoke(args);
    encode_value(&result).map_err(|message| Failure::new(FailureKind::Result, message))
}

fn async_trampoline<F, Args, R>(args: Vec<u8>) -> OutcomeFuture
where
    F: AsyncRemoteFn<Args, Output = R>,
    Args: DeserializeOwned + Send + 'static,
    R: Serialize + 'static,
{
    Box::pin(async move {
        let args: Args =
            decode_value(&args).map_err(|message| Failure::new(FailureKind::Arguments, message))?;
        // SAFETY: `async_function_ref` asserted at compile time that F is zero-sized; F is Copy.
        let function: F = unsafe { conjure() };
        let result = function.invoke(args).await;
        encode_value(&result).map_err(|message| Failure::new(FailureKind::Result, message))
    })
}

/// Encodes one item of a stream into `encoded`, which it clears first.
fn encode_item<T: Serialize>(item: &T, encoded: &mut Vec<u8>) -> Result<(), Failure> {
    encoded.clear();
    crate::cbor::append_to(item, encoded)
        .map_err(|error| Failure::new(FailureKind::Result, format!("an item: {error}")))?;
    if encoded.len() > MAX_ITEM_LEN {
        return Err(Failure::new(
            FailureKind::Result,
            format!(
                "an item of {} bytes exceeds the limit of {MAX_ITEM_LEN} bytes for one item",
                encoded.len()
            ),
        ));
    }
    Ok(())
}

fn blocking_stream_trampoline<F, Args, I>(args: &[u8], flow: &Outflow) -> Result<(), Failure>
where
    F: RemoteFn<Args, Output = I>,
    Args: DeserializeOwned,
    I: IntoIterator,
    I::Item: Serialize,
{
    let args: Args =
        decode_value(args).map_err(|message| Failure::new(FailureKind::Arguments, message))?;
    // SAFETY: `stream_function_ref_of` asserted at compile time that F is zero-sized; F is Copy.
    let function: F = unsafe { conjure() };
    let mut items = function.invoke(args).into_iter();
    let mut encoded = Vec::new();
    // A cancelled stream's iterator is not advanced again, only dropped.
    while !flow.is_cancelled() {
        let Some(item) = items.next() else { break };
        encode_item(&item, &mut encoded)?;
        if flow.push_item_blocking(&encoded).is_err() {
            break;
        }
    }
    Ok(())
}

fn byte_stream_trampoline<F, Args, I>(args: &[u8], flow: &Outflow) -> Result<(), Failure>
where
    F: RemoteFn<Args, Output = I>,
    Args: DeserializeOwned,
    I: IntoIterator,
    I::Item: Into<bytes::Bytes>,
{
    let args: Args =
        decode_value(args).map_err(|message| Failure::new(FailureKind::Arguments, message))?;
    // SAFETY: `byte_stream_function_ref_of` asserted at compile time that F is zero-sized; F is Copy.
    let function: F = unsafe { conjure() };
    let mut pieces = function.invoke(args).into_iter();
    while !flow.is_cancelled() {
        let Some(piece) = pieces.next() else { break };
        if flow.push_chunk_blocking(piece.into()).is_err() {
            break;
        }
    }
    Ok(())
}

fn async_stream_trampoline<F, Args, S>(args: Vec<u8>, flow: Arc<Outflow>) -> StreamFuture
where
    F: RemoteFn<Args, Output = S>,
    Args: DeserializeOwned + Send + 'static,
    S: Stream + Send + 'static,
    S::Item: Serialize,
{
    Box::pin(async move {
        let args: Args =
            decode_value(&args).map_err(|message| Failure::new(FailureKind::Arguments, message))?;
        // SAFETY: `async_stream_function_ref_of` asserted at compile time that F is zero-sized; F is Copy.
        let function: F = unsafe { conjure() };
        let items = function.invoke(args);
        let mut items = std::pin::pin!(items);
        let mut encoded = Vec::new();
        while !flow.is_cancelled() {
            match items.next().await {
                // The item goes before the wait: it need not be `Send`.
                Some(item) => encode_item(&item, &mut encoded)?,
                None => break,
            }
            if flow.push_item(&encoded).await.is_err() {
                break;
            }
        }
        Ok(())
    })
}

/// Fails the build when `F` captures something: a function that captures
/// nothing is zero-sized, so its type alone names it.
///
/// Every public entry point (`Tunnel::call`, `Group::call`, ...) names
/// this constant itself, so the compiler's note "the above error was
/// encountered while instantiating" points at the user's call, and the
/// one constant is one error however many layers name it.
pub struct CapturesNothing<F>(std::marker::PhantomData<F>);

impl<F> CapturesNothing<F> {
    /// Evaluating it fails unless `F` is zero-sized.
    pub const CHECK: () = assert!(
        size_of::<F>() == 0,
        "chopsticks can only call functions that capture nothing: pass a fn item, an async fn item or a closure without captured variables, and send data as arguments"
    );
}

/// The reference to a blocking function, checked at build time to capture nothing.
pub fn function_ref<F, Args>(_function: F) -> FunctionRef
where
    F: RemoteFn<Args>,
    Args: DeserializeOwned,
    F::Output: Serialize,
{
    function_ref_of::<F, Args>()
}

/// [`function_ref`] by type alone.
pub fn function_ref_of<F, Args>() -> FunctionRef
where
    F: RemoteFn<Args>,
    Args: DeserializeOwned,
    F::Output: Serialize,
{
    let () = CapturesNothing::<F>::CHECK;
    let entry: &'static Entry = const {
        &Entry {
            tag: ENTRY_TAG,
            mode: BLOCKING,
            trampoline: Trampoline::Blocking(blocking_trampoline::<F, Args, F::Output>),
        }
    };
    FunctionRef::Offset {
        offset: offset_of(entry),
        name: Cow::Borrowed(std::any::type_name::<F>()),
    }
}

/// The reference to an async function, checked at build time to capture nothing.
pub fn async_function_ref<F, Args>(_function: F) -> FunctionRef
where
    F: AsyncRemoteFn<Args>,
    Args: DeserializeOwned + Send + 'static,
    F::Output: Serialize + 'static,
{
    async_function_ref_of::<F, Args>()
}

/// [`async_function_ref`] by type alone.
pub fn async_function_ref_of<F, Args>() -> FunctionRef
where
    F: AsyncRemoteFn<Args>,
    Args: DeserializeOwned + Send + 'static,
    F::Output: Serialize + 'static,
{
    let () = CapturesNothing::<F>::CHECK;
    let entry: &'static Entry = const {
        &Entry {
            tag: ENTRY_TAG,
            mode: ASYNC,
            trampoline: Trampoline::Async(async_trampoline::<F, Args, F::Output>),
        }
    };
    FunctionRef::Offset {
        offset: offset_of(entry),
        name: Cow::Borrowed(std::any::type_name::<F>()),
    }
}

/// The reference to a blocking function that returns an iterator, whose
/// items stream back; checked at build time to capture nothing.
pub fn stream_function_ref_of<F, Args>() -> FunctionRef
where
    F: RemoteFn<Args>,
    Args: DeserializeOwned,
    F::Output: IntoIterator,
    <F::Output as IntoIterator>::Item: Serialize,
{
    let () = CapturesNothing::<F>::CHECK;
    let entry: &'static Entry = const {
        &Entry {
            tag: ENTRY_TAG,
            mode: BLOCKING_STREAM,
            trampoline: Trampoline::BlockingStream(
                blocking_stream_trampoline::<F, Args, F::Output>,
            ),
        }
    };
    FunctionRef::Offset {
        offset: offset_of(entry),
        name: Cow::Borrowed(std::any::type_name::<F>()),
    }
}

/// The reference to a blocking function that returns an iterator of byte
/// pieces, which stream back as raw bytes; checked at build time to capture nothing.
pub fn byte_stream_function_ref_of<F, Args>() -> FunctionRef
where
    F: RemoteFn<Args>,
    Args: DeserializeOwned,
    F::Output: IntoIterator,
    <F::Output as IntoIterator>::Item: Into<bytes::Bytes>,
{
    let () = CapturesNothing::<F>::CHECK;
    let entry: &'static Entry = const {
        &Entry {
            tag: ENTRY_TAG,
            mode: BLOCKING_STREAM,
            trampoline: Trampoline::BlockingStream(byte_stream_trampoline::<F, Args, F::Output>),
        }
    };
    FunctionRef::Offset {
        offset: offset_of(entry),
        name: Cow::Borrowed(std::any::type_name::<F>()),
    }
}

/// The reference to a function that returns a `Stream`, whose items
/// stream back; checked at build time to capture nothing.
pub fn async_stream_function_ref_of<F, Args>() -> FunctionRef
where
    F: RemoteFn<Args>,
    Args: DeserializeOwned + Send + 'static,
    F::Output: Stream + Send + 'static,
    <F::Output as Stream>::Item: Serialize,
{
    let () = CapturesNothing::<F>::CHECK;
    let entry: &'static Entry = const {
        &Entry {
            tag: ENTRY_TAG,
            mode: ASYNC_STREAM,
            trampoline: Trampoline::AsyncStream(async_stream_trampoline::<F, Args, F::Output>),
        }
    };
    FunctionRef::Offset {
        offset: offset_of(entry),
        name: Cow::Borrowed(std::any::type_name::<F>()),
    }
}

/// A resolved function, ready to run on the agent.
#[derive(Debug, Clone, Copy)]
pub enum Resolved {
    /// Run on a blocking pool.
    Blocking(BlockingTrampolineFn),
    /// Run as a task.
    Async(AsyncTrampolineFn),
    /// Iterate on a blocking pool, pushing items into a stream.
    BlockingStream(BlockingStreamTrampolineFn),
    /// Poll as a task, pushing items into a stream.
    AsyncStream(AsyncStreamTrampolineFn),
}

/// A resolved trampoline of an iterator-returning function.
#[derive(Debug, Clone, Copy)]
pub struct BlockingStreamTrampolineFn(BlockingStreamTrampoline);

impl BlockingStreamTrampolineFn {
    /// Runs the function on encoded arguments and pushes its items into
    /// `flow` until they end or the stream is cancelled.
    pub fn run(self, args: &[u8], flow: &Outflow) -> Result<(), Failure> {
        (self.0)(args, flow)
    }
}

/// A resolved trampoline of a `Stream`-returning function.
#[derive(Debug, Clone, Copy)]
pub struct AsyncStreamTrampolineFn(AsyncStreamTrampoline);

impl AsyncStreamTrampolineFn {
    /// Starts the function on encoded arguments; the future pushes its
    /// items into `flow` until they end or the stream is cancelled.
    pub fn run(self, args: Vec<u8>, flow: Arc<Outflow>) -> StreamFuture {
        (self.0)(args, flow)
    }
}

/// A resolved blocking trampoline.
#[derive(Debug, Clone, Copy)]
pub struct BlockingTrampolineFn(BlockingTrampoline);

impl BlockingTrampolineFn {
    /// Runs the function on encoded arguments.
    pub fn run(self, args: &[u8]) -> CallOutcome {
        (self.0)(args)
    }
}

/// A resolved async trampoline.
#[derive(Debug, Clone, Copy)]
pub struct AsyncTrampolineFn(AsyncTrampoline);

impl AsyncTrampolineFn {
    /// Starts the function on encoded arguments.
    pub fn run(self, args: Vec<u8>) -> OutcomeFuture {
        (self.0)(args)
    }
}

/// Turns a function reference from the controller into a trampoline of this binary.
///
/// The reference is an offset from this program's entry anchor. It resolves
/// only if it lands on a genuine entry: aligned, wholly inside this
/// program's read-only data (never writable memory, where a program might
/// keep bytes a peer sent), starting with the entry tag, and of the mode
/// asked for; the entry's trampoline must lie in an executable segment.
/// Anything else fails with `UnknownFunction` before any call. Only an
/// agent that proved in its hello to be the same binary as its controller
/// resolves references, so that genuine entries mean the same function on
/// both ends.
///
/// # Safety
///
/// `function` must name an entry made by [`function_ref`] or
/// [`async_function_ref`] in a process running this same executable (the
/// agent knows, because its controller checks the build id of the agent's
/// hello before sending a call). The checks above refuse every forgery this
/// function can tell apart from an entry, and so are a second line of
/// defence, not a proof: what is resolved here is called through a function
/// pointer read from memory.
pub unsafe fn resolve(function: &FunctionRef, mode: CallMode) -> Result<Resolved, Failure> {
    let (offset, name) = match function {
        FunctionRef::Offset { offset, name } => (offset, name),
        FunctionRef::Named { name, signature } => {
            let own = crate::named::resolve_name(name, signature, mode)
                .map_err(|why| Failure::new(FailureKind::UnknownFunction, why))?;
            // SAFETY: the same contract; `own` is this build's own reference,
            // checked again like any other.
            return unsafe { resolve(&own, mode) };
        }
    };
    let refuse = |why: &str| {
        Failure::new(
            FailureKind::UnknownFunction,
            format!("{name} (offset {offset}) {why}"),
        )
    };
    let address = anchor_address().wrapping_add(*offset as usize);
    let end = address.checked_add(size_of::<Entry>());
    let inside = |segment: &&Segment| {
        segment.read_only && end.is_some_and(|end| segment.start <= address && end <= segment.end)
    };
    if !address.is_multiple_of(align_of::<Entry>()) || !segments().iter().any(|s| inside(&s)) {
        return Err(refuse(
            "does not name an entry of this program's function table",
        ));
    }
    let header = std::ptr::with_exposed_provenance::<[u64; 2]>(address);
    // SAFETY: the address is aligned for `[u64; 2]` (an entry's alignment is
    // at least u64's) and the whole entry lies in read-only loaded data of
    // this program, so this reads mapped memory; any bits are valid u64s.
    let [tag, entry_mode] = unsafe { header.read() };
    if tag != expected_tag() {
        return Err(refuse(
            "does not name an entry of this program's function table",
        ));
    }
    if entry_mode != mode_tag(mode) {
        return Err(refuse(match mode {
            CallMode::Blocking => "is not a blocking function, as the call says",
            CallMode::Async => "is not an async function, as the call says",
            CallMode::BlockingStream => "is not an iterator-returning function, as the call says",
            CallMode::AsyncStream => "is not a stream-returning function, as the call says",
        }));
    }
    // SAFETY: in this program's read-only data the tag is stored nowhere but
    // in entries (code computes it from two halves), so this is a genuine
    // `Entry` made by `function_ref` or `async_function_ref`, aligned.
    let entry = unsafe { &*std::ptr::with_exposed_provenance::<Entry>(address) };
    let resolved = match (mode, entry.trampoline) {
        (CallMode::Blocking, Trampoline::Blocking(code)) => {
            Resolved::Blocking(BlockingTrampolineFn(code))
        }
        (CallMode::Async, Trampoline::Async(code)) => Resolved::Async(AsyncTrampolineFn(code)),
        (CallMode::BlockingStream, Trampoline::BlockingStream(code)) => {
            Resolved::BlockingStream(BlockingStreamTrampolineFn(code))
        }
        (CallMode::AsyncStream, Trampoline::AsyncStream(code)) => {
            Resolved::AsyncStream(AsyncStreamTrampolineFn(code))
        }
        _ => return Err(refuse("names a malformed entry")),
    };
    let code = entry.trampoline.address();
    if !segments()
        .iter()
        .any(|segment| segment.executable && (segment.start..segment.end).contains(&code))
    {
        return Err(refuse(
            "names an entry whose code lies outside this program",
        ));
    }
    Ok(resolved)
}

/// A loaded segment of this program, or its part made read-only after relocation.
#[derive(Debug, Clone, Copy)]
struct Segment {
    start: usize,
    end: usize,
    /// Readable and never written once the program runs: where entries
    /// live (`.rodata`, or `.data.rel.ro` under `PT_GNU_RELRO`). Writable
    /// data, where a program might keep bytes a peer sent, is not.
    read_only: bool,
    executable: bool,
}

/// The loaded segments of the object that contains [`ENTRY_ANCHOR`].
fn segments() -> &'static [Segment] {
    static SEGMENTS: OnceLock<Vec<Segment>> = OnceLock::new();
    SEGMENTS.get_or_init(|| {
        let mut search = (anchor_address(), Vec::new());
        // SAFETY: the callback reads loader-provided headers; `search` outlives the call.
        unsafe {
            libc::dl_iterate_phdr(
                Some(visit_segments),
                (&mut search as *mut (usize, Vec<Segment>)).cast(),
            );
        }
        search.1
    })
}

unsafe extern "C" fn visit_segments(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: the loader passes a valid info pointer; `data` is the tuple from `segments`.
    let (info, search) = unsafe { (&*info, &mut *data.cast::<(usize, Vec<Segment>)>()) };
    let mut segments = Vec::new();
    for index in 0..usize::from(info.dlpi_phnum) {
        // SAFETY: dlpi_phdr points at dlpi_phnum headers.
        let header = unsafe { &*info.dlpi_phdr.add(index) };
        let start = (info.dlpi_addr as usize).wrapping_add(header.p_vaddr as usize);
        let end = start.saturating_add(header.p_memsz as usize);
        let readable = header.p_flags & libc::PF_R != 0;
        match header.p_type {
            libc::PT_LOAD => segments.push(Segment {
                start,
                end,
                read_only: readable && header.p_flags & libc::PF_W == 0,
                executable: header.p_flags & libc::PF_X != 0,
            }),
            libc::PT_GNU_RELRO => segments.push(Segment {
                start,
                end,
                read_only: true,
                executable: false,
            }),
            _ => {}
        }
    }
    if segments
        .iter()
        .any(|segment| (segment.start..segment.end).contains(&search.0))
    {
        search.1 = segments;
        return 1;
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `resolve` for references this test builds in this very process.
    fn resolve_here(function: &FunctionRef, mode: CallMode) -> Result<Resolved, Failure> {
        // SAFETY: every reference here is made in this process, by
        // `function_ref` or as a deliberate forgery that `resolve` must
        // refuse; none of them is called unless it resolved to an entry.
        unsafe { resolve(function, mode) }
    }

    fn add3(a: i64, b: i64, c: i64) -> i64 {
        a + b + c
    }

    async fn double(x: u32) -> u32 {
        x * 2
    }

    #[test]
    fn blocking_reference_resolves_and_runs_in_process() {
        let function = function_ref(add3);
        assert!(function.name().ends_with("add3"));
        let Ok(Resolved::Blocking(trampoline)) = resolve_here(&function, CallMode::Blocking) else {
            panic!("did not resolve")
        };
        let args = encode_value(&(1i64, 2i64, 39i64)).expect("encode");
        let result: i64 = decode_value(&trampoline.run(&args).expect("run")).expect("decode");
        assert_eq!(result, 42);
    }

    #[test]
    fn closures_and_zero_arity_work() {
        let function = function_ref(|| "hi".to_string());
        let Ok(Resolved::Blocking(trampoline)) = resolve_here(&function, CallMode::Blocking) else {
            panic!("did not resolve")
        };
        let args = encode_value(&()).expect("encode");
        let result: String = decode_value(&trampoline.run(&args).expect("run")).expect("decode");
        assert_eq!(result, "hi");
    }

    #[tokio::test]
    async fn async_reference_resolves_and_runs() {
        let function = async_function_ref(double);
        let Ok(Resolved::Async(trampoline)) = resolve_here(&function, CallMode::Async) else {
            panic!("did not resolve")
        };
        let args = encode_value(&(21u32,)).expect("encode");
        let result: u32 = decode_value(&trampoline.run(args).await.expect("run")).expect("decode");
        assert_eq!(result, 42);
    }

    #[test]
    fn wrong_arguments_fail_cleanly() {
        let function = function_ref(add3);
        let Ok(Resolved::Blocking(trampoline)) = resolve_here(&function, CallMode::Blocking) else {
            panic!("did not resolve")
        };
        let args = encode_value(&("not", "numbers")).expect("encode");
        let failure = trampoline.run(&args).expect_err("must fail");
        assert_eq!(failure.kind, FailureKind::Arguments);
    }

    fn offset(function: &FunctionRef) -> i64 {
        match function {
            FunctionRef::Offset { offset, .. } => *offset,
            other => panic!("not an offset: {other:?}"),
        }
    }

    #[test]
    fn unknown_names_and_other_signatures_are_refused_before_any_code() {
        // SAFETY: resolve reads only this program's tables.
        let unknown = unsafe {
            resolve(
                &FunctionRef::Named {
                    name: "no::such::function".into(),
                    signature: "() -> ()".into(),
                },
                CallMode::Blocking,
            )
        };
        let Err(failure) = unknown else {
            panic!("resolved an unknown name")
        };
        assert_eq!(failure.kind, FailureKind::UnknownFunction);
        assert!(
            failure.message.contains("no::such::function"),
            "{}",
            failure.message
        );
    }

    fn at(offset: i64) -> FunctionRef {
        FunctionRef::Offset {
            offset,
            name: Cow::Borrowed("forged"),
        }
    }

    #[test]
    fn offsets_outside_the_program_are_refused() {
        for offset in [i64::MAX / 2, i64::MIN, -1, 0, 1, i64::MAX] {
            for mode in [CallMode::Blocking, CallMode::Async] {
                let failure = resolve_here(&at(offset), mode).expect_err("must refuse");
                assert_eq!(failure.kind, FailureKind::UnknownFunction, "{offset}");
            }
        }
    }

    /// Every offset near a genuine entry, in either mode, and the offset of
    /// code (a trampoline itself, as references once named): the entry
    /// resolves only in its own mode, and nothing resolves between entries.
    /// (Other entries may sit next to this one; they are genuine too.)
    #[test]
    fn only_genuine_entries_in_their_own_mode_resolve() {
        let blocking = offset(&function_ref(add3));
        let asynchronous = offset(&async_function_ref(double));
        for (genuine, own) in [
            (blocking, CallMode::Blocking),
            (asynchronous, CallMode::Async),
        ] {
            for delta in -256..=256i64 {
                for mode in [CallMode::Blocking, CallMode::Async] {
                    let resolved = resolve_here(&at(genuine + delta), mode);
                    if delta == 0 {
                        assert_eq!(resolved.is_ok(), mode == own, "the entry as {mode:?}");
                    } else if delta % align_of::<Entry>() as i64 != 0 {
                        assert!(
                            resolved.is_err(),
                            "offset {delta} from an entry, as {mode:?}"
                        );
                    }
                }
            }
        }
        fn trampoline_of<F, Args>(_function: F) -> usize
        where
            F: RemoteFn<Args>,
            Args: DeserializeOwned,
            F::Output: Serialize,
        {
            blocking_trampoline::<F, Args, F::Output> as BlockingTrampoline as usize
        }
        let code = trampoline_of(add3).wrapping_sub(anchor_address()) as i64;
        for mode in [CallMode::Blocking, CallMode::Async] {
            assert!(
                resolve_here(&at(code), mode).is_err(),
                "code is not an entry"
            );
        }
        // A perfect forgery (tag, mode and a real trampoline) in writable
        // memory, where a program might keep bytes a peer sent: refused.
        fn placeholder(_args: &[u8]) -> CallOutcome {
            Err(Failure::new(FailureKind::UnknownFunction, "placeholder"))
        }
        static mut FORGED: Entry = Entry {
            tag: 0,
            mode: BLOCKING,
            trampoline: Trampoline::Blocking(placeholder),
        };
        let real = match resolve_here(&at(blocking), CallMode::Blocking) {
            Ok(Resolved::Blocking(BlockingTrampolineFn(trampoline))) => trampoline,
            _ => panic!("the genuine entry resolves"),
        };
        let forged_on_heap = Box::new(Entry {
            tag: expected_tag(),
            mode: BLOCKING,
            trampoline: Trampoline::Blocking(real),
        });
        // SAFETY: the test's own static, written before any reader looks.
        let forged_static = unsafe {
            FORGED.tag = expected_tag();
            FORGED.trampoline = Trampoline::Blocking(real);
            std::ptr::addr_of!(FORGED)
        };
        for forged in [forged_static, &*forged_on_heap as *const Entry] {
            let offset = forged.expose_provenance().wrapping_sub(anchor_address()) as i64;
            assert!(
                resolve_here(&at(offset), CallMode::Blocking).is_err(),
                "a forged entry in writable memory resolved"
            );
        }
        let wrong_mode = resolve_here(&at(blocking), CallMode::Async).expect_err("wrong mode");
        assert!(
            wrong_mode.message.contains("not an async function"),
            "{}",
            wrong_mode.message
        );
    }
}
