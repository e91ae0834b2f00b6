//! [`CallStream`]: the items of a streaming call, as they come.
//!
//! The call is sent on the first poll. Its items arrive as STREAM frames
//! (see [`flow`](crate::flow)), which the connection's reader hands to this
//! stream as they come; the stream cuts them into items, decodes each when
//! it is polled, and gives the agent credit back as it takes data, so an
//! unpolled stream holds the producer back. The agent's final reply ends
//! it: the item count, or the failure. Dropping the stream cancels the call.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::connection::{Answer, Connection, Request};
use crate::error::{Error, Result, ValueAction, ValuePart};
use crate::feed::{Feeding, feed, open_input};
use crate::flow::{Grants, ItemReader, Outflow};
use crate::input::InputEnd;
use crate::protocol::{CallMode, FunctionRef, decode_value};
use crate::tunnel::Tunnel;

/// The items of a streaming call ([`Tunnel::call_stream`],
/// [`Tunnel::call_stream_async`]), as a [`Stream`] of
/// `chopsticks::Result<T>`.
///
/// Nothing is sent until the stream is first polled. Items come in the
/// order the function yields them, each as soon as it is produced. The
/// stream ends after the last item; a failure on the agent (a panic, an
/// item that cannot be encoded) ends it with [`Error::Remote`], whose
/// message says how many items came before, and a lost agent with
/// [`Error::Disconnected`]. After an error the stream yields nothing more.
///
/// An unpolled stream holds the function back: at most a window of items
/// ([`WINDOW`](crate::flow::WINDOW) bytes, encoded) is in flight. Dropping
/// the stream stops the function on the agent: an iterator is not advanced
/// again and a `Stream` is not polled again.
#[must_use = "a streaming call does nothing until it is polled"]
pub struct CallStream<'t, T> {
    host: &'t str,
    function: &'static str,
    items: Pin<Box<dyn Stream<Item = Result<T>> + Send + 't>>,
}

impl<T> std::fmt::Debug for CallStream<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallStream")
            .field("host", &self.host)
            .field("function", &self.function)
            .finish_non_exhaustive()
    }
}

/// How a stream's data becomes what it yields: CBOR items behind their
/// lengths, or each piece of a byte stream as it came.
#[derive(Debug, Clone, Copy)]
enum Framing<T> {
    Items(fn(&[u8]) -> std::result::Result<T, String>),
    Bytes(fn(Bytes) -> T),
}

impl<'t> CallStream<'t, Bytes> {
    /// The pieces of a byte stream, as they come.
    pub(crate) fn bytes(
        tunnel: &'t Tunnel,
        function: FunctionRef,
        args: std::result::Result<Vec<u8>, String>,
    ) -> Self {
        Self::framed(
            tunnel,
            function,
            CallMode::BlockingStream,
            args,
            Framing::Bytes(|bytes| bytes),
            None,
        )
    }
}

impl<'t, T: DeserializeOwned + Send + 't> CallStream<'t, T> {
    pub(crate) fn new(
        tunnel: &'t Tunnel,
        function: FunctionRef,
        mode: CallMode,
        args: std::result::Result<Vec<u8>, String>,
    ) -> Self {
        Self::framed(
            tunnel,
            function,
            mode,
            args,
            Framing::Items(decode_value),
            None,
        )
    }

    /// A streaming call fed `input` while it runs.
    pub(crate) fn with_input<I, S>(
        tunnel: &'t Tunnel,
        function: FunctionRef,
        args: std::result::Result<Vec<u8>, String>,
        input: S,
    ) -> Self
    where
        I: InputEnd + 't,
        S: futures_util::Stream<Item = I::Item> + Send + 't,
        I::Item: Send,
    {
        let start: StartInput<'t> = Box::new(move |flow| Box::pin(feed::<I, S>(input, flow)));
        Self::framed(
            tunnel,
            function,
            CallMode::BlockingStream,
            args,
            Framing::Items(decode_value),
            Some(start),
        )
    }
}

impl<'t, T: Send + 't> CallStream<'t, T> {
    fn framed(
        tunnel: &'t Tunnel,
        function: FunctionRef,
        mode: CallMode,
        args: std::result::Result<Vec<u8>, String>,
        framing: Framing<T>,
        input: Option<StartInput<'t>>,
    ) -> Self {
        let name = match &function {
            FunctionRef::Offset {
                name: std::borrow::Cow::Borrowed(name),
                ..
            } => name,
            _ => "a function",
        };
        let start = State::Start {
            tunnel,
            function,
            mode,
            args,
            framing,
            input,
        };
        CallStream {
            host: tunnel.host(),
            function: name,
            items: Box::pin(futures_util::stream::unfold(start, State::next)),
        }
    }
}

impl<T> Stream for CallStream<'_, T> {
    type Item = Result<T>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<T>>> {
        self.items.as_mut().poll_next(cx)
    }
}

