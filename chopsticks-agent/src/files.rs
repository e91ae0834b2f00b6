//! The agent's side of `put` and `fetch`.
//!
//! A put's chunks are handed by the reader role to a writer job on the pool,
//! through a short queue; the writer hashes them into an [`AtomicFile`]
//! beside the target and commits it (verify, sync, rename), so reading and
//! calls go on while the disk works. A fetch runs on the pool: it streams the
//! file through the bulk queue, which bounds memory and lets replies to
//! calls overtake it.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};

use bytes::Bytes;
use chopsticks_core::__private::accounts::Ownership;
use chopsticks_core::__private::files::{self, AtomicFile, Expected, FileError, FileTime, Source};
use chopsticks_core::__private::protocol::{
    Failure, FailureKind, FileFailure, FileSummary, Message, PutRequest, encode_value,
};
use chopsticks_core::__private::remote::CallOutcome;
use chopsticks_core::__private::wire::{CHUNK_LEN, OutFrame, Outbox};

/// How many chunks may wait for a put's writer before the reader waits too.
const PUT_QUEUE_LEN: usize = 8;

/// What the reader hands a put's writer.
enum Piece {
    Data(Bytes),
    /// All data was sent; the sender's checksum.
    End(Vec<u8>),
}

/// A put whose data is arriving: the reader's end of its writer's queue.
///
/// The writer (a pool job) hashes and stores the chunks, so reading goes on
/// while the disk works. Dropping this and every [`PutHandle`] without
/// [`end`](Self::end) (a cancel, the agent exiting) makes the writer drop
/// the staged data.
pub(crate) struct IncomingPut {
    pieces: SyncSender<Piece>,
    /// Disconnects once the writer has dropped its file (committed or not).
    writer_gone: Receiver<()>,
}

/// Another sending end of a put's queue, for handing over one chunk
/// without holding the table of puts.
pub(crate) struct PutHandle(SyncSender<Piece>);

impl PutHandle {
    /// Hands the next chunk to the writer. False once the writer has stopped
    /// (it failed and replied); the rest of the put is then ignored.
    pub(crate) fn write(&self, data: Bytes) -> bool {
        self.0.send(Piece::Data(data)).is_ok()
    }
}

/// A put given up on: its writer drops the staged data once it sees that.
pub(crate) struct AbandonedPut {
    writer_gone: Receiver<()>,
}

impl AbandonedPut {
    /// Waits until the writer has dropped its file, or `deadline` passes.
    pub(crate) fn wait_until(self, deadline: std::time::Instant) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let _ = self.writer_gone.recv_timeout(left);
    }
}

fn failure(error: FileError) -> Failure {
    Failure::new(
        FailureKind::File(FileFailure::of(&error.source)),
        error.to_string(),
    )
}

fn umask() -> u32 {
    static UMASK: OnceLock<u32> = OnceLock::new();
    *UMASK.get_or_init(files::umask)
}

impl IncomingPut {
    /// Opens the staging file for a put and returns the reader's end with the
    /// writer job, which returns the put's outcome, or `None` once it was dropped.
    #[allow(clippy::type_complexity)]
    pub(crate) fn start(
        request: PutRequest,
    ) -> Result<
        (
            IncomingPut,
            impl FnOnce() -> Option<CallOutcome> + Send + 'static,
        ),
        Failure,
    > {
        let target = PathBuf::from(OsString::from_vec(request.path));
        let ownership = Ownership::resolve(request.owner.as_deref(), request.group.as_deref())
            .map_err(|error| failure(FileError::new("setting the owner of", &target, error)))?;
        let mut file = AtomicFile::create(&target, request.create_dirs).map_err(failure)?;
        file.set_owner(ownership).map_err(failure)?;
        file.set_durable(request.sync);
        let mode = if request.apply_umask {
            request.mode & !umask()
        } else {
            request.mode
        };
        let (pieces, queue) = std::sync::mpsc::sync_channel(PUT_QUEUE_LEN);
        let (gone, writer_gone) = std::sync::mpsc::sync_channel(0);
        let writer = Writer {
            file,
            size: request.size,
            mode,
            mtime: request.mtime,
            _gone: gone,
        };
        let incoming = IncomingPut {
            pieces,
            writer_gone,
        };
        Ok((incoming, move || writer.run(queue)))
    }

    /// A second sending end, for one chunk.
    pub(crate) fn handle(&self) -> PutHandle {
        PutHandle(self.pieces.clone())
    }

    /// All data has arrived: the writer verifies and commits.
    pub(crate) fn end(self, checksum: Vec<u8>) {
        let _ = self.pieces.send(Piece::End(checksum));
    }

