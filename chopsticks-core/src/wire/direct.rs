//! Direct writes: a small frame written by the caller's own thread when the
//! writer task is idle.
//!
//! A frame normally reaches the agent through the [`Outbox`](super::Outbox)
//! and the writer task. When the caller is not a runtime worker (a
//! `block_on`, as in `#[tokio::main]`), handing the frame to the writer costs
//! a thread wake-up on every call. So a sender may ask for a small frame to
//! be written at once ([`Outbox::send_or_write_now`](super::Outbox::send_or_write_now)),
//! with one nonblocking write, when the stream is at a frame boundary and
//! nothing is queued ahead of it. Calls ask only when no other call is in
//! flight: under load, queued frames are batched into fewer writes.
//!
//! The state, under one lock:
//!
//! - `busy`: the writer task has written part of a batch and not yet
//!   flushed it. Its writes set it and the flush that ends each batch clears
//!   it; `write_frames` flushes only after whole frames.
//! - `queued`: small frames queued and not yet written. Queueing happens
//!   under the same lock, so a direct write never overtakes a small frame
//!   sent before it (a call before its cancel, calls before a shutdown). The
//!   writer counts them off once per batch, after writing it and before the
//!   flush, so one lock serves the whole batch.
//! - `tail`: the unwritten end of a direct write the pipe cut short, written
//!   before anything else.
//!
//! Bulk frames are not counted: small frames overtake them by design.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker, ready};

use bytes::{Buf, Bytes};
use tokio::io::AsyncWrite;

/// The stream to the agent, as the transport gave it.
pub type Sink = Box<dyn AsyncWrite + Send + Unpin>;

#[derive(Default)]
struct State {
    /// `None` once closed: the agent's stdin is shut.
    sink: Option<Sink>,
    busy: bool,
    queued: usize,
    tail: Option<Bytes>,
}

/// The agent's stdin, shared by the writer task and direct writers.
pub struct DirectWriter {
    state: Mutex<State>,
}

impl std::fmt::Debug for DirectWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // try_lock: formatting must not wait on (or deadlock with) a writer.
        match self.state.try_lock() {
            Ok(state) => f
                .debug_struct("DirectWriter")
                .field("open", &state.sink.is_some())
                .field("busy", &state.busy)
                .field("queued", &state.queued)
                .field("tail", &state.tail.as_ref().map(Bytes::len))
                .finish(),
            Err(_) => f.write_str("DirectWriter { .. }"),
        }
    }
}

