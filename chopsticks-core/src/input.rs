//! Input streams: a remote function's [`Receiver`] (items) or
//! [`ByteReceiver`] (raw bytes), fed by the controller from any `Stream`
//! ([`Tunnel::call_with_input`](crate::Tunnel::call_with_input)).
//!
//! The controller announces the input with
//! [`Message::Input`](crate::protocol::Message::Input) before the call, so
//! the agent has somewhere to put data that arrives before the function
//! starts. The data comes as STREAM frames under the call's id, paced by
//! the agent's credit (see [`flow`](crate::flow)); `InputEnd` ends it. On
//! the agent, the function's argument is bound to the call's input while
//! its arguments are decoded ([`provide`]).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::flow::{Allowance, Grants, ItemReader, Outflow, Stopped};

/// The agent's end of one call's input: what arrived and not yet taken.
pub struct InputQueue {
    state: Mutex<InState>,
    arrived: Condvar,
    allowance: Allowance,
    /// Gives the controller credit back.
    credit: Box<dyn Fn(u64) + Send + Sync>,
}

impl std::fmt::Debug for InputQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InputQueue").finish_non_exhaustive()
    }
}

#[derive(Default)]
struct InState {
    queue: VecDeque<Bytes>,
    ended: bool,
    /// The async taker waiting for data.
    waker: Option<Waker>,
}

impl InState {
    fn wake(&mut self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

impl InputQueue {
    /// A queue whose consumer gives credit back through `credit`.
    pub fn new(credit: impl Fn(u64) + Send + Sync + 'static) -> Arc<InputQueue> {
        Arc::new(InputQueue {
            state: Mutex::new(InState::default()),
            arrived: Condvar::new(),
            allowance: Allowance::default(),
            credit: Box::new(credit),
        })
    }

    fn lock(&self) -> MutexGuard<'_, InState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Queues data from the controller; an error when it had no credit for it.
    pub fn receive(&self, data: Bytes) -> Result<(), String> {
        self.allowance.receive(data.len())?;
        let mut state = self.lock();
        if !state.ended {
            state.queue.push_back(data);
        }
        state.wake();
        drop(state);
        self.arrived.notify_all();
        Ok(())
    }

    /// The input ended (or its call did): takers get what is queued, then the end.
    pub fn end(&self) {
        let mut state = self.lock();
        state.ended = true;
        state.wake();
        drop(state);
        self.arrived.notify_all();
    }

    /// The call was cancelled or ended: what is queued is dropped, and
    /// takers get the end at once.
    pub fn close(&self) {
        let mut state = self.lock();
        state.ended = true;
        state.queue.clear();
        state.wake();
        drop(state);
        self.arrived.notify_all();
    }

    /// The next piece, waiting on this thread; `None` at the end.
    fn take_blocking(&self) -> Option<Bytes> {
        let mut state = self.lock();
        loop {
            if let Some(data) = state.queue.pop_front() {
                return Some(data);
            }
            if state.ended {
                return None;
            }
            state = self
                .arrived
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let mut state = self.lock();
        if let Some(data) = state.queue.pop_front() {
            return Poll::Ready(Some(data));
        }
        if state.ended {
            return Poll::Ready(None);
        }
        state.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    fn taken(&self, grants: &mut Grants, len: usize) {
        if let Some(credit) = grants.taken(len) {
            self.allowance.grant(credit);
            (self.credit)(credit);
        }
    }
}

thread_local! {
    /// The input of the call whose arguments this thread decodes.
    static PROVIDED: RefCell<Option<Arc<InputQueue>>> = const { RefCell::new(None) };
}

/// `future`, whose first poll (where an async function decodes its
/// arguments) runs with `input` provided, as [`provide`] does.
pub fn providing<F: Future>(
    input: Option<Arc<InputQueue>>,
    future: F,
) -> impl Future<Output = F::Output> {
    let mut input = Some(input);
    let mut future = Box::pin(future);
    std::future::poll_fn(move |cx| match input.take() {
        Some(input) => provide(input, || future.as_mut().poll(cx)),
        None => future.as_mut().poll(cx),
    })
}

/// Runs `decode` with `input` as the input a [`Receiver`] or
/// [`ByteReceiver`] argument binds to.
pub fn provide<R>(input: Option<Arc<InputQueue>>, decode: impl FnOnce() -> R) -> R {
    let previous = PROVIDED.with(|provided| std::mem::replace(&mut *provided.borrow_mut(), input));
    let result = decode();
    PROVIDED.with(|provided| *provided.borrow_mut() = previous);
    result
}

fn take_provided<E: serde::de::Error>(what: &str) -> Result<Arc<InputQueue>, E> {
    PROVIDED
        .with(|provided| provided.borrow_mut().take())
        .ok_or_else(|| {
            E::custom(format!(
                "a {what} argument is bound only by Tunnel::call_with_input, once per call"
            ))
        })
}

/// A remote function's input: the items the controller feeds from a
/// `Stream` with [`Tunnel::call_with_input`](crate::Tunnel::call_with_input),
/// as they come.
///
/// Take it as the function's first argument. It is an [`Iterator`], which
/// waits on its thread (for a plain `fn`, on the agent's pool); an `async
/// fn` awaits [`recv`](Self::recv) instead. It ends when the controller's
/// stream ends. The controller sends no more than the
/// receiver's window ahead of what the function took, so a slow function
/// holds the feeding stream back.
///
/// An item that does not decode as `T` ends the input; [`error`](Self::error)
/// then says why.
pub struct Receiver<T> {
    queue: Option<Arc<InputQueue>>,
    reader: ItemReader,
    grants: Grants,
    error: Option<String>,
    item: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("bound", &self.queue.is_some())
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<T> Receiver<T> {
    /// The placeholder the controller sends in the argument tuple.
    pub(crate) fn placeholder() -> Receiver<T> {
        Receiver {
            queue: None,
            reader: ItemReader::default(),
            grants: Grants::default(),
            error: None,
            item: PhantomData,
        }
    }

    /// Why the input ended early: an item that did not decode.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    fn next_decoded(&mut self) -> Option<Result<T, ()>>
    where
        T: DeserializeOwned,
    {
        let item = self.reader.next_item()?;
        Some(crate::protocol::decode_value(&item).map_err(|message| {
            self.error = Some(format!("an input item did not decode: {message}"));
            self.queue = None;
        }))
    }

    fn add(&mut self, data: Bytes) {
        self.reader.extend(&data);
        if let Some(queue) = &self.queue {
            queue.taken(&mut self.grants, data.len());
        }
    }
}

impl<T: DeserializeOwned> Iterator for Receiver<T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        loop {
            if let Some(item) = self.next_decoded() {
                return item.ok();
            }
            let data = self.queue.as_ref()?.take_blocking();
            match data {
                Some(data) => self.add(data),
                None => {
                    self.queue = None;
                    return None;
                }
            }
        }
    }
}

impl<T: DeserializeOwned> Receiver<T> {
    /// The next item, waiting without blocking the thread (in an `async
    /// fn`); `None` at the end of the input.
    pub async fn recv(&mut self) -> Option<T> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Polls for the next item, as [`recv`](Self::recv) waits for it.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let this = self;
        loop {
            if let Some(item) = this.next_decoded() {
                return Poll::Ready(item.ok());
            }
            let Some(queue) = &this.queue else {
                return Poll::Ready(None);
            };
            match std::task::ready!(queue.poll_take(cx)) {
                Some(data) => this.add(data),
                None => {
                    this.queue = None;
                    return Poll::Ready(None);
                }
            }
        }
    }
}

impl<T> Serialize for Receiver<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_unit()
    }
}

