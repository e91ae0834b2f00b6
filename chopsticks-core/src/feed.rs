//! The controller's side of input streams: a call whose first argument is
//! a [`Receiver`](crate::Receiver) or [`ByteReceiver`](crate::ByteReceiver),
//! fed from a `Stream` while the call runs ([`Tunnel::call_with_input`]).
//!
//! The call and its feeding run in one future: the input's items are
//! encoded into an [`Outflow`] (which holds the stream back while the
//! agent's credit is used up) and sent as STREAM frames, then `InputEnd`.
//! When the call's reply comes, the feeding stops; dropping the future
//! cancels the call and drops the input stream.

use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use serde::de::DeserializeOwned;

use crate::connection::{Answer, InputSender};
use crate::error::{Error, Result, ValueAction, ValuePart};
use crate::flow::{End, Out, Outflow, WINDOW};
use crate::input::InputEnd;
use crate::protocol::{CallMode, FunctionRef, decode_value};
use crate::tunnel::Tunnel;

/// Runs the call and feeds `input` to it; returns the call's result.
pub(crate) async fn call_with_input<R, I, S>(
    tunnel: &Tunnel,
    function: FunctionRef,
    mode: CallMode,
    args: std::result::Result<Vec<u8>, String>,
    input: S,
) -> Result<R>
where
    R: DeserializeOwned,
    I: InputEnd,
    S: Stream<Item = I::Item> + Send,
    I::Item: Send,
{
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
    let connection = tunnel.connection().await?;
    let reference = connection.callable(&function, mode, &args)?;
    let mut request = connection.request()?;
    let flow = open_input(&request);
    request.send_call(&reference, mode, args, false).await;
    let feeding = feed::<I, S>(input, flow);
    let mut feeding = std::pin::pin!(feeding);
    let mut fed = false;
    let answer = loop {
        tokio::select! {
            answer = request.answer() => break answer?,
            outcome = &mut feeding, if !fed => {
                fed = true;
                if let Err((index, message)) = outcome {
                    return Err(value_error(ValuePart::Item(index), ValueAction::Encode, message));
                }
            }
        }
    };
    let encoded = match answer {
        Answer::Value(value) => value,
        Answer::Failed(failure) => return Err(Error::remote(host, function.name(), failure)),
    };
    decode_value(&encoded)
        .map_err(|message| value_error(ValuePart::Result, ValueAction::Decode, message))
}

/// Announces `request`'s input and returns the flow that sends it as the
/// agent's credit allows; call before the request's call is sent.
pub(crate) fn open_input<C: std::ops::Deref<Target = crate::connection::Connection>>(
    request: &crate::connection::Request<C>,
) -> Arc<Outflow> {
    let sender = Arc::new(std::sync::OnceLock::<InputSender>::new());
    let sends = sender.clone();
    let flow = Arc::new(Outflow::new(
        WINDOW,
        Box::new(move |out| {
            if let Some(sender) = sends.get() {
                match out {
                    Out::Data(data) => sender.data(data),
                    Out::End(..) => sender.end(),
                    Out::Cancelled(_) => {}
                }
            }
        }),
    ));
    let _ = sender.set(request.open_input(flow.clone()));
    flow
}

/// What feeding an input ends with: an item that could not be encoded, by index.
pub(crate) type Feeding<'t> = std::pin::Pin<
    Box<dyn std::future::Future<Output = std::result::Result<(), (u64, String)>> + Send + 't>,
>;

/// Encodes `input` into `flow`, which sends what the agent's credit
/// allows; an item that cannot be encoded stops it with the item's index.
pub(crate) async fn feed<I, S>(
    input: S,
    flow: Arc<Outflow>,
) -> std::result::Result<(), (u64, String)>
where
    I: InputEnd,
    S: Stream<Item = I::Item>,
{
    let pushing = async {
        let mut input = std::pin::pin!(input);
        let mut encoded = Vec::new();
        let mut index = 0;
        while let Some(item) = input.next().await {
            match I::push(item, &flow, &mut encoded).await {
                Ok(Ok(())) => index += 1,
                Ok(Err(_stopped)) => return Ok(()),
                Err(message) => {
                    flow.cancel();
                    return Err((index, message));
                }
            }
        }
        flow.finish(End::Finished);
        Ok(())
    };
    let (pushed, ()) = futures_util::future::join(pushing, flow.flush()).await;
    pushed
}
