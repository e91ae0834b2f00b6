//! Naming plain functions across the pipe.
//!
//! `tun.call(f, (a, b))` works for any `f` that captures nothing: a `fn`
//! item or a non-capturing closure is a zero-sized type, so the *type* is the
//! whole function. For each such type the controller instantiates a
//! trampoline, `blocking_trampoline::<F, Args, R>`, which decodes `Args`,
//! conjures the zero-sized `F`, calls it and encodes `R`. The call names that
//! trampoline by its address minus the address of [`anchor`]. The agent is
//! the same file (the hello proves it by build-id before any call), so adding
//! the offset to its own anchor lands on the same trampoline.
//!
//! Offsets are never keys or fingerprints: one trampoline can exist in
//! several copies, and identical closures may share one. Both are harmless.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::protocol::{CallMode, Failure, FailureKind, FunctionRef, decode_value, encode_value};

/// What a trampoline returns: the encoded result, or why there is none.
pub type CallOutcome = Result<Vec<u8>, Failure>;
/// A boxed future of a [`CallOutcome`].
pub type OutcomeFuture = Pin<Box<dyn Future<Output = CallOutcome> + Send + 'static>>;

type BlockingTrampoline = fn(&[u8]) -> CallOutcome;
type AsyncTrampoline = fn(Vec<u8>) -> OutcomeFuture;

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

/// The fixed point trampoline offsets are measured from.
#[inline(never)]
pub fn anchor() -> &'static str {
    "chopsticks anchor"
}

