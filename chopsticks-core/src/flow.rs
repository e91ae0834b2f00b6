//! Streams and their flow control, the same at both ends.
//!
//! A stream is a byte stream that belongs to one call: the items a
//! streaming function yields (agent to controller), or the input fed to a
//! call (controller to agent). It travels in STREAM frames (see
//! [`wire`](crate::wire)). Items are CBOR values, each behind its length as
//! a big-endian `u32`; a byte stream is its bytes as they are.
//!
//! The receiver paces the sender with credit, as HTTP/2's windows do: a
//! sender starts with [`WINDOW`] bytes of credit and sends no more stream
//! data than it has credit for; the receiver gives credit back
//! ([`Message::Credit`](crate::protocol::Message::Credit)) as its consumer
//! takes data, in steps of [`GRANT_STEP`]. A receiver that gets more than
//! it granted has met a broken peer. So a slow consumer holds the producer
//! back: at most a window is in flight, and at most [`BUFFERED_LEN`] (plus
//! one item) waits at the sender, whatever the producer could make.
//!
//! [`Outflow`] is the sending half: the producer pushes into it (blocking
//! or async), and whoever changes it sends what credit allows. [`Allowance`]
//! and [`Grants`] are the receiving half's books, [`ItemReader`] cuts the
//! byte stream back into items.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use bytes::{Buf, Bytes, BytesMut};
use tokio::sync::Notify;

use crate::protocol::Failure;
use crate::wire::STREAM_FRAME_LEN;

/// The credit a stream's sender starts with, in bytes.
pub const WINDOW: u64 = 512 * 1024;
/// A receiver gives credit back once its consumer has taken this much.
pub const GRANT_STEP: u64 = WINDOW / 4;
/// The most credit a sender may hold; more is a protocol violation.
pub const MAX_CREDIT: u64 = 1 << 32;
/// A producer waits while this much of its stream waits unsent.
pub const BUFFERED_LEN: usize = 256 * 1024;
/// The largest item a stream carries, encoded.
pub const MAX_ITEM_LEN: usize = u32::MAX as usize;

/// The stream was cancelled (or its connection closed): nothing more is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stopped;

/// How a producer ended.
#[derive(Debug)]
pub enum End {
    /// It yielded everything it had.
    Finished,
    /// It failed (panicked, or an item could not be encoded).
    Failed(Failure),
}

/// What the stream sends next.
#[derive(Debug)]
pub enum Out {
    /// The next bytes of the stream, as credit allows.
    Data(Bytes),
    /// The producer ended and everything it pushed has been sent.
    End(End, u64),
    /// The stream was cancelled; what was pushed and not sent is dropped.
    Cancelled(u64),
}

/// Where an [`Outflow`] sends: queues a frame, never waits.
pub type Send = Box<dyn Fn(Out) + std::marker::Send + Sync>;

/// The sending half of a stream; see the [module](self).
///
/// Credit, the end and a cancel send what they allow at once, from their
/// own thread, and so does the first push (the first item leaves from the
/// producer's thread). Later pushes wake the [`flush`](Self::flush) task,
/// which sends whatever has gathered by the time it runs, so a fast
/// producer's items share frames. One sender at a time keeps the order.
pub struct Outflow {
    state: Mutex<OutState>,
    /// Wakes a blocking producer waiting for room.
    room: Condvar,
    /// Wakes an async producer waiting for room.
    room_async: Notify,
    /// Wakes the flush task: data after none.
    ready: Notify,
    send: Send,
    /// Starts the flush task, the first time one is needed (a one-item
    /// stream never needs one).
    start_flush: Mutex<Option<Box<dyn FnOnce() + std::marker::Send>>>,
}

impl std::fmt::Debug for Outflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outflow").finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct OutState {
    /// Items, behind their lengths.
    pending: BytesMut,
    /// Pieces of a byte stream, sent without a copy.
    chunks: std::collections::VecDeque<Bytes>,
    /// The bytes in `chunks`.
    chunked: usize,
    credit: u64,
    items: u64,
    end: Option<End>,
    cancelled: bool,
    /// Someone is sending: others leave it to them (they look again after).
    sending: bool,
    /// The end (or the cancel) has been sent: nothing more is.
    closed: bool,
    /// Something was pushed already.
    started: bool,
}

impl OutState {
    /// What waits unsent.
    fn buffered(&self) -> usize {
        self.pending.len() + self.chunked
    }

    /// Takes at most `len` bytes to send.
    fn take(&mut self, len: usize) -> Bytes {
        if !self.pending.is_empty() {
            return self.pending.split_to(len.min(self.pending.len())).freeze();
        }
        let Some(mut chunk) = self.chunks.pop_front() else {
            return Bytes::new();
        };
        if chunk.len() > len {
            self.chunks.push_front(chunk.split_off(len));
        }
        self.chunked -= chunk.len();
        chunk
    }

