//! The [`Outbox`] and its writer: small frames first, at most one chunk per
//! write batch; and [`Assemblies`], which put streamed payloads back together.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::direct::{DirectWriter, SharedSink, Sink};
use super::{
    BATCH_LEN, BULK_QUEUE_LEN, CHUNK_LEN, DIRECT_WRITE_LEN, INLINE_LIMIT, MAX_PAYLOAD_LEN, OutFrame,
};
use crate::protocol::{Message, Payload};

/// The sending half of a connection: cheap to clone, shared by every call.
#[derive(Debug, Clone)]
pub struct Outbox {
    urgent: mpsc::UnboundedSender<OutFrame>,
    bulk: mpsc::Sender<OutFrame>,
    /// Set when small frames may be written by the sender's thread.
    direct: Option<Arc<DirectWriter>>,
}

/// The receiving half of an [`Outbox`], drained by [`write_frames`].
#[derive(Debug)]
pub struct OutboxReceiver {
    urgent: mpsc::UnboundedReceiver<OutFrame>,
    bulk: mpsc::Receiver<OutFrame>,
    direct: Option<Arc<DirectWriter>>,
}

/// The writer has stopped; nothing more can be sent on this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxClosed;

impl Outbox {
    /// A new outbox and the receiver for its writer task.
    pub fn new() -> (Outbox, OutboxReceiver) {
        let (urgent_tx, urgent_rx) = mpsc::unbounded_channel();
        let (bulk_tx, bulk_rx) = mpsc::channel(BULK_QUEUE_LEN);
        (
            Outbox {
                urgent: urgent_tx,
                bulk: bulk_tx,
                direct: None,
            },
            OutboxReceiver {
                urgent: urgent_rx,
                bulk: bulk_rx,
                direct: None,
            },
        )
    }

    /// A new outbox for `sink` whose small frames may be written by the
    /// sender's own thread when the writer is idle
    /// ([`send_or_write_now`](Self::send_or_write_now)), with the receiver
    /// and the writer's handle on the sink, both for [`write_frames`].
    pub fn with_direct_writes(sink: Sink) -> (Outbox, OutboxReceiver, SharedSink) {
        let (mut outbox, mut receiver) = Outbox::new();
        let direct = DirectWriter::new(sink);
        outbox.direct = Some(direct.clone());
        receiver.direct = Some(direct.clone());
        (outbox, receiver, SharedSink(direct))
    }

    /// Queues a small frame ahead of any bulk data.
    pub fn send(&self, frame: OutFrame) -> Result<(), OutboxClosed> {
        self.send_small(frame, false)
    }

    /// Like [`send`](Self::send), but when the outbox allows direct writes
    /// and the writer is idle with nothing queued, the frame is written at
    /// once by this thread (see [`direct`](super::direct)).
    pub fn send_or_write_now(&self, frame: OutFrame) -> Result<(), OutboxClosed> {
        self.send_small(frame, true)
    }

    fn send_small(&self, frame: OutFrame, write_now: bool) -> Result<(), OutboxClosed> {
        let Some(direct) = &self.direct else {
            return self.urgent.send(frame).map_err(|_| OutboxClosed);
        };
        // Every small frame is counted by the direct writer, so that none
        // written at once can overtake one queued before it.
        let bytes = write_now
            .then(|| frame.contiguous().map(|_| frame.head.clone()))
            .flatten();
        direct.send(
            bytes.as_deref(),
            || self.urgent.send(frame).map_err(|_| OutboxClosed),
            || {
                self.urgent
                    .send(OutFrame::empty())
                    .map_err(|_| OutboxClosed)
            },
        )
    }

    /// Shuts the sink of an outbox with direct writes: the agent sees the
    /// end of its input, even while the writer task is blocked on it.
    pub fn close_sink(&self) {
        if let Some(direct) = &self.direct {
            direct.close();
        }
    }

    /// Queues a frame behind earlier bulk data, waiting while the bulk queue is full.
    pub async fn send_bulk(&self, frame: OutFrame) -> Result<(), OutboxClosed> {
        self.bulk.send(frame).await.map_err(|_| OutboxClosed)
    }

    /// Like [`send_bulk`](Self::send_bulk), for threads outside the async runtime.
    pub fn send_bulk_blocking(&self, frame: OutFrame) -> Result<(), OutboxClosed> {
        self.bulk.blocking_send(frame).map_err(|_| OutboxClosed)
    }

    /// Like [`send_bulk_blocking`](Self::send_bulk_blocking), for a blocking
    /// thread of `runtime` that must give up once `stop` is set: while the
    /// queue is full (the agent stopped reading, say), `stop` is looked at
    /// every 100 ms. Giving up reads as [`OutboxClosed`].
    pub fn send_bulk_blocking_unless(
        &self,
        frame: OutFrame,
        stop: &std::sync::atomic::AtomicBool,
        runtime: &tokio::runtime::Handle,
    ) -> Result<(), OutboxClosed> {
        const STOP_CHECK: std::time::Duration = std::time::Duration::from_millis(100);
        // One `reserve` for the whole wait keeps this sender's place in the queue.
        let permit = runtime.block_on(async {
            let reserve = self.bulk.reserve();
            tokio::pin!(reserve);
            loop {
                tokio::select! {
                    permit = &mut reserve => break permit.ok(),
                    _ = tokio::time::sleep(STOP_CHECK) => {
                        if stop.load(std::sync::atomic::Ordering::Relaxed) {
                            break None;
                        }
                    }
                }
            }
        });
        match permit {
            Some(permit) => {
                permit.send(frame);
                Ok(())
            }
            None => Err(OutboxClosed),
        }
    }

