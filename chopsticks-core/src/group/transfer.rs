//! `put` and `fetch` on every host of a [`Group`].

use std::collections::BTreeMap;
use std::future::{Future, IntoFuture};
use std::path::{Path, PathBuf};
use std::pin::Pin;

use super::{Group, GroupResult};
use crate::error::{Direction, Error, Phase};
use crate::transfer::{
    Job, PutSource, Route, Transfer, TransferOptions, put_options, run, transfer_options,
};
use crate::tunnel::Tunnel;

/// A pending [`Group::put`]; await it, after setting any options.
#[must_use = "a put does nothing until it is awaited"]
pub struct GroupPut<'g> {
    group: &'g Group,
    source: PutSource,
    remote: PathBuf,
    options: TransferOptions,
}

/// A pending [`Group::fetch`]; await it, after setting any options.
#[must_use = "a fetch does nothing until it is awaited"]
pub struct GroupFetch<'g> {
    group: &'g Group,
    remote: PathBuf,
    /// The local path for each host, or why the template cannot give one.
    locals: Result<BTreeMap<String, PathBuf>, String>,
    options: TransferOptions,
}

transfer_options!(GroupPut);
transfer_options!(GroupFetch);
put_options!(GroupPut);

type Running<'g> = Pin<Box<dyn Future<Output = GroupResult<Transfer>> + Send + 'g>>;

impl Group {
    /// Copies the local file `local` to `remote` on every host, with the
    /// guarantees of [`Tunnel::put`](crate::Tunnel::put) on each.
    pub fn put(&self, local: impl AsRef<Path>, remote: impl AsRef<Path>) -> GroupPut<'_> {
        GroupPut {
            group: self,
            source: PutSource::File(local.as_ref().to_path_buf()),
            remote: remote.as_ref().to_path_buf(),
            options: self.transfer_options(),
        }
    }

    /// Writes `contents` to `remote` on every host, with the guarantees of
    /// [`Tunnel::put_bytes`](crate::Tunnel::put_bytes) on each; the bytes
    /// are shared, not copied per host.
    pub fn put_bytes(
        &self,
        contents: impl Into<Vec<u8>>,
        remote: impl AsRef<Path>,
    ) -> GroupPut<'_> {
        GroupPut {
            group: self,
            source: PutSource::Memory(bytes::Bytes::from(contents.into())),
            remote: remote.as_ref().to_path_buf(),
            options: self.transfer_options(),
        }
    }

    /// Copies `remote` from every host to a local path made from
    /// `local_template` by replacing `{host}` with the host name (characters
    /// other than letters, digits, `.`, `-`, `_`, `@` and `:` become `_`, so a
    /// host name cannot leave the directory).
    ///
    /// When two hosts would write the same local path (a template without
    /// `{host}`, say), nothing moves: every host's result is that
    /// [`Error::Group`].
    pub fn fetch(
        &self,
        remote: impl AsRef<Path>,
        local_template: impl AsRef<str>,
    ) -> GroupFetch<'_> {
        GroupFetch {
            group: self,
            remote: remote.as_ref().to_path_buf(),
            locals: local_paths(self, local_template.as_ref()),
            options: self.transfer_options(),
        }
    }
}

impl<'g> IntoFuture for GroupPut<'g> {
    type Output = GroupResult<Transfer>;
    type IntoFuture = Running<'g>;

    fn into_future(self) -> Running<'g> {
        let GroupPut {
            group,
            source,
            remote,
            options,
        } = self;
        Box::pin(async move {
            let local = source.local_path();
            group
                .each(None, |tunnel: &'g Tunnel| {
                    let route = Route::new(tunnel, Direction::Put, local.clone(), remote.clone());
                    Box::pin(run(
                        tunnel,
                        route,
                        options.clone(),
                        Job::Put(source.clone()),
                    ))
                })
                .await
        })
    }
}

impl<'g> IntoFuture for GroupFetch<'g> {
    type Output = GroupResult<Transfer>;
    type IntoFuture = Running<'g>;

    fn into_future(self) -> Running<'g> {
        let GroupFetch {
            group,
            remote,
            locals,
            options,
        } = self;
        Box::pin(async move {
            let locals = match locals {
                Ok(locals) => locals,
                Err(message) => {
                    let results = group
                        .hosts()
                        .map(|host| {
                            let refused = Error::Group {
                                host: host.to_string(),
                                phase: Phase::Transfer,
                                message: message.clone(),
                            };
                            (host.to_string(), Err(refused))
                        })
                        .collect();
                    return GroupResult { results };
                }
            };
            let locals = &locals;
            group
                .each(None, |tunnel: &'g Tunnel| {
                    let local = locals.get(tunnel.host()).cloned().unwrap_or_default();
                    let route = Route::new(tunnel, Direction::Fetch, local, remote.clone());
                    Box::pin(run(tunnel, route, options.clone(), Job::Fetch))
                })
                .await
        })
    }
}

/// The local path of each host from `template`, or why two hosts would
/// share one.
fn local_paths(group: &Group, template: &str) -> Result<BTreeMap<String, PathBuf>, String> {
    let mut owners: BTreeMap<PathBuf, &str> = BTreeMap::new();
    let mut locals = BTreeMap::new();
    for host in group.hosts() {
        let local = PathBuf::from(template.replace("{host}", &path_safe(host)));
        if let Some(other) = owners.insert(local.clone(), host) {
            return Err(format!(
                "the local path template {template:?} gives {} for both {other} and {host}; \
                 put {{host}} in it so every host gets its own file",
                local.display()
            ));
        }
        locals.insert(host.to_string(), local);
    }
    Ok(locals)
}

/// `host` with every character that could change a path's meaning replaced by `_`.
fn path_safe(host: &str) -> String {
    let safe: String = host
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' | '@' | ':' => c,
            _ => '_',
        })
        .collect();
    match safe.as_str() {
        "" | "." | ".." => safe.replace('.', "_") + "_",
        _ => safe,
    }
}

#[cfg(test)]
mod tests {
    use super::path_safe;

    #[test]
    fn host_names_cannot_leave_the_directory() {
        assert_eq!(path_safe("web1.example.com"), "web1.example.com");
        assert_eq!(path_safe("../../etc/passwd"), ".._.._etc_passwd");
        assert_eq!(path_safe(".."), "___");
        assert_eq!(path_safe(""), "_");
        assert_eq!(path_safe("root@db:22"), "root@db:22");
    }
}
