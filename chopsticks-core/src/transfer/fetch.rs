//! The controller's side of a fetch: receive, hash and stage the remote file.

use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc::Receiver;

use super::{Route, Transfer, TransferOptions, advanced, effective_mode};
use crate::connection::{Answer, StreamEvent};
use crate::error::Result;
use crate::files::{AtomicFile, Expected, FileError, checksum_hex};
use crate::progress::SharedProgress;
use crate::protocol::{FileSummary, Message, decode_value};
use crate::tunnel::Tunnel;

pub(super) async fn fetch(
    tunnel: &Tunnel,
    route: Arc<Route>,
    options: TransferOptions,
) -> Result<Transfer> {
    let connection = tunnel.connection().await?;
    // Dropped unanswered, it withdraws the fetch: the agent stops sending
    // and the writer stops writing.
    let mut request = connection.request()?;
    let events = request.stream();
    request.send(&Message::Fetch {
        id: request.id(),
        path: route.remote.as_os_str().as_bytes().to_vec(),
    });
    let mut writer = {
        let target = route.local.clone();
        let (create_dirs, sync) = (options.create_dirs, options.sync);
        let progress = (options.progress.clone(), route.host.clone());
        tokio::task::spawn_blocking(move || {
            receive_file(events, target, create_dirs, sync, progress)
        })
    };
    let joined = |joined: std::result::Result<_, tokio::task::JoinError>| {
        joined.unwrap_or_else(|error| {
            Err(FileError::new(
                "writing",
                &route.local,
                std::io::Error::other(error.to_string()),
            ))
        })
    };
    let (answer, staged) = tokio::select! {
        answer = request.answer() => (answer, joined(writer.await)),
        written = &mut writer => match joined(written) {
            // The agent broke the stream's rules: nothing is committed.
            Err(error) if error.source.kind() == std::io::ErrorKind::InvalidData => {
                return Err(route.corrupt(error.to_string()));
            }
            // The writer gave up (local disk full, say): dropping `request` stops the agent.
            Err(error) => return Err(route.local_failure(error)),
            Ok(staged) => (request.answer().await, Ok(staged)),
        },
    };
    let summary = match answer.map_err(|error| route.broken(error))? {
        Answer::Value(value) => decode_value::<FileSummary>(&value).map_err(|message| {
            route.corrupt(format!("the agent's report was unreadable: {message}"))
        })?,
        Answer::Failed(failure) => return Err(route.remote_failure(failure)),
    };
    let staged = staged.map_err(|error| route.local_failure(error))?;
    let Some((file, announced)) = staged else {
        return Err(
            route.corrupt("the agent reported success without sending the file".to_string())
        );
    };
    if summary.size != announced {
        return Err(route.corrupt(format!(
            "the agent announced {announced} bytes but reported sending {}",
            summary.size
        )));
    }
    let checksum: [u8; 32] = summary.checksum.as_slice().try_into().map_err(|_| {
        route.corrupt(format!(
            "the agent's checksum has {} bytes instead of 32",
            summary.checksum.len()
        ))
    })?;
    let expected = Expected {
        size: summary.size,
        checksum,
    };
    let mode = effective_mode(options.mode, summary.mode, crate::files::umask());
    let mtime = options.preserve_mtime.then_some(summary.mtime);
    let committed = tokio::task::spawn_blocking(move || file.commit(&expected, mode, mtime))
        .await
        .map_err(|error| route.error(std::io::ErrorKind::Other, error.to_string()))?
        .map_err(|error| route.local_failure(error))?;
    Ok(Transfer {
        local_path: route.local.clone(),
        remote_path: route.remote.clone(),
        size: committed.size,
        checksum: checksum_hex(&committed.checksum),
        changed: true,
    })
}

/// Writes the fetched file into an [`AtomicFile`] until the stream ends,
/// and returns it with the size the agent announced. Creates nothing until
/// the agent has opened the remote file; refuses data before that, and
/// bytes beyond the announced size.
fn receive_file(
    mut events: Receiver<StreamEvent>,
    target: PathBuf,
    create_dirs: bool,
    sync: bool,
    (progress, host): (Option<SharedProgress>, String),
) -> Result<Option<(AtomicFile, u64)>, FileError> {
    let mut file: Option<(AtomicFile, u64)> = None;
    let refuse = |message: String| {
        FileError::new(
            "receiving",
            &target,
            std::io::Error::new(std::io::ErrorKind::InvalidData, message),
        )
    };
    while let Some(event) = events.blocking_recv() {
        match event {
            StreamEvent::Head(size) => {
                if file.is_some() {
                    return Err(refuse("the agent opened the file twice".into()));
                }
                let mut created = AtomicFile::create(&target, create_dirs)?;
                created.set_durable(sync);
                file = Some((created, size));
            }
            StreamEvent::Data(data) => {
                let Some((file, announced)) = file.as_mut() else {
                    return Err(refuse("the agent sent data before opening the file".into()));
                };
                if file.written() + data.len() as u64 > *announced {
                    return Err(refuse(format!(
                        "the agent sent more than the {announced} bytes it announced"
                    )));
                }
                file.write(&data)?;
                advanced(&progress, &host, file.written(), *announced);
            }
        }
    }
    Ok(file)
}
