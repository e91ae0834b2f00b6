//! The descriptor the protocol is written to, as the `AsyncWrite` sink of
//! core's outbox with direct writes (`Outbox::with_direct_writes`): the
//! writer task drains the outbox into it, and a pool thread may write a
//! small reply itself when the writer is idle and nothing is queued ahead
//! of it (`Outbox::send_or_write_now`), one thread hand-off fewer per call.
//! The same direct writer serves the controller's end, tested once in core.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use chopsticks_core::__private::wire::INLINE_LIMIT;
use tokio::io::AsyncWrite;

/// The protocol output: a pipe, or a socket where the transport gave one.
pub(crate) enum Sink {
    Pipe(tokio::net::unix::pipe::Sender),
    Socket(tokio::net::UnixStream),
}

impl AsyncWrite for Sink {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        if bytes.len() > INLINE_LIMIT {
            // A chunk or a large frame: bulk data is leaving.
            crate::pipe_size::bulk();
        }
        match self.get_mut() {
            Sink::Pipe(pipe) => Pin::new(pipe).poll_write(cx, bytes),
            Sink::Socket(socket) => Pin::new(socket).poll_write(cx, bytes),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Sink::Pipe(pipe) => Pin::new(pipe).poll_flush(cx),
            Sink::Socket(socket) => Pin::new(socket).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Sink::Pipe(pipe) => Pin::new(pipe).poll_shutdown(cx),
            Sink::Socket(socket) => Pin::new(socket).poll_shutdown(cx),
        }
    }
}