    /// What may be sent now, if anything.
    fn next_out(&mut self) -> Option<Out> {
        if self.closed {
            return None;
        }
        if self.cancelled {
            self.closed = true;
            return Some(Out::Cancelled(self.items));
        }
        if self.buffered() > 0 && self.credit > 0 {
            let len = STREAM_FRAME_LEN.min(usize::try_from(self.credit).unwrap_or(usize::MAX));
            let data = self.take(len);
            self.credit -= data.len() as u64;
            return Some(Out::Data(data));
        }
        if self.buffered() == 0
            && let Some(end) = self.end.take()
        {
            self.closed = true;
            return Some(Out::End(end, self.items));
        }
        None
    }
}

impl Outflow {
    /// A stream whose sender starts with `credit` bytes of credit and sends through `send`.
    pub fn new(credit: u64, send: Send) -> Outflow {
        Outflow {
            state: Mutex::new(OutState {
                pending: BytesMut::new(),
                chunks: std::collections::VecDeque::new(),
                chunked: 0,
                credit,
                items: 0,
                end: None,
                cancelled: false,
                sending: false,
                closed: false,
                started: false,
            }),
            room: Condvar::new(),
            room_async: Notify::new(),
            ready: Notify::new(),
            send,
            start_flush: Mutex::new(None),
        }
    }

    /// Has `start` run the [`flush`](Self::flush) task when the stream
    /// first needs one, instead of the caller running it from the start.
    pub fn flush_when_needed(&self, start: impl FnOnce() + std::marker::Send + 'static) {
        *self
            .start_flush
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Box::new(start));
    }

    /// Sends what later pushes gather, until the stream's end or cancel
    /// has been sent. Run it as a task beside the producer.
    pub async fn flush(&self) {
        loop {
            self.ready.notified().await;
            let state = self.lock();
            if state.closed {
                return;
            }
            self.pump(state);
        }
    }

    /// After a push: the first data goes at once, later data to the flush task.
    fn pushed<'a>(&'a self, state: MutexGuard<'a, OutState>, was_empty: bool, first: bool) {
        if first {
            self.pump(state);
        } else if was_empty {
            drop(state);
            let start = self
                .start_flush
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            if let Some(start) = start {
                start();
            }
            self.ready.notify_one();
        }
    }

    fn lock(&self) -> MutexGuard<'_, OutState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sends what the stream allows now, unless someone else is sending
    /// (who looks again when done).
    fn pump<'a>(&'a self, mut state: MutexGuard<'a, OutState>) {
        if state.sending {
            return;
        }
        loop {
            let before = state.buffered();
            let Some(out) = state.next_out() else {
                return;
            };
            let room = before >= BUFFERED_LEN && state.buffered() < BUFFERED_LEN;
            state.sending = true;
            drop(state);
            if room {
                self.room.notify_all();
                self.room_async.notify_one();
            }
            (self.send)(out);
            state = self.lock();
            state.sending = false;
            if state.closed {
                // The flush task ends too.
                self.ready.notify_one();
                return;
            }
        }
    }

    /// Appends one encoded item, behind its length, waiting on this thread
    /// while the unsent part is full; sends what credit allows.
    pub fn push_item_blocking(&self, item: &[u8]) -> Result<(), Stopped> {
        let state = self.room_blocking();
        self.append(state, item)
    }

    /// Appends one encoded item, behind its length, waiting while the
    /// unsent part is full; sends what credit allows.
    pub async fn push_item(&self, item: &[u8]) -> Result<(), Stopped> {
        let state = self.room().await;
        self.append(state, item)
    }

    /// The state once the unsent part has room (or the stream was cancelled).
    async fn room(&self) -> MutexGuard<'_, OutState> {
        loop {
            {
                let state = self.lock();
                if state.cancelled || state.buffered() < BUFFERED_LEN {
                    return state;
                }
            }
            // One producer: a room notice sent in between is kept as a permit.
            self.room_async.notified().await;
        }
    }

    /// The state once the unsent part has room, waiting on this thread.
    fn room_blocking(&self) -> MutexGuard<'_, OutState> {
        let mut state = self.lock();
        while !state.cancelled && state.buffered() >= BUFFERED_LEN {
            state = self
                .room
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        state
    }

    /// Appends a piece of a byte stream (sent without a copy), waiting on
    /// this thread while the unsent part is full.
    pub fn push_chunk_blocking(&self, chunk: Bytes) -> Result<(), Stopped> {
        let state = self.room_blocking();
        self.append_chunk(state, chunk)
    }

    /// Appends a piece of a byte stream (sent without a copy), waiting
    /// while the unsent part is full.
    pub async fn push_chunk(&self, chunk: Bytes) -> Result<(), Stopped> {
        let state = self.room().await;
        self.append_chunk(state, chunk)
    }

    fn append(&self, mut state: MutexGuard<'_, OutState>, item: &[u8]) -> Result<(), Stopped> {
        if state.cancelled || state.end.is_some() || state.closed {
            return Err(Stopped);
        }
        let (was_empty, first) = (state.buffered() == 0, !state.started);
        state.started = true;
        // Checked by the callers' encoders: an item fits in a u32.
        state
            .pending
            .extend_from_slice(&(item.len() as u32).to_be_bytes());
        state.items += 1;
        state.pending.extend_from_slice(item);
        self.pushed(state, was_empty, first);
        Ok(())
    }

    fn append_chunk(
        &self,
        mut state: MutexGuard<'_, OutState>,
        chunk: Bytes,
    ) -> Result<(), Stopped> {
        if state.cancelled || state.end.is_some() || state.closed {
            return Err(Stopped);
        }
        let (was_empty, first) = (state.buffered() == 0, !state.started);
        state.started = true;
        state.chunked += chunk.len();
        state.chunks.push_back(chunk);
        self.pushed(state, was_empty, first);
        Ok(())
    }

    /// Whether the stream was cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.lock().cancelled
    }

    /// The producer ended; the end is sent once all data has gone.
    pub fn finish(&self, end: End) {
        let mut state = self.lock();
        if state.end.is_none() && !state.closed {
            state.end = Some(end);
        }
        self.pump(state);
    }

    /// Stops the stream: producers get [`Stopped`], and [`Out::Cancelled`] is sent.
    pub fn cancel(&self) {
        let mut state = self.lock();
        state.cancelled = true;
        state.pending.clear();
        state.chunks.clear();
        state.chunked = 0;
        self.pump(state);
        self.room.notify_all();
        self.room_async.notify_one();
    }

    /// Adds credit from the receiver and sends what it allows; an error
    /// when it would exceed [`MAX_CREDIT`].
    pub fn grant(&self, bytes: u64) -> Result<(), String> {
        let mut state = self.lock();
        match state.credit.checked_add(bytes) {
            Some(credit) if credit <= MAX_CREDIT => state.credit = credit,
            _ => {
                return Err(format!(
                    "granted {bytes} bytes of credit on top of {}, over the limit of {MAX_CREDIT}",
                    state.credit
                ));
            }
        }
        self.pump(state);
        Ok(())
    }
}