    /// Gives the put up: once the chunks already queued are written, the
    /// writer drops the staged data.
    pub(crate) fn abandon(self) -> AbandonedPut {
        AbandonedPut {
            writer_gone: self.writer_gone,
        }
    }
}

/// The writing half of a put.
struct Writer {
    file: AtomicFile,
    size: u64,
    mode: u32,
    mtime: Option<FileTime>,
    /// Dropped after `file` (fields drop in order): tells an exiting agent
    /// that the staged data is gone.
    _gone: SyncSender<()>,
}

impl Writer {
    fn run(mut self, queue: Receiver<Piece>) -> Option<CallOutcome> {
        while let Ok(piece) = queue.recv() {
            match piece {
                Piece::Data(data) => {
                    if let Err(failure) = self.write(&data) {
                        return Some(Err(failure));
                    }
                }
                Piece::End(checksum) => return Some(self.finish(&checksum)),
            }
        }
        None
    }

    fn write(&mut self, data: &[u8]) -> Result<(), Failure> {
        if self.file.written() + data.len() as u64 > self.size {
            return Err(Failure::new(
                FailureKind::File(FileFailure::Corrupt),
                format!(
                    "received more than the {} bytes announced for {}",
                    self.size,
                    self.file.target().display()
                ),
            ));
        }
        self.file.write(data).map_err(failure)
    }

    /// Verifies against the sender's checksum, then syncs and renames; the
    /// outcome carries a [`FileSummary`].
    fn finish(self, checksum: &[u8]) -> CallOutcome {
        let checksum: [u8; 32] = checksum.try_into().map_err(|_| {
            Failure::new(
                FailureKind::File(FileFailure::Corrupt),
                format!("the sender's checksum has {} bytes, not 32", checksum.len()),
            )
        })?;
        let expected = Expected {
            size: self.size,
            checksum,
        };
        let target = self.file.target().to_path_buf();
        let committed = self
            .file
            .commit(&expected, self.mode, self.mtime)
            .map_err(failure)?;
        let mtime = std::fs::metadata(&target)
            .map(|metadata| FileTime::modified(&metadata))
            .unwrap_or(FileTime {
                seconds: 0,
                nanos: 0,
            });
        summary(committed.size, committed.checksum, self.mode, mtime)
    }
}

fn summary(size: u64, checksum: files::Checksum, mode: u32, mtime: FileTime) -> CallOutcome {
    encode_value(&FileSummary {
        size,
        checksum: checksum.to_vec(),
        mode,
        mtime,
    })
    .map_err(|message| Failure::new(FailureKind::Result, message))
}

/// Streams the file at `path` as a fetch's head, chunks and final reply,
/// through the bulk queue. Stops quietly once `cancelled` is set. A file
/// that changed while it was read ends the fetch with a failure instead of
/// the summary, so the controller commits nothing.
pub(crate) fn send_file(
    id: u64,
    path: Vec<u8>,
    outbox: &Outbox,
    cancelled: &AtomicBool,
    reply: impl Fn(u64, CallOutcome) -> OutFrame,
) {
    let path = PathBuf::from(OsString::from_vec(path));
    let mut source = match Source::open(&path) {
        Ok(source) => source,
        Err(error) => {
            let _ = outbox.send(reply(id, Err(failure(error))));
            return;
        }
    };
    let head = Message::FetchHead {
        id,
        size: source.len(),
    };
    if outbox.send_bulk_blocking(OutFrame::message(&head)).is_err() {
        return;
    }
    let outcome = match stream(id, &mut source, outbox, cancelled) {
        Ok(false) => return,
        Ok(true) => summary(
            source.read_so_far(),
            source.checksum(),
            source.metadata().mode() & 0o7777,
            FileTime::modified(source.metadata()),
        ),
        Err(error) => Err(failure(error)),
    };
    let _ = outbox.send_bulk_blocking(reply(id, outcome));
}

/// Sends the file's content as chunks; false when cancelled or disconnected.
fn stream(
    id: u64,
    source: &mut Source,
    outbox: &Outbox,
    cancelled: &AtomicBool,
) -> Result<bool, FileError> {
    loop {
        if cancelled.load(Ordering::Relaxed) {
            return Ok(false);
        }
        let mut chunk = chopsticks_core::__private::buffer::chunk(CHUNK_LEN);
        if !source.read_chunk(&mut chunk, CHUNK_LEN)? {
            return Ok(true);
        }
        if outbox
            .send_bulk_blocking(OutFrame::chunk(
                id,
                chopsticks_core::__private::buffer::chunk_bytes(chunk),
            ))
            .is_err()
        {
            return Ok(false);
        }
    }
}