impl<'de, T> Deserialize<'de> for Receiver<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        <()>::deserialize(deserializer)?;
        let mut receiver = Receiver::placeholder();
        receiver.queue = Some(take_provided("Receiver")?);
        Ok(receiver)
    }
}

/// A remote function's input of raw bytes (a process's stdin, a file read
/// by the function), fed by the controller with
/// [`Tunnel::call_with_input`](crate::Tunnel::call_with_input) from a
/// stream of [`Bytes`]. The bytes move in raw frames, never as one value.
///
/// It is an [`Iterator`] of the pieces as they arrive and a
/// [`std::io::Read`], both waiting on their thread; an `async fn` awaits
/// [`recv`](Self::recv) instead.
pub struct ByteReceiver {
    queue: Option<Arc<InputQueue>>,
    grants: Grants,
    /// What a `read` took and has not returned yet.
    current: Bytes,
}

impl std::fmt::Debug for ByteReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ByteReceiver")
            .field("bound", &self.queue.is_some())
            .finish_non_exhaustive()
    }
}

impl ByteReceiver {
    pub(crate) fn placeholder() -> ByteReceiver {
        ByteReceiver {
            queue: None,
            grants: Grants::default(),
            current: Bytes::new(),
        }
    }

    fn took(&mut self, data: &Bytes) {
        if let Some(queue) = &self.queue {
            queue.taken(&mut self.grants, data.len());
        }
    }
}

impl Iterator for ByteReceiver {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        if !self.current.is_empty() {
            return Some(std::mem::take(&mut self.current));
        }
        let data = self.queue.as_ref()?.take_blocking();
        match data {
            Some(data) => {
                self.took(&data);
                Some(data)
            }
            None => {
                self.queue = None;
                None
            }
        }
    }
}