/// Starts the input of a streaming call, once its request exists.
type StartInput<'t> = Box<dyn FnOnce(Arc<Outflow>) -> Feeding<'t> + Send + 't>;

enum State<'t, T> {
    Start {
        tunnel: &'t Tunnel,
        function: FunctionRef,
        mode: CallMode,
        args: std::result::Result<Vec<u8>, String>,
        framing: Framing<T>,
        input: Option<StartInput<'t>>,
    },
    Running(Running<'t, T>),
    Done,
}

/// A streaming call under way.
struct Running<'t, T> {
    request: Request<Arc<Connection>>,
    /// Its input being fed, until it has all gone.
    feeding: Option<Feeding<'t>>,
    data: mpsc::UnboundedReceiver<Bytes>,
    reader: ItemReader,
    grants: Grants,
    items: u64,
    function: FunctionRef,
    framing: Framing<T>,
}

impl<'t, T> State<'t, T> {
    async fn next(self) -> Option<(Result<T>, State<'t, T>)> {
        let mut running = match self {
            State::Start {
                tunnel,
                function,
                mode,
                args,
                framing,
                input,
            } => match start(tunnel, function, mode, args, framing, input).await {
                Ok(running) => running,
                Err(error) => return Some((Err(error), State::Done)),
            },
            State::Running(running) => running,
            State::Done => return None,
        };
        match running.next_item().await {
            Some(Ok(item)) => Some((Ok(item), State::Running(running))),
            Some(Err(error)) => Some((Err(error), State::Done)),
            None => None,
        }
    }
}

async fn start<'t, T>(
    tunnel: &Tunnel,
    function: FunctionRef,
    mode: CallMode,
    args: std::result::Result<Vec<u8>, String>,
    framing: Framing<T>,
    input: Option<StartInput<'t>>,
) -> Result<Running<'t, T>> {
    let args = args.map_err(|message| Error::Value {
        host: tunnel.host().to_string(),
        function: function.name().to_string(),
        what: ValuePart::Arguments,
        action: ValueAction::Encode,
        message,
    })?;
    let wants_input = input.is_some();
    let connection = tunnel.connection().await?;
    let (request, data, flow) = connection
        .call_stream(&function, mode, args, |request| {
            wants_input.then(|| open_input(request))
        })
        .await?;
    let feeding = input.zip(flow).map(|(start, flow)| start(flow));
    Ok(Running {
        request,
        feeding,
        data,
        reader: ItemReader::default(),
        grants: Grants::default(),
        items: 0,
        function,
        framing,
    })
}

impl<T> Running<'_, T> {
    /// The next item, an error that ends the stream, or `None` at its end.
    async fn next_item(&mut self) -> Option<Result<T>> {
        loop {
            if let Framing::Items(decode) = self.framing
                && let Some(item) = self.reader.next_item()
            {
                self.items += 1;
                return Some(decode(&item).map_err(|message| Error::Value {
                    host: self.request.host().to_string(),
                    function: self.function.name().to_string(),
                    what: ValuePart::Item(self.items - 1),
                    action: ValueAction::Decode,
                    message,
                }));
            }
            let received = match self.feeding.as_mut() {
                None => self.data.recv().await,
                Some(feeding) => tokio::select! {
                    received = self.data.recv() => received,
                    fed = feeding => {
                        self.feeding = None;
                        if let Err((index, message)) = fed {
                            return Some(Err(Error::Value {
                                host: self.request.host().to_string(),
                                function: self.function.name().to_string(),
                                what: ValuePart::Item(index),
                                action: ValueAction::Encode,
                                message: format!("an input item: {message}"),
                            }));
                        }
                        continue;
                    }
                },
            };
            match received {
                Some(data) => {
                    if let Some(credit) = self.grants.taken(data.len()) {
                        self.request.grant(credit);
                    }
                    match self.framing {
                        Framing::Items(_) => self.reader.extend(&data),
                        Framing::Bytes(piece) => {
                            self.items += 1;
                            return Some(Ok(piece(data)));
                        }
                    }
                }
                None => return self.end().await,
            }
        }
    }

    /// The agent's final reply, once all data has been taken.
    async fn end(&mut self) -> Option<Result<T>> {
        let host = self.request.host().to_string();
        let function = self.function.name();
        match self.request.answer().await {
            Ok(Answer::Value(_)) if self.reader.has_partial_item() => Some(Err(Error::Protocol {
                host,
                message: format!(
                    "the stream of {function} ended inside an item, after {} items",
                    self.items
                ),
            })),
            Ok(Answer::Value(_)) => None,
            Ok(Answer::Failed(mut failure)) => {
                failure.message = format!("{} (after {} items)", failure.message, self.items);
                Some(Err(Error::remote(&host, function, failure)))
            }
            Err(error) => Some(Err(error)),
        }
    }
}
