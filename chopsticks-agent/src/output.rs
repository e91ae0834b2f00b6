//! The protocol output, shared by the writer task and the call pool.
//!
//! Replies normally travel through the outbox to the writer task on the I/O
//! runtime. For a small reply that costs an extra thread hand-off (pool
//! thread → I/O thread), which dominates a trivial call when both processes
//! share one CPU. So a pool thread may write a small reply frame itself,
//! with one nonblocking `write`, when the writer is idle at a frame boundary.
//!
//! The writer task marks the output busy from its first write until the
//! flush that ends each batch; `write_frames` flushes only after whole
//! frames. If a direct write is cut short (the pipe is full), the rest
//! becomes the *tail*, which the writer writes before anything else.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use bytes::Buf;
use chopsticks_core::__private::wire::{OutFrame, Outbox};
use tokio::io::AsyncWrite;

/// The descriptor the protocol is written to.
pub(crate) enum Sink {
    Pipe(tokio::net::unix::pipe::Sender),
    Socket(tokio::net::UnixStream),
}

impl Sink {
    fn try_write(&self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Sink::Pipe(pipe) => pipe.try_write(bytes),
            Sink::Socket(socket) => socket.try_write(bytes),
        }
    }

    fn poll_write_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            Sink::Pipe(pipe) => pipe.poll_write_ready(cx),
            Sink::Socket(socket) => socket.poll_write_ready(cx),
        }
    }
}

#[derive(Default)]
struct State {
    /// The writer task is between its first write and the flush that ends a batch.
    busy: bool,
    /// The unwritten end of a direct write; written before anything else.
    tail: Option<bytes::Bytes>,
}

/// The shared output. Cheap to share through `Arc`.
pub(crate) struct Output {
    sink: Sink,
    state: Mutex<State>,
}

impl Output {
    pub(crate) fn new(sink: Sink) -> Arc<Output> {
        Arc::new(Output {
            sink,
            state: Mutex::new(State::default()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Writes `frame` now, from any thread, if the writer is idle. Returns
    /// false when the caller must queue the frame in `outbox` instead.
    pub(crate) fn try_send_now(&self, frame: &OutFrame, outbox: &Outbox) -> bool {
        let Some(bytes) = frame.contiguous() else {
            return false;
        };
        let Ok(mut state) = self.state.try_lock() else {
            return false;
        };
        if state.busy || state.tail.is_some() {
            return false;
        }
        match self.sink.try_write(bytes) {
            Ok(written) if written == bytes.len() => true,
            Ok(written) => {
                state.tail = Some(bytes::Bytes::copy_from_slice(&bytes[written..]));
                drop(state);
                // Wake the writer so that it writes the tail.
                let _ = outbox.send(OutFrame::empty());
                true
            }
            Err(_) => false,
        }
    }

    /// Writes as much of the tail as the descriptor takes; Ready once it is gone.
    fn poll_tail(&self, state: &mut State, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(tail) = state.tail.as_mut() {
            match self.sink.try_write(tail) {
                Ok(written) => {
                    tail.advance(written);
                    if tail.is_empty() {
                        state.tail = None;
                    }
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                    ready!(self.sink.poll_write_ready(cx))?;
                }
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// The writer task's handle on the shared output.
pub(crate) struct OutputWriter(pub(crate) Arc<Output>);

impl AsyncWrite for OutputWriter {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        let output = &*self.0;
        if bytes.len() > chopsticks_core::__private::wire::INLINE_LIMIT {
            // A chunk or a large frame: bulk data is leaving.
            crate::pipe_size::bulk();
        }
        loop {
            let mut state = output.lock();
            state.busy = true;
            ready!(output.poll_tail(&mut state, cx))?;
            match output.sink.try_write(bytes) {
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                result => return Poll::Ready(result),
            }
            drop(state);
            ready!(output.sink.poll_write_ready(cx))?;
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let output = &*self.0;
        let mut state = output.lock();
        ready!(output.poll_tail(&mut state, cx))?;
        // write_frames flushes only after whole frames: direct writes may go now.
        state.busy = false;
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_flush(cx)
    }
}
