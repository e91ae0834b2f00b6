//! [`skip_unchanged`](crate::Put::skip_unchanged): what is at a put's
//! target, asked of the agent with an ordinary call, and compared here
//! with what would be sent.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use super::{PutSource, Route, Transfer, TransferOptions};
use crate::accounts::Ownership;
use crate::error::Result;
use crate::files::{FileError, Source, checksum_hex};
use crate::tunnel::Tunnel;

/// A regular file at the target, as the agent found it.
#[derive(Debug, Serialize, Deserialize)]
struct Present {
    size: u64,
    checksum: ByteBuf,
    mode: u32,
    uid: u32,
    gid: u32,
    /// The ids the asked-for owner and group have on the host.
    wanted: (Option<u32>, Option<u32>),
}

/// Runs on the agent: the target's size, BLAKE3, mode and owner, or
/// `None` when it is not a readable regular file or a name is unknown
/// there (the put that follows then says what is wrong).
fn present(path: ByteBuf, owner: Option<String>, group: Option<String>) -> Option<Present> {
    let path = PathBuf::from(OsString::from_vec(path.into_vec()));
    let wanted = Ownership::resolve(owner.as_deref(), group.as_deref()).ok()?;
    let (size, checksum, metadata) = digest(&path).ok()?;
    Some(Present {
        size,
        checksum: ByteBuf::from(checksum.to_vec()),
        mode: metadata.mode() & 0o7777,
        uid: metadata.uid(),
        gid: metadata.gid(),
        wanted: (wanted.uid, wanted.gid),
    })
}

/// The size, BLAKE3 and metadata of the regular file at `path`, read whole
/// (a file that changes while it is read is an error).
fn digest(path: &std::path::Path) -> Result<(u64, [u8; 32], std::fs::Metadata), FileError> {
    let mut source = Source::open(path)?;
    let mut chunk = Vec::new();
    while source.read_chunk(&mut chunk, 1 << 20)? {}
    Ok((source.len(), source.checksum(), source.metadata().clone()))
}

/// The transfer to report when the target already is as `source` and
/// `options` ask, or `None` when the put must go ahead.
pub(super) async fn check(
    tunnel: &Tunnel,
    route: &Route,
    source: &PutSource,
    options: &TransferOptions,
) -> Result<Option<Transfer>> {
    let local = source.clone();
    let (size, checksum) = tokio::task::spawn_blocking(move || match local {
        PutSource::Memory(bytes) => Ok((bytes.len() as u64, *blake3::hash(&bytes).as_bytes())),
        PutSource::File(path) => digest(&path).map(|(size, checksum, _)| (size, checksum)),
    })
    .await
    .map_err(|error| route.error(std::io::ErrorKind::Other, error.to_string()))?
    .map_err(|error| route.local_failure(error))?;
    let path = ByteBuf::from(route.remote.as_os_str().as_bytes().to_vec());
    let found = tunnel
        .call(
            present,
            (path, options.owner.clone(), options.group.clone()),
        )
        .await
        .map_err(|error| route.broken(error))?;
    let Some(found) = found else {
        return Ok(None);
    };
    let asked = |wanted: Option<u32>, has: u32| wanted.is_none_or(|id| id == has);
    let same = found.size == size
        && found.checksum.as_slice() == checksum.as_slice()
        && options.mode.is_none_or(|mode| mode & 0o7777 == found.mode)
        && asked(found.wanted.0, found.uid)
        && asked(found.wanted.1, found.gid);
    Ok(same.then(|| Transfer {
        local_path: route.local.clone(),
        remote_path: route.remote.clone(),
        size,
        checksum: checksum_hex(&checksum),
        changed: false,
    }))
}
