//! The controller's side of a put: read, hash and stream the local file.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::{Route, Transfer, TransferOptions, advanced};
use crate::connection::{Connection, Reply};
use crate::error::Result;
use crate::files::{self, FileError, FileTime, Source, checksum_hex};
use crate::progress::SharedProgress;
use crate::protocol::{FileSummary, Message, decode_value};
use crate::tunnel::Tunnel;
use crate::wire::{CHUNK_LEN, OutFrame, Outbox};

pub(super) async fn put(
    tunnel: &Tunnel,
    route: Arc<Route>,
    options: TransferOptions,
) -> Result<Transfer> {
    let local = route.local.clone();
    let source = tokio::task::spawn_blocking(move || Source::open(&local))
        .await
        .map_err(|error| route.error(std::io::ErrorKind::Other, error.to_string()))?
        .map_err(|error| route.local_failure(error))?;
    let connection = tunnel.connection().await?;
    let metadata = source.metadata().clone();
    let size = source.len();
    let (id, reply) = connection.register()?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut pending = Pending {
        connection: &connection,
        id,
        stop: stop.clone(),
        finished: false,
    };
    let start = Message::Put {
        id,
        path: route.remote.as_os_str().as_bytes().to_vec(),
        size,
        mode: options.mode.unwrap_or(metadata.mode() & 0o777),
        apply_umask: options.mode.is_none(),
        sync: options.sync,
        create_dirs: options.create_dirs,
        mtime: options
            .preserve_mtime
            .then(|| FileTime::modified(&metadata)),
    };
    // A closed outbox means the reader is failing this request right now.
    let _ = connection
        .outbox()
        .send_bulk(OutFrame::message(&start))
        .await;
    let mut sender = {
        let outbox = connection.outbox().clone();
        let progress = (options.progress.clone(), route.host.clone());
        tokio::task::spawn_blocking(move || send_file(source, id, &outbox, &stop, progress))
    };
    let joined = |joined: std::result::Result<_, tokio::task::JoinError>| {
        joined.unwrap_or_else(|error: tokio::task::JoinError| {
            Err(FileError::new(
                "reading",
                &route.local,
                std::io::Error::other(error.to_string()),
            ))
        })
    };
    tokio::pin!(reply);
    let (reply, sent) = tokio::select! {
        reply = &mut reply => (reply, None),
        sent = &mut sender => match joined(sent) {
            // The agent drops what it received when `pending` withdraws the put.
            Err(error) => return Err(route.local_failure(error)),
            Ok(checksum) => (reply.await, Some(checksum)),
        },
    };
    pending.finished = true;
    pending.stop.store(true, Ordering::Relaxed);
    let summary = match reply {
        Ok(Reply::Value(value)) => decode_value::<FileSummary>(&value).map_err(|message| {
            route.corrupt(format!("the agent's report was unreadable: {message}"))
        })?,
        Ok(Reply::Failed(failure)) => return Err(route.remote_failure(failure)),
        Ok(Reply::Closed(closure)) => return Err(route.broken(connection.closed_error(&closure))),
        Err(_) => return Err(route.broken(connection.dropped_error())),
    };
    let sent = match sent {
        Some(checksum) => checksum,
        None => joined(sender.await).map_err(|error| route.local_failure(error))?,
    };
    if summary.checksum != sent || summary.size != size {
        return Err(route.corrupt(format!(
            "the agent stored {} bytes with BLAKE3 {} but {size} bytes with BLAKE3 {} were sent",
            summary.size,
            crate::identity::peer_hex(&summary.checksum),
            checksum_hex(&sent)
        )));
    }
    Ok(Transfer {
        local_path: route.local.clone(),
        remote_path: route.remote.clone(),
        size,
        checksum: checksum_hex(&sent),
    })
}

/// Withdraws an unfinished put: stops the reading thread and cancels it on the agent.
struct Pending<'c> {
    connection: &'c Connection,
    id: u64,
    stop: Arc<AtomicBool>,
    finished: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if !self.finished {
            self.connection.withdraw(self.id);
        }
    }
}

/// Reads the source in chunks, hashing them, into the bulk queue, then
/// sends `PutEnd`; a source that changed while it was read fails instead.
/// Runs on a blocking thread; returns the checksum.
fn send_file(
    mut source: Source,
    id: u64,
    outbox: &Outbox,
    stop: &AtomicBool,
    (progress, host): (Option<SharedProgress>, String),
) -> Result<files::Checksum, FileError> {
    let runtime = tokio::runtime::Handle::current();
    let size = source.len();
    loop {
        if stop.load(Ordering::Relaxed) {
            return Ok([0; 32]);
        }
        let mut chunk = crate::buffer::chunk(CHUNK_LEN);
        if !source.read_chunk(&mut chunk, CHUNK_LEN)? {
            break;
        }
        let frame = OutFrame::chunk(id, crate::buffer::chunk_bytes(chunk));
        if outbox
            .send_bulk_blocking_unless(frame, stop, &runtime)
            .is_err()
        {
            // The connection closed (the waiting reply says why), or the put was withdrawn.
            return Ok([0; 32]);
        }
        advanced(&progress, &host, source.read_so_far(), size);
    }
    let checksum = source.checksum();
    let end = Message::PutEnd {
        id,
        checksum: checksum.to_vec(),
    };
    let _ = outbox.send_bulk_blocking_unless(OutFrame::message(&end), stop, &runtime);
    Ok(checksum)
}