/// How much stream data a receiver still allows its sender: granted minus
/// received. Shared by the reader (which receives) and the consumer (which grants).
#[derive(Debug)]
pub struct Allowance(AtomicU64);

impl Default for Allowance {
    fn default() -> Self {
        Allowance(AtomicU64::new(WINDOW))
    }
}

impl Allowance {
    /// Counts `len` bytes received; an error when the sender had no credit for them.
    pub fn receive(&self, len: usize) -> Result<(), String> {
        let len = len as u64;
        self.0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                left.checked_sub(len)
            })
            .map(drop)
            .map_err(|left| format!("sent {len} bytes of stream data with credit for only {left}"))
    }

    /// Allows `bytes` more; call before the credit message is sent.
    pub fn grant(&self, bytes: u64) {
        self.0.fetch_add(bytes, Ordering::AcqRel);
    }
}

/// A receiver's count of what its consumer took since it last gave credit back.
#[derive(Debug, Default)]
pub struct Grants {
    taken: u64,
}

impl Grants {
    /// Counts `len` bytes taken by the consumer; returns the credit to give
    /// back now, if a step is complete.
    pub fn taken(&mut self, len: usize) -> Option<u64> {
        self.taken += len as u64;
        (self.taken >= GRANT_STEP).then(|| std::mem::take(&mut self.taken))
    }
}

/// Cuts a byte stream of length-prefixed items back into items.
#[derive(Debug, Default)]
pub struct ItemReader {
    buffer: BytesMut,
}

impl ItemReader {
    /// Adds the next bytes of the stream.
    pub fn extend(&mut self, data: &[u8]) {
        self.buffer.extend_from_slice(data);
    }

    /// The next complete item, if one is buffered.
    pub fn next_item(&mut self) -> Option<Bytes> {
        let len = u32::from_be_bytes(self.buffer.get(..4)?.try_into().ok()?) as usize;
        if self.buffer.len() < 4 + len {
            return None;
        }
        self.buffer.advance(4);
        Some(self.buffer.split_to(len).freeze())
    }

