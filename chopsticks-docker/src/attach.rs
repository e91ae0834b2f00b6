//! The Engine's attach stream as the tunnel's stdout and stderr.
//!
//! The Engine multiplexes both outputs on one stream. The stdout reader
//! polls that stream itself and hands stderr frames to the stderr reader
//! through a channel, so stdout bytes go from the HTTP body to the protocol
//! decoder without another task or copy.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bollard::container::LogOutput;
use bytes::{Buf, Bytes};
use chopsticks_core::{AgentProcess, Pipes};
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;

/// The Engine's output stream of an attach or an exec.
pub(crate) type Output =
    Pin<Box<dyn Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>;

/// The tunnel's pipes for an attached container or exec.
pub(crate) fn pipes(
    output: Output,
    input: Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
    process: Box<dyn AgentProcess>,
) -> Pipes {
    let (stderr, lines) = mpsc::unbounded_channel();
    Pipes {
        stdin: Box::new(input),
        stdout: Box::new(StdoutReader {
            output,
            pending: Bytes::new(),
            stderr: Some(stderr),
        }),
        stderr: Some(Box::new(StderrReader {
            lines,
            pending: Bytes::new(),
        })),
        process,
    }
}

fn copy_out(pending: &mut Bytes, buffer: &mut ReadBuf<'_>) {
    let count = pending.len().min(buffer.remaining());
    buffer.put_slice(&pending[..count]);
    pending.advance(count);
}

struct StdoutReader {
    output: Output,
    pending: Bytes,
    /// Dropped at the end of the stream, which ends stderr too.
    stderr: Option<mpsc::UnboundedSender<Bytes>>,
}

impl AsyncRead for StdoutReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.pending.is_empty() {
                copy_out(&mut this.pending, buffer);
                return Poll::Ready(Ok(()));
            }
            match ready!(this.output.poll_next_unpin(cx)) {
                Some(Ok(LogOutput::StdOut { message } | LogOutput::Console { message })) => {
                    this.pending = message;
                }
                Some(Ok(LogOutput::StdErr { message })) => {
                    if let Some(stderr) = &this.stderr {
                        let _ = stderr.send(message);
                    }
                }
                Some(Ok(LogOutput::StdIn { .. })) => {}
                Some(Err(error)) => {
                    this.stderr = None;
                    return Poll::Ready(Err(io::Error::other(error.to_string())));
                }
                None => {
                    this.stderr = None;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

struct StderrReader {
    lines: mpsc::UnboundedReceiver<Bytes>,
    pending: Bytes,
}

impl AsyncRead for StderrReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.pending.is_empty() {
            match ready!(this.lines.poll_recv(cx)) {
                Some(bytes) => this.pending = bytes,
                None => return Poll::Ready(Ok(())),
            }
        }
        copy_out(&mut this.pending, buffer);
        Poll::Ready(Ok(()))
    }
}