    /// Sends a message carrying `data`: inline when small, otherwise the
    /// message with `Payload::Streamed` followed by chunk frames, all through
    /// the bulk queue so that the message precedes its chunks.
    ///
    /// `write_now` asks for an inline message to be written at once when
    /// the writer is idle ([`send_or_write_now`](Self::send_or_write_now)).
    /// Returns whether the payload was streamed.
    pub async fn send_payload(
        &self,
        id: u64,
        data: Vec<u8>,
        message: impl FnOnce(Payload) -> Message,
        write_now: bool,
    ) -> Result<bool, OutboxClosed> {
        if data.len() <= INLINE_LIMIT {
            self.send_small(
                OutFrame::message(&message(Payload::Inline(data))),
                write_now,
            )?;
            return Ok(false);
        }
        let len = data.len() as u64;
        self.send_bulk(OutFrame::message(&message(Payload::Streamed { len })))
            .await?;
        // When the writer drops the last chunk, the buffer becomes the process's spare.
        let data = crate::buffer::spare_bytes(data);
        let mut start = 0;
        while start < data.len() {
            let end = (start + CHUNK_LEN).min(data.len());
            self.send_bulk(OutFrame::chunk(id, data.slice(start..end)))
                .await?;
            start = end;
        }
        Ok(true)
    }

    /// Whether the writer has stopped.
    pub fn is_closed(&self) -> bool {
        self.urgent.is_closed()
    }
}

/// Writes queued frames until every [`Outbox`] clone is dropped, batching
/// small frames into one write and letting at most one chunk into each batch.
pub async fn write_frames<W>(mut receiver: OutboxReceiver, writer: &mut W) -> io::Result<()>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut batch = BytesMut::with_capacity(BATCH_LEN);
    loop {
        let (first, first_is_bulk) = tokio::select! {
            biased;
            Some(frame) = receiver.urgent.recv() => (frame, false),
            Some(frame) = receiver.bulk.recv() => (frame, true),
            else => break,
        };
        let mut small_frames = usize::from(!first_is_bulk);
        append(&mut batch, first, writer).await?;
        while batch.len() < BATCH_LEN {
            match receiver.urgent.try_recv() {
                Ok(frame) => {
                    small_frames += 1;
                    append(&mut batch, frame, writer).await?
                }
                Err(_) => break,
            }
        }
        if !first_is_bulk && let Ok(frame) = receiver.bulk.try_recv() {
            append(&mut batch, frame, writer).await?;
        }
        if !batch.is_empty() {
            writer.write_all(&batch).await?;
            batch.clear();
        }
        // Written; only the flush that ends the batch is left.
        receiver.written(small_frames);
        writer.flush().await?;
    }
    writer.flush().await
}

impl OutboxReceiver {
    /// The writer has written `small_frames` frames from the urgent queue
    /// and has not yet flushed them.
    fn written(&self, small_frames: usize) {
        if let Some(direct) = &self.direct
            && small_frames > 0
        {
            direct.written(small_frames);
        }
    }
}

async fn append<W>(batch: &mut BytesMut, frame: OutFrame, writer: &mut W) -> io::Result<()>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    batch.extend_from_slice(&frame.head);
    if frame.body.len() >= DIRECT_WRITE_LEN {
        writer.write_all(batch).await?;
        batch.clear();
        writer.write_all(&frame.body).await?;
    } else {
        batch.extend_from_slice(&frame.body);
    }
    Ok(())
}

/// Reassembles streamed payloads from chunk frames, bounded in size.
#[derive(Debug, Default)]
pub struct Assemblies {
    partial: HashMap<u64, Partial>,
}

#[derive(Debug)]
struct Partial {
    expected: u64,
    data: Vec<u8>,
}

impl Assemblies {
    /// Starts collecting `len` bytes for call `id`.
    pub fn start(&mut self, id: u64, len: u64) -> Result<(), String> {
        if len > MAX_PAYLOAD_LEN {
            return Err(format!(
                "a streamed payload of {len} bytes exceeds the limit of {MAX_PAYLOAD_LEN} bytes"
            ));
        }
        if len <= INLINE_LIMIT as u64 {
            return Err(format!(
                "a payload of {len} bytes was streamed instead of inlined"
            ));
        }
        // Address space only: pages are touched as chunks arrive, and a claim
        // that cannot be reserved is refused instead of aborting the process.
        let data = usize::try_from(len)
            .ok()
            .and_then(crate::buffer::try_with_capacity)
            .ok_or_else(|| format!("cannot reserve memory for a payload of {len} bytes"))?;
        let partial = Partial {
            expected: len,
            data,
        };
        if self.partial.insert(id, partial).is_some() {
            return Err(format!(
                "call {id} streamed a second payload before finishing the first"
            ));
        }
        Ok(())
    }

    /// Adds a chunk. Returns the whole payload once complete; chunks for
    /// unknown ids (cancelled calls) are dropped.
    pub fn add(&mut self, id: u64, data: &[u8]) -> Result<Option<Vec<u8>>, String> {
        let Some(partial) = self.partial.get_mut(&id) else {
            return Ok(None);
        };
        let received = partial.data.len() as u64 + data.len() as u64;
        if received > partial.expected {
            return Err(format!(
                "call {id} sent {received} bytes of a payload announced as {} bytes",
                partial.expected
            ));
        }
        partial.data.extend_from_slice(data);
        if received < partial.expected {
            return Ok(None);
        }
        Ok(self.partial.remove(&id).map(|partial| partial.data))
    }

    /// Drops a partial payload.
    pub fn cancel(&mut self, id: u64) {
        self.partial.remove(&id);
    }

    /// Drops every partial payload.
    pub fn clear(&mut self) {
        self.partial.clear();
    }
}
