//! Functions registered by name, so that another build of the program (for
//! another target, another profile) can run them.
//!
//! Offsets name functions only between two processes of one binary. A
//! function listed in [`register!`](crate::register) also gets a
//! [`NamedFunction`] in a link-time table ([`NAMED`], a `linkme` distributed
//! slice: filled by the linker, so it is complete before any code runs,
//! even in the agent's constructor). Its name is `module_path::name`, the
//! same in every build of the crate, and its signature the type names of
//! its arguments and result.
//!
//! When the agent is another build, the controller sends
//! [`FunctionRef::Named`] for a registered function; the agent looks the
//! name up in its own table, compares the signature, and resolves its own
//! entry through the ordinary, checked offset path. An unregistered
//! function is refused on the controller, before anything is sent; an
//! unknown name or another signature is refused on the agent. Neither
//! reaches any code.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::protocol::{CallMode, FunctionRef};
use crate::remote::{AsyncRemoteFn, RemoteFn, async_function_ref_of, function_ref_of};

/// One registered function.
#[derive(Debug)]
pub struct NamedFunction {
    /// `module_path::name`.
    pub name: &'static str,
    /// Blocking or async.
    pub mode: CallMode,
    /// The type names of the arguments and the result.
    pub signature: fn() -> String,
    /// The function's offset reference in this build.
    pub reference: fn() -> FunctionRef,
}

/// Every registered function of the program, gathered by the linker.
#[linkme::distributed_slice]
pub static NAMED: [NamedFunction];

fn signature_of<Args, Output>() -> String {
    format!(
        "{} -> {}",
        std::any::type_name::<Args>(),
        std::any::type_name::<Output>()
    )
}

impl NamedFunction {
    /// The table entry for the blocking function `function` (what
    /// [`register!`](crate::register) expands to).
    pub const fn blocking<F, Args>(name: &'static str, function: F) -> NamedFunction
    where
        F: RemoteFn<Args>,
        Args: DeserializeOwned + 'static,
        F::Output: Serialize + 'static,
    {
        let _ = function;
        NamedFunction {
            name,
            mode: CallMode::Blocking,
            signature: signature_of::<Args, F::Output>,
            reference: function_ref_of::<F, Args>,
        }
    }

    /// The table entry for the async function `function`.
    pub const fn asynchronous<F, Args>(name: &'static str, function: F) -> NamedFunction
    where
        F: AsyncRemoteFn<Args>,
        Args: DeserializeOwned + Send + 'static,
        F::Output: Serialize + 'static,
    {
        let _ = function;
        NamedFunction {
            name,
            mode: CallMode::Async,
            signature: signature_of::<Args, F::Output>,
            reference: async_function_ref_of::<F, Args>,
        }
    }
}

/// The name-based reference for the function whose offset reference in
/// this build is `offset`, if it is registered.
pub(crate) fn by_reference(reference: &FunctionRef, mode: CallMode) -> Option<FunctionRef> {
    NAMED
        .iter()
        .find(|named| named.mode == mode && (named.reference)() == *reference)
        .map(|named| FunctionRef::Named {
            name: named.name.into(),
            signature: (named.signature)(),
        })
}

/// This build's offset reference for a name-based one, or why there is none.
pub(crate) fn resolve_name(
    name: &str,
    signature: &str,
    mode: CallMode,
) -> Result<FunctionRef, String> {
    let Some(named) = NAMED.iter().find(|named| named.name == name) else {
        return Err(format!(
            "this build of the program registers no function named {name}"
        ));
    };
    if named.mode != mode {
        return Err(format!(
            "{name} is registered as a {} function here, but was called as a {} one",
            mode_word(named.mode),
            mode_word(mode)
        ));
    }
    let here = (named.signature)();
    if here != signature {
        return Err(format!(
            "{name} takes and returns {here} in this build, but the caller's build has {signature}"
        ));
    }
    Ok((named.reference)())
}

fn mode_word(mode: CallMode) -> &'static str {
    match mode {
        CallMode::Blocking => "blocking",
        CallMode::Async => "async",
        CallMode::BlockingStream => "iterator-returning",
        CallMode::AsyncStream => "stream-returning",
    }
}

/// Registers functions by name, so that another build of this program (for
/// another target or with another profile) can run them when it is the
/// agent. List each function with its argument types (and, for the reader,
/// its result); the compiler checks the list against the functions.
///
/// ```
/// fn add(a: u64, b: u64) -> u64 {
///     a + b
/// }
///
/// async fn greet(name: String) -> String {
///     format!("hello, {name}")
/// }
///
/// chopsticks_core::register! {
///     fn add(u64, u64) -> u64;
///     async fn greet(String) -> String;
/// }
/// ```
///
/// A function registered in one build and not the other, or with other
/// types, is refused with an error naming it; it never runs.
#[macro_export]
macro_rules! register {
    () => {};
    (fn $name:ident ( $($arg:ty),* $(,)? ) $(-> $ret:ty)? ; $($rest:tt)*) => {
        const _: () = {
            #[$crate::__private::linkme::distributed_slice($crate::__private::named::NAMED)]
            #[linkme(crate = $crate::__private::linkme)]
            static NAMED_FUNCTION: $crate::__private::named::NamedFunction =
                $crate::__private::named::NamedFunction::blocking::<_, ($($arg,)*)>(
                    concat!(module_path!(), "::", stringify!($name)),
                    $name,
                );
        };
        $crate::__chopsticks_returns!($name ($($arg),*) $(-> $ret)?);
        $crate::register!($($rest)*);
    };
    (async fn $name:ident ( $($arg:ty),* $(,)? ) $(-> $ret:ty)? ; $($rest:tt)*) => {
        const _: () = {
            #[$crate::__private::linkme::distributed_slice($crate::__private::named::NAMED)]
            #[linkme(crate = $crate::__private::linkme)]
            static NAMED_FUNCTION: $crate::__private::named::NamedFunction =
                $crate::__private::named::NamedFunction::asynchronous::<_, ($($arg,)*)>(
                    concat!(module_path!(), "::", stringify!($name)),
                    $name,
                );
        };
        $crate::register!($($rest)*);
    };
}

/// Checks the result type a [`register!`] line states, if it states one.
#[doc(hidden)]
#[macro_export]
macro_rules! __chopsticks_returns {
    ($name:ident ($($arg:ty),*)) => {};
    ($name:ident ($($arg:ty),*) -> $ret:ty) => {
        const _: fn($($arg),*) -> $ret = $name;
    };
}
