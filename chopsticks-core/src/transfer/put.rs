//! The controller's side of a put: read, hash and stream a local file or
//! bytes in memory.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use bytes::Bytes;

use super::{PutSource, Route, Transfer, TransferOptions, advanced, unchanged};
use crate::connection::{Answer, CHUNK_LEN, RequestSender};
use crate::error::Result;
use crate::files::{self, FileError, FileTime, Source, checksum_hex};
use crate::progress::SharedProgress;
use crate::protocol::{FileSummary, Message, PutRequest, decode_value};
use crate::tunnel::Tunnel;

/// What a put reads from: an open file (boxed: it carries its hasher), or bytes.
enum Content {
    File(Box<Source>),
    Memory(Bytes),
}

impl Content {
    fn len(&self) -> u64 {
        match self {
            Content::File(source) => source.len(),
            Content::Memory(bytes) => bytes.len() as u64,
        }
    }

    /// The mode the file gets unless one is asked for: the source's, or a
    /// new file's 0666 (both minus the host's umask).
    fn mode(&self) -> u32 {
        match self {
            Content::File(source) => source.metadata().mode() & 0o777,
            Content::Memory(_) => 0o666,
        }
    }

    fn mtime(&self) -> Option<FileTime> {
        match self {
            Content::File(source) => Some(FileTime::modified(source.metadata())),
            Content::Memory(_) => None,
        }
    }
}

/// Opens what `source` names; a file on a blocking thread.
async fn open(route: &Route, source: PutSource) -> Result<Content> {
    match source {
        PutSource::Memory(bytes) => Ok(Content::Memory(bytes)),
        PutSource::File(path) => tokio::task::spawn_blocking(move || Source::open(&path))
            .await
            .map_err(|error| route.error(std::io::ErrorKind::Other, error.to_string()))?
            .map(|source| Content::File(Box::new(source)))
            .map_err(|error| route.local_failure(error)),
    }
}

pub(super) async fn put(
    tunnel: &Tunnel,
    route: Arc<Route>,
    source: PutSource,
    options: TransferOptions,
) -> Result<Transfer> {
    if options.skip_unchanged
        && let Some(present) = unchanged::check(tunnel, &route, &source, &options).await?
    {
        return Ok(present);
    }
    let content = open(&route, source).await?;
    let connection = tunnel.connection().await?;
    let size = content.len();
    // Dropped unanswered (an error, a cancelled future), it withdraws the
    // put: the agent drops what it received and the reading thread stops.
    let mut request = connection.request()?;
    let start = Message::Put {
        id: request.id(),
        request: PutRequest {
            path: route.remote.as_os_str().as_bytes().to_vec(),
            size,
            mode: options.mode.unwrap_or(content.mode()),
            apply_umask: options.mode.is_none(),
            sync: options.sync,
            create_dirs: options.create_dirs,
            mtime: options.preserve_mtime.then(|| content.mtime()).flatten(),
            owner: options.owner.clone(),
            group: options.group.clone(),
        },
    };
    request.send_bulk(&start).await;
    let mut sender = {
        let sender = request.sender();
        let progress = (options.progress.clone(), route.host.clone());
        tokio::task::spawn_blocking(move || send(content, &sender, progress))
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
        changed: true,
    })
}

/// Sends the content in chunks, hashing them, into the bulk queue, then
/// `PutEnd`; a source file that changed while it was read fails instead.
/// Runs on a blocking thread; returns the checksum.
fn send(
    content: Content,
    sender: &RequestSender,
    (progress, host): (Option<SharedProgress>, String),
) -> Result<files::Checksum, FileError> {
    let size = content.len();
    let checksum = match content {
        Content::File(mut source) => {
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
            source.checksum()
        }
        Content::Memory(bytes) => {
            let mut hasher = blake3::Hasher::new();
            let mut offset = 0;
            while offset < bytes.len() {
                if sender.stopped() {
                    return Ok([0; 32]);
                }
                let end = (offset + CHUNK_LEN).min(bytes.len());
                let chunk = bytes.slice(offset..end);
                hasher.update(&chunk);
                if sender.chunk(chunk).is_err() {
                    return Ok([0; 32]);
                }
                offset = end;
                advanced(&progress, &host, offset as u64, size);
            }
            *hasher.finalize().as_bytes()
        }
    };
    let _ = sender.message(&Message::PutEnd {
        id: sender.id(),
        checksum: checksum.to_vec(),
    });
    Ok(checksum)
}