fn offset_of(address: usize) -> i64 {
    address.wrapping_sub(anchor as fn() -> &'static str as usize) as i64
}

/// Conjures the zero-sized function value.
///
/// # Safety
/// `F` must be zero-sized and `Copy`: the caller held a value of it (so the
/// type is inhabited), and a zero-sized `Copy` value carries no state and no
/// invariant a fresh value could break.
unsafe fn conjure<F: Copy>() -> F {
    const { assert!(size_of::<F>() == 0) };
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

/// The reference to a blocking function, checked at build time to capture nothing.
pub fn function_ref<F, Args>(_function: F) -> FunctionRef
where
    F: RemoteFn<Args>,
    Args: DeserializeOwned,
    F::Output: Serialize,
{
    const {
        assert!(
            size_of::<F>() == 0,
            "chopsticks can only call functions that capture nothing: pass a fn item or a closure without captured variables, and send data as arguments"
        )
    };
    let trampoline: BlockingTrampoline = blocking_trampoline::<F, Args, F::Output>;
    FunctionRef::Offset {
        offset: offset_of(trampoline as usize),
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
    const {
        assert!(
            size_of::<F>() == 0,
            "chopsticks can only call functions that capture nothing: pass an async fn item or a closure without captured variables, and send data as arguments"
        )
    };
    let trampoline: AsyncTrampoline = async_trampoline::<F, Args, F::Output>;
    FunctionRef::Offset {
        offset: offset_of(trampoline as usize),
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
/// Only an agent that proved in its hello to be the same binary as its
/// controller may call this. As a second line of defence the address must
/// lie inside an executable segment of this program, else the call fails
/// with `UnknownFunction` instead of jumping.
pub fn resolve(function: &FunctionRef, mode: CallMode) -> Result<Resolved, Failure> {
    let FunctionRef::Offset { offset, name } = function;
    let address = (anchor as fn() -> &'static str as usize).wrapping_add(*offset as usize);
    if !executable_ranges()
        .iter()
        .any(|(start, end)| (*start..*end).contains(&address))
    {
        return Err(Failure::new(
            FailureKind::UnknownFunction,
            format!("{name} at offset {offset} lies outside this program's code"),
        ));
    }
    // SAFETY: the address is a trampoline of this very binary: the controller
    // took it from `function_ref`/`async_function_ref` for this mode, and the
    // handshake proved both processes run the same file. Function pointers
    // are address-sized.
    unsafe {
        Ok(match mode {
            CallMode::Blocking => Resolved::Blocking(BlockingTrampolineFn(std::mem::transmute::<
                usize,
                BlockingTrampoline,
            >(address))),
            CallMode::Async => Resolved::Async(AsyncTrampolineFn(std::mem::transmute::<
                usize,
                AsyncTrampoline,
            >(address))),
        })
    }
}

/// The executable segments of the object that contains [`anchor`].
fn executable_ranges() -> &'static [(usize, usize)] {
    static RANGES: OnceLock<Vec<(usize, usize)>> = OnceLock::new();
    RANGES.get_or_init(|| {
        let mut search = (anchor as fn() -> &'static str as usize, Vec::new());
        // SAFETY: the callback reads loader-provided headers; `search` outlives the call.
        unsafe {
            libc::dl_iterate_phdr(
                Some(visit_segments),
                (&mut search as *mut (usize, Vec<(usize, usize)>)).cast(),
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
    // SAFETY: the loader passes a valid info pointer; `data` is the tuple from executable_ranges.
    let (info, search) = unsafe { (&*info, &mut *data.cast::<(usize, Vec<(usize, usize)>)>()) };
    let mut ranges = Vec::new();
    for index in 0..usize::from(info.dlpi_phnum) {
        // SAFETY: dlpi_phdr points at dlpi_phnum headers.
        let header = unsafe { &*info.dlpi_phdr.add(index) };
        if header.p_type == libc::PT_LOAD && header.p_flags & libc::PF_X != 0 {
            let start = (info.dlpi_addr as usize).wrapping_add(header.p_vaddr as usize);
            ranges.push((start, start + header.p_memsz as usize));
        }
    }
    if ranges
        .iter()
        .any(|(start, end)| (*start..*end).contains(&search.0))
    {
        search.1 = ranges;
        return 1;
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let Ok(Resolved::Blocking(trampoline)) = resolve(&function, CallMode::Blocking) else {
            panic!("did not resolve")
        };
        let args = encode_value(&(1i64, 2i64, 39i64)).expect("encode");
        let result: i64 = decode_value(&trampoline.run(&args).expect("run")).expect("decode");
        assert_eq!(result, 42);
    }

    #[test]
    fn closures_and_zero_arity_work() {
        let function = function_ref(|| "hi".to_string());
        let Ok(Resolved::Blocking(trampoline)) = resolve(&function, CallMode::Blocking) else {
            panic!("did not resolve")
        };
        let args = encode_value(&()).expect("encode");
        let result: String = decode_value(&trampoline.run(&args).expect("run")).expect("decode");
        assert_eq!(result, "hi");
    }

    #[tokio::test]
    async fn async_reference_resolves_and_runs() {
        let function = async_function_ref(double);
        let Ok(Resolved::Async(trampoline)) = resolve(&function, CallMode::Async) else {
            panic!("did not resolve")
        };
        let args = encode_value(&(21u32,)).expect("encode");
        let result: u32 = decode_value(&trampoline.run(args).await.expect("run")).expect("decode");
        assert_eq!(result, 42);
    }

    #[test]
    fn wrong_arguments_fail_cleanly() {
        let function = function_ref(add3);
        let Ok(Resolved::Blocking(trampoline)) = resolve(&function, CallMode::Blocking) else {
            panic!("did not resolve")
        };
        let args = encode_value(&("not", "numbers")).expect("encode");
        let failure = trampoline.run(&args).expect_err("must fail");
        assert_eq!(failure.kind, FailureKind::Arguments);
    }

    #[test]
    fn offsets_outside_the_code_are_refused() {
        let function = FunctionRef::Offset {
            offset: i64::MAX / 2,
            name: Cow::Borrowed("bogus"),
        };
        let failure = resolve(&function, CallMode::Blocking).expect_err("must refuse");
        assert_eq!(failure.kind, FailureKind::UnknownFunction);
    }
}