impl ByteReceiver {
    /// The next piece, waiting without blocking the thread (in an `async
    /// fn`); `None` at the end of the input.
    pub async fn recv(&mut self) -> Option<Bytes> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Polls for the next piece, as [`recv`](Self::recv) waits for it.
    pub fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let this = self;
        if !this.current.is_empty() {
            return Poll::Ready(Some(std::mem::take(&mut this.current)));
        }
        let Some(queue) = &this.queue else {
            return Poll::Ready(None);
        };
        match std::task::ready!(queue.poll_take(cx)) {
            Some(data) => {
                this.took(&data);
                Poll::Ready(Some(data))
            }
            None => {
                this.queue = None;
                Poll::Ready(None)
            }
        }
    }
}

impl std::io::Read for ByteReceiver {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        if self.current.is_empty() {
            match Iterator::next(self) {
                Some(data) => self.current = data,
                None => return Ok(0),
            }
        }
        let len = buffer.len().min(self.current.len());
        buffer[..len].copy_from_slice(&self.current.split_to(len));
        Ok(len)
    }
}

impl Serialize for ByteReceiver {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_unit()
    }
}

impl<'de> Deserialize<'de> for ByteReceiver {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        <()>::deserialize(deserializer)?;
        let mut receiver = ByteReceiver::placeholder();
        receiver.queue = Some(take_provided("ByteReceiver")?);
        Ok(receiver)
    }
}

mod sealed {
    /// Only [`Receiver`](super::Receiver) and [`ByteReceiver`](super::ByteReceiver) are inputs.
    pub trait Sealed {}
}

impl<T> sealed::Sealed for Receiver<T> {}
impl sealed::Sealed for ByteReceiver {}

/// A function's input argument, [`Receiver`] or [`ByteReceiver`]: what the
/// controller's stream yields, and how it travels. Sealed.
pub trait InputEnd: sealed::Sealed + Serialize + DeserializeOwned {
    /// What the controller's stream yields.
    type Item;
    /// The placeholder sent in the argument tuple.
    #[doc(hidden)]
    fn placeholder() -> Self;
    /// Puts `item` into `flow` as the input stream carries it, using
    /// `scratch` to encode; an error when it cannot be encoded.
    #[doc(hidden)]
    fn push(
        item: Self::Item,
        flow: &Outflow,
        scratch: &mut Vec<u8>,
    ) -> impl Future<Output = Result<Result<(), Stopped>, String>> + Send;
}

impl<T: Serialize + DeserializeOwned> InputEnd for Receiver<T>
where
    T: Send,
{
    type Item = T;
    fn placeholder() -> Self {
        Receiver::placeholder()
    }
    async fn push(
        item: T,
        flow: &Outflow,
        scratch: &mut Vec<u8>,
    ) -> Result<Result<(), Stopped>, String> {
        scratch.clear();
        crate::cbor::append_to(&item, scratch).map_err(|error| error.to_string())?;
        drop(item);
        if scratch.len() > crate::flow::MAX_ITEM_LEN {
            return Err(format!(
                "an input item of {} bytes is too large",
                scratch.len()
            ));
        }
        Ok(flow.push_item(scratch).await)
    }
}

impl InputEnd for ByteReceiver {
    type Item = Bytes;
    fn placeholder() -> Self {
        ByteReceiver::placeholder()
    }
    async fn push(
        item: Bytes,
        flow: &Outflow,
        _scratch: &mut Vec<u8>,
    ) -> Result<Result<(), Stopped>, String> {
        Ok(flow.push_chunk(item).await)
    }
}

/// An argument tuple without its first element, the input: `(A2, ..)` for
/// a function taking `(Receiver<T>, A2, ..)`.
pub trait WithInput<I> {
    /// The whole tuple, with the input first.
    type Whole;
    /// Puts `input` in front.
    fn with_input(self, input: I) -> Self::Whole;
}

macro_rules! impl_with_input {
    ($($arg:ident),*) => {
        impl<I, $($arg,)*> WithInput<I> for ($($arg,)*) {
            type Whole = (I, $($arg,)*);
            #[allow(non_snake_case)]
            fn with_input(self, input: I) -> Self::Whole {
                let ($($arg,)*) = self;
                (input, $($arg,)*)
            }
        }
    };
}

impl_with_input!();
impl_with_input!(A2);
impl_with_input!(A2, A3);
impl_with_input!(A2, A3, A4);
impl_with_input!(A2, A3, A4, A5);
impl_with_input!(A2, A3, A4, A5, A6);
impl_with_input!(A2, A3, A4, A5, A6, A7);
impl_with_input!(A2, A3, A4, A5, A6, A7, A8);
