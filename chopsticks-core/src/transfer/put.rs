//! The controller's side of a put: read, hash and stream the local file.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use super::{Route, Transfer, TransferOptions, advanced};
use crate::connection::{Answer, CHUNK_LEN, RequestSender};
use crate::error::Result;
use crate::files::{self, FileError, FileTime, Source, checksum_hex};
use crate::progress::SharedProgress;
use crate::protocol::{FileSummary, Message, PutRequest, decode_value};
use crate::tunnel::Tunnel;

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
    // Dropped unanswered (an error, a cancelled future), it withdraws the
    // put: the agent drops what it received and the reading thread stops.
    let mut request = connection.request()?;
    let start = Message::Put {
        id: request.id(),
        request: PutRequest {
            path: route.remote.as_os_str().as_bytes().to_vec(),
            size,
            mode: options.mode.unwrap_or(metadata.mode() & 0o777),
            apply_umask: options.mode.is_none(),
            sync: options.sync,
            create_dirs: options.create_dirs,
            mtime: options
                .preserve_mtime
                .then(|| FileTime::modified(&metadata)),
        },
    };
    request.send_bulk(&start).await;
    let mut sender = {
        let sender = request.sender();
        let progress = (options.progress.clone(), route.host.clone());
        tokio::task::spawn_blocking(move || send_file(source, &sender, progress))
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
    let (answer, sent) = tokio::select! {
        answer = request.answer() => (answer, None),
        sent = &mut sender => match joined(sent) {
            Err(error) => return Err(route.local_failure(error)),
            Ok(checksum) => (request.answer().await, Some(checksum)),
        },
    };
    let summary = match answer.map_err(|error| route.broken(error))? {
        Answer::Value(value) => decode_value::<FileSummary>(&value).map_err(|message| {
            route.corrupt(format!("the agent's report was unreadable: {message}"))
        })?,
        Answer::Failed(failure) => return Err(route.remote_failure(failure)),
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

/// Reads the source in chunks, hashing them, into the bulk queue, then
/// sends `PutEnd`; a source that changed while it was read fails instead.
/// Runs on a blocking thread; returns the checksum.
fn send_file(
    mut source: Source,
    sender: &RequestSender,
    (progress, host): (Option<SharedProgress>, String),
) -> Result<files::Checksum, FileError> {
    let size = source.len();
    loop {
        if sender.stopped() {
            return Ok([0; 32]);
        }
        let mut chunk = crate::buffer::chunk(CHUNK_LEN);
        if !source.read_chunk(&mut chunk, CHUNK_LEN)? {
            break;
        }
        if sender.chunk(crate::buffer::chunk_bytes(chunk)).is_err() {
            // The connection closed (the awaited answer says why), or the put ended.
            return Ok([0; 32]);
        }
        advanced(&progress, &host, source.read_so_far(), size);
    }
    let checksum = source.checksum();
    let _ = sender.message(&Message::PutEnd {
        id: sender.id(),
        checksum: checksum.to_vec(),
    });
    Ok(checksum)
}