impl DirectWriter {
    pub(super) fn new(sink: Sink) -> Arc<DirectWriter> {
        Arc::new(DirectWriter {
            state: Mutex::new(State {
                sink: Some(sink),
                ..State::default()
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Writes `frame` now if it is given and the stream is idle at a frame
    /// boundary with nothing queued. Otherwise `queue_frame` queues it; if a direct write
    /// leaves a tail or an unfinished flush, `queue_wake_up` queues an empty
    /// frame so that the writer task finishes the job. Both run under the
    /// lock, so the queue order is the order of the calls.
    pub(super) fn send<E>(
        &self,
        frame: Option<&[u8]>,
        queue_frame: impl FnOnce() -> Result<(), E>,
        queue_wake_up: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), E> {
        let mut state = self.lock();
        let idle = !state.busy && state.queued == 0 && state.tail.is_none();
        if let (true, Some(bytes), Some(sink)) = (idle, frame, state.sink.as_mut()) {
            let mut context = Context::from_waker(Waker::noop());
            // A full pipe or an error leaves the frame to the writer task.
            if let Poll::Ready(Ok(written)) = Pin::new(&mut **sink).poll_write(&mut context, bytes)
                && written > 0
            {
                let flushed = matches!(
                    Pin::new(&mut **sink).poll_flush(&mut context),
                    Poll::Ready(Ok(()))
                );
                if written < bytes.len() {
                    state.tail = Some(Bytes::copy_from_slice(&bytes[written..]));
                }
                if written < bytes.len() || !flushed {
                    state.queued += 1;
                    return queue_wake_up();
                }
                return Ok(());
            }
        }
        state.queued += 1;
        queue_frame()
    }

    /// The writer task wrote `small_frames` queued small frames; it is busy
    /// (its writes set `busy`) until the flush that ends the batch.
    pub(super) fn written(&self, small_frames: usize) {
        let mut state = self.lock();
        state.queued = state.queued.saturating_sub(small_frames);
    }

    /// Shuts the stream: the agent sees the end of its input.
    pub fn close(&self) {
        let sink = self.lock().sink.take();
        drop(sink);
    }

    /// Writes as much of the tail as the sink takes; Ready once it is gone.
    fn poll_tail(state: &mut State, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let State { sink, tail, .. } = state;
        while let Some(rest) = tail.as_mut() {
            let Some(sink) = sink.as_mut() else {
                return Poll::Ready(Err(closed()));
            };
            let written = ready!(Pin::new(&mut **sink).poll_write(cx, rest))?;
            if written == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            rest.advance(written);
            if rest.is_empty() {
                *tail = None;
            }
        }
        Poll::Ready(Ok(()))
    }
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the agent's stdin was closed")
}

/// The writer task's handle on a [`DirectWriter`].
pub struct SharedSink(pub(super) Arc<DirectWriter>);

impl SharedSink {
    /// Shuts the stream: the agent sees the end of its input.
    pub fn close(&self) {
        self.0.close();
    }
}

/// The writer task dropped before it finished (its runtime shut down, say)
/// still shuts the stream, as dropping the sink itself would.
impl Drop for SharedSink {
    fn drop(&mut self) {
        self.close();
    }
}

impl AsyncWrite for SharedSink {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut state = self.0.lock();
        state.busy = true;
        ready!(DirectWriter::poll_tail(&mut state, cx))?;
        match state.sink.as_mut() {
            Some(sink) => Pin::new(&mut **sink).poll_write(cx, bytes),
            None => Poll::Ready(Err(closed())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = self.0.lock();
        ready!(DirectWriter::poll_tail(&mut state, cx))?;
        if let Some(sink) = state.sink.as_mut() {
            ready!(Pin::new(&mut **sink).poll_flush(cx))?;
        }
        // write_frames flushes only after whole frames: direct writes may go now.
        state.busy = false;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut state = self.0.lock();
        ready!(DirectWriter::poll_tail(&mut state, cx))?;
        match state.sink.as_mut() {
            Some(sink) => Pin::new(&mut **sink).poll_shutdown(cx),
            None => Poll::Ready(Ok(())),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, DuplexStream};

    use super::super::{OutFrame, Outbox, write_frames};
    use crate::protocol::Message;

    fn cancel(id: u64) -> OutFrame {
        OutFrame::message(&Message::Cancel { id })
    }

    /// Reads exactly the bytes of `frames`, in order, from `reader`.
    async fn expect_frames(reader: &mut DuplexStream, frames: &[OutFrame]) {
        let expected: Vec<u8> = frames.iter().flat_map(OutFrame::to_bytes).collect();
        let mut got = vec![0; expected.len()];
        reader.read_exact(&mut got).await.expect("read");
        assert_eq!(got, expected);
    }

    #[tokio::test]
    async fn an_idle_writer_lets_the_sender_write_at_once() {
        let (sink, mut agent) = tokio::io::duplex(1 << 16);
        let (outbox, _receiver, _sink) = Outbox::with_direct_writes(Box::new(sink));
        // No writer task runs: the frame can only arrive by a direct write.
        outbox.send_or_write_now(cancel(1)).expect("send");
        expect_frames(&mut agent, &[cancel(1)]).await;
    }

    #[tokio::test]
    async fn a_direct_write_never_overtakes_a_queued_frame() {
        let frame_len = cancel(1).to_bytes().len();
        // Room for one frame: the second finds the pipe full and is queued.
        let (sink, mut agent) = tokio::io::duplex(frame_len);
        let (outbox, receiver, mut shared) = Outbox::with_direct_writes(Box::new(sink));
        outbox.send_or_write_now(cancel(1)).expect("direct");
        outbox
            .send_or_write_now(cancel(2))
            .expect("queued: the pipe is full");
        expect_frames(&mut agent, &[cancel(1)]).await;
        // The pipe has room again, but frame 2 is still queued: 3 must wait behind it.
        outbox
            .send_or_write_now(cancel(3))
            .expect("queued behind 2");
        drop(outbox);
        let writer = tokio::spawn(async move { write_frames(receiver, &mut shared).await });
        expect_frames(&mut agent, &[cancel(2), cancel(3)]).await;
        writer.await.expect("join").expect("write");
    }

    #[tokio::test]
    async fn a_cut_short_write_is_finished_before_the_next_frame() {
        let long = OutFrame::message(&Message::Cancel { id: u64::MAX });
        let (sink, mut agent) = tokio::io::duplex(4);
        let (outbox, receiver, mut shared) = Outbox::with_direct_writes(Box::new(sink));
        outbox
            .send_or_write_now(long.clone())
            .expect("partly direct");
        outbox
            .send_or_write_now(cancel(7))
            .expect("queued behind the tail");
        drop(outbox);
        let writer = tokio::spawn(async move { write_frames(receiver, &mut shared).await });
        expect_frames(&mut agent, &[long, cancel(7)]).await;
        writer.await.expect("join").expect("write");
    }

    #[tokio::test]
    async fn a_plain_send_is_queued_and_holds_back_later_direct_writes() {
        let (sink, mut agent) = tokio::io::duplex(1 << 16);
        let (outbox, receiver, mut shared) = Outbox::with_direct_writes(Box::new(sink));
        outbox.send(cancel(1)).expect("queued");
        outbox
            .send_or_write_now(cancel(2))
            .expect("queued behind 1");
        drop(outbox);
        let writer = tokio::spawn(async move { write_frames(receiver, &mut shared).await });
        expect_frames(&mut agent, &[cancel(1), cancel(2)]).await;
        writer.await.expect("join").expect("write");
    }

    #[tokio::test]
    async fn closing_the_sink_ends_the_agents_input() {
        let (sink, mut agent) = tokio::io::duplex(64);
        let (outbox, _receiver, _shared) = Outbox::with_direct_writes(Box::new(sink));
        outbox.close_sink();
        let mut rest = Vec::new();
        agent.read_to_end(&mut rest).await.expect("read");
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn a_writer_dropped_unfinished_still_ends_the_agents_input() {
        let (sink, mut agent) = tokio::io::duplex(64);
        // The outbox (and its share of the sink) outlives the writer's handle.
        let (_outbox, receiver, shared) = Outbox::with_direct_writes(Box::new(sink));
        drop((receiver, shared));
        let mut rest = Vec::new();
        agent.read_to_end(&mut rest).await.expect("read");
        assert!(rest.is_empty());
    }
}