    /// Whether part of an item is buffered (at the stream's end: it was cut short).
    pub fn has_partial_item(&self) -> bool {
        !self.buffer.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An outflow whose sends are collected.
    fn collecting(credit: u64) -> (Outflow, std::sync::Arc<Mutex<Vec<Out>>>) {
        let sent = std::sync::Arc::new(Mutex::new(Vec::new()));
        let into = sent.clone();
        let flow = Outflow::new(
            credit,
            Box::new(move |out| into.lock().expect("lock").push(out)),
        );
        (flow, sent)
    }

    #[tokio::test]
    async fn credit_paces_the_sends_and_the_end_follows_all_data() {
        let (flow, sent) = collecting(10);
        flow.push_item(b"abcdef").await.expect("push");
        flow.push_item(b"ghijkl").await.expect("push");
        // The second push went to the flush task; the end sends nothing
        // while data waits for credit.
        flow.finish(End::Finished);
        {
            let sent = sent.lock().expect("lock");
            assert!(
                matches!(sent.as_slice(), [Out::Data(first)] if first.len() == 10),
                "no more than the credit, no end before the data: {sent:?}"
            );
        }
        flow.grant(100).expect("grant");
        let sent = std::mem::take(&mut *sent.lock().expect("lock"));
        let mut reader = ItemReader::default();
        let mut ended = false;
        for out in sent {
            match out {
                Out::Data(data) => reader.extend(&data),
                Out::End(End::Finished, 2) => ended = true,
                other => panic!("{other:?}"),
            }
        }
        assert!(ended);
        assert_eq!(reader.next_item().as_deref(), Some(&b"abcdef"[..]));
        assert_eq!(reader.next_item().as_deref(), Some(&b"ghijkl"[..]));
        assert!(reader.next_item().is_none() && !reader.has_partial_item());
    }

    #[tokio::test]
    async fn chunks_go_out_whole_or_cut_at_the_credit() {
        let (flow, sent) = collecting(100_000);
        flow.push_chunk(Bytes::from(vec![7u8; 70_000]))
            .await
            .expect("push");
        flow.push_chunk(Bytes::from(vec![8u8; 70_000]))
            .await
            .expect("push");
        flow.push_chunk(Bytes::from_static(b"tail"))
            .await
            .expect("push");
        flow.finish(End::Finished);
        flow.grant(100_000).expect("grant");
        let mut received = Vec::new();
        let mut ended = false;
        for out in std::mem::take(&mut *sent.lock().expect("lock")) {
            match out {
                Out::Data(data) => {
                    assert!(data.len() <= STREAM_FRAME_LEN);
                    received.extend_from_slice(&data);
                }
                Out::End(End::Finished, 0) => ended = true,
                other => panic!("{other:?}"),
            }
        }
        assert!(ended);
        assert_eq!(received.len(), 140_004);
        assert!(received.ends_with(b"tail"));
    }

    #[test]
    fn a_blocking_producer_waits_for_room_and_a_cancel_releases_it() {
        let (flow, sent) = collecting(0);
        let flow = std::sync::Arc::new(flow);
        let producer = {
            let flow = flow.clone();
            std::thread::spawn(move || {
                let item = vec![1u8; 1000];
                let mut pushed = 0;
                while flow.push_item_blocking(&item).is_ok() {
                    pushed += 1;
                }
                pushed
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(100));
        flow.cancel();
        let pushed = producer.join().expect("producer");
        assert!(
            (BUFFERED_LEN / 1004..=BUFFERED_LEN / 1004 + 1).contains(&pushed),
            "pushed {pushed} items with no credit"
        );
        let sent = sent.lock().expect("lock");
        assert!(matches!(sent.as_slice(), [Out::Cancelled(_)]), "{sent:?}");
    }

    #[test]
    fn allowance_refuses_data_beyond_credit_and_credit_beyond_the_limit() {
        let allowance = Allowance::default();
        allowance.receive(WINDOW as usize).expect("the window");
        assert!(allowance.receive(1).is_err());
        allowance.grant(5);
        allowance.receive(5).expect("granted");
        let (flow, _sent) = collecting(WINDOW);
        assert!(flow.grant(MAX_CREDIT).is_err());
        assert!(flow.grant(u64::MAX).is_err());
        let mut grants = Grants::default();
        assert_eq!(grants.taken(GRANT_STEP as usize - 1), None);
        assert_eq!(grants.taken(1), Some(GRANT_STEP));
    }

    #[test]
    fn a_cut_item_stays_partial() {
        let mut reader = ItemReader::default();
        reader.extend(&[0, 0, 0, 5, 1, 2]);
        assert!(reader.next_item().is_none());
        assert!(reader.has_partial_item());
        reader.extend(&[3, 4, 5]);
        assert_eq!(reader.next_item().as_deref(), Some(&[1, 2, 3, 4, 5][..]));
    }
}
