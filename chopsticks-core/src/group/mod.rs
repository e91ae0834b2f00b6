//! [`Group`]: one call on many tunnels at once, and [`GroupResult`], what each host returned.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;

use std::sync::Arc;

mod transfer;

pub use transfer::{GroupFetch, GroupPut};

use crate::error::{Error, Result};
use crate::progress::{Progress, ProgressEvent, SharedProgress};
use crate::protocol::{CallMode, FunctionRef, encode_value};
use crate::remote::{AsyncRemoteFn, RemoteFn, async_function_ref, function_ref};
use crate::stream::CallStream;
use crate::transfer::TransferOptions;
use crate::tunnel::{Call, Tunnel};

/// Tunnels keyed by host name. Calls run on every host concurrently, at most
/// [`max_parallel`](Self::max_parallel) at a time; one slow or dead host
/// never delays the others' results beyond its own timeout.
///
/// Groups combine by host with `|` (union), `&` (intersection), `-`
/// (difference) and `^` (symmetric difference). A host's tunnel comes from the
/// left operand when both have it.
#[derive(Clone, Default)]
pub struct Group {
    tunnels: BTreeMap<String, Tunnel>,
    max_parallel: Option<usize>,
    timeout: Option<Duration>,
    progress: Option<SharedProgress>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("hosts", &self.tunnels.keys().collect::<Vec<_>>())
            .field("max_parallel", &self.max_parallel)
            .field("timeout", &self.timeout)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

/// The merged items of a streaming call on every host of a [`Group`]
/// ([`Group::call_stream`]): a [`Stream`](futures_util::Stream) of
/// `(host, chopsticks::Result<T>)` in the order they arrive. Dropping it
/// cancels the call on every host.
#[must_use = "a streaming call does nothing until it is polled"]
pub struct GroupStream<'g, T> {
    items: std::pin::Pin<Box<dyn futures_util::Stream<Item = HostItem<'g, T>> + Send + 'g>>,
}

impl<T> std::fmt::Debug for GroupStream<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupStream").finish_non_exhaustive()
    }
}

impl<'g, T> futures_util::Stream for GroupStream<'g, T> {
    type Item = (&'g str, Result<T>);

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.items.as_mut().poll_next(cx)
    }
}

/// An item of a [`GroupStream`], tagged with its host.
type HostItem<'g, T> = (&'g str, Result<T>);

/// What every host of a [`Group`] returned, keyed by host. Its errors are
/// chopsticks' own, or a helper's (`E`) for helpers built on groups.
#[derive(Debug)]
pub struct GroupResult<R, E = Error> {
    results: BTreeMap<String, std::result::Result<R, E>>,
}

/// An error that can stand for several hosts' failures at once, so that
/// [`GroupResult::into_result`] can give one.
pub trait HostFailures: Sized {
    /// One error listing `failures`, one per failed host.
    fn from_failures(failures: Vec<Self>) -> Self;
}

impl HostFailures for Error {
    fn from_failures(failures: Vec<Error>) -> Error {
        Error::Hosts { failures }
    }
}

/// Collects `(host, result)` pairs; a later pair for the same host wins.
///
/// ```
/// use chopsticks_core::GroupResult;
///
/// let results: GroupResult<u32> = [("a".to_string(), Ok(1))].into_iter().collect();
/// assert_eq!(results.successful().collect::<Vec<_>>(), [("a", &1)]);
/// ```
impl<R, E> FromIterator<(String, std::result::Result<R, E>)> for GroupResult<R, E> {
    fn from_iter<I: IntoIterator<Item = (String, std::result::Result<R, E>)>>(pairs: I) -> Self {
        GroupResult {
            results: pairs.into_iter().collect(),
        }
    }
}

impl Group {
    /// A group of `tunnels`. Host names are the keys, so two tunnels with the
    /// same host are refused with [`Error::Group`].
    pub fn new(tunnels: impl IntoIterator<Item = Tunnel>) -> Result<Group> {
        let mut group = Group::default();
        for tunnel in tunnels {
            let host = tunnel.host().to_string();
            if group.tunnels.insert(host.clone(), tunnel).is_some() {
                return Err(Error::Group {
                    host,
                    phase: crate::error::Phase::Connect,
                    message: "two tunnels of the group have this host name; host names are the group's keys".into(),
                });
            }
        }
        Ok(group)
    }

    /// Runs at most `limit` hosts at a time (default: all at once).
    pub fn max_parallel(mut self, limit: usize) -> Group {
        self.max_parallel = Some(limit.max(1));
        self
    }

    /// How many hosts are worked on at once: the
    /// [`max_parallel`](Self::max_parallel) limit, or every host.
    pub fn parallelism(&self) -> usize {
        self.max_parallel.unwrap_or(self.len()).max(1)
    }

    /// Bounds every call on every host, overriding the tunnels' own default.
    pub fn timeout(mut self, timeout: Duration) -> Group {
        self.timeout = Some(timeout);
        self
    }

    /// Reports each host's start and end of every operation, and the bytes
    /// of transfers, to `progress` (see [`progress`](crate::progress)).
    pub fn progress(mut self, progress: impl Progress + 'static) -> Group {
        self.progress = Some(Arc::new(progress));
        self
    }

    /// The options a transfer on this group starts with.
    pub(crate) fn transfer_options(&self) -> TransferOptions {
        TransferOptions {
            progress: self.progress.clone(),
            ..TransferOptions::default()
        }
    }

    /// How many hosts the group has.
    pub fn len(&self) -> usize {
        self.tunnels.len()
    }

    /// Whether the group has no hosts.
    pub fn is_empty(&self) -> bool {
        self.tunnels.is_empty()
    }

    /// The host names, in order.
    pub fn hosts(&self) -> impl Iterator<Item = &str> {
        self.tunnels.keys().map(String::as_str)
    }

    /// The tunnel for `host`.
    pub fn get(&self, host: &str) -> Option<&Tunnel> {
        self.tunnels.get(host)
    }

    /// The tunnels, in host order.
    pub fn tunnels(&self) -> impl Iterator<Item = &Tunnel> {
        self.tunnels.values()
    }

    /// Starts every agent now.
    pub async fn connect(&self) -> GroupResult<()> {
        self.each(Some("connect"), |tunnel| {
            Box::pin(async move { tunnel.connect().await })
        })
        .await
    }

    /// Stops every agent.
    pub async fn close(&self) -> GroupResult<()> {
        self.each(Some("close"), |tunnel| {
            Box::pin(async move { tunnel.close().await })
        })
        .await
    }

    /// Calls the blocking function `function` with `args` on every host.
    /// The arguments are encoded once.
    pub async fn call<F, Args>(&self, function: F, args: Args) -> GroupResult<F::Output>
    where
        F: RemoteFn<Args>,
        Args: Serialize + DeserializeOwned,
        F::Output: Serialize + DeserializeOwned + Send,
    {
        let () = crate::remote::CapturesNothing::<F>::CHECK;
        self.call_all(
            function_ref(function),
            CallMode::Blocking,
            encode_value(&args),
        )
        .await
    }

    /// Calls the `async` function `function` with `args` on every host.
    pub async fn call_async<F, Args>(&self, function: F, args: Args) -> GroupResult<F::Output>
    where
        F: AsyncRemoteFn<Args>,
        Args: Serialize + DeserializeOwned + Send + 'static,
        F::Output: Serialize + DeserializeOwned + Send + 'static,
    {
        let () = crate::remote::CapturesNothing::<F>::CHECK;
        self.call_all(
            async_function_ref(function),
            CallMode::Async,
            encode_value(&args),
        )
        .await
    }

    /// Calls `function`, a plain function that returns an iterator, on
    /// every host, and merges the hosts' items into one stream as they
    /// come, each tagged with its host (see [`Tunnel::call_stream`]).
    ///
    /// At most [`max_parallel`](Self::max_parallel) hosts stream at once;
    /// a host whose stream ends makes room for the next. A slow or dead
    /// host never holds the others back: each host's stream has its own
    /// flow control, and a host's failure is one `(host, Err(..))` item
    /// that ends only that host's stream. The group's
    /// [`timeout`](Self::timeout) does not apply: a stream may be endless.
    pub fn call_stream<F, Args>(
        &self,
        function: F,
        args: Args,
    ) -> GroupStream<'_, <F::Output as IntoIterator>::Item>
    where
        F: RemoteFn<Args>,
        Args: Serialize + DeserializeOwned,
        F::Output: IntoIterator,
        <F::Output as IntoIterator>::Item: Serialize + DeserializeOwned + Send + 'static,
    {
        let () = crate::remote::CapturesNothing::<F>::CHECK;
        let _ = function;
        self.stream_all(
            crate::remote::stream_function_ref_of::<F, Args>(),
            CallMode::BlockingStream,
            encode_value(&args),
        )
    }

    /// Like [`call_stream`](Self::call_stream) for a function that returns
    /// a [`Stream`](futures_util::Stream) (see [`Tunnel::call_stream_async`]).
    pub fn call_stream_async<F, Args>(
        &self,
        function: F,
        args: Args,
    ) -> GroupStream<'_, <F::Output as futures_util::Stream>::Item>
    where
        F: RemoteFn<Args>,
        Args: Serialize + DeserializeOwned + Send + 'static,
        F::Output: futures_util::Stream + Send + 'static,
        <F::Output as futures_util::Stream>::Item: Serialize + DeserializeOwned + Send + 'static,
    {
        let () = crate::remote::CapturesNothing::<F>::CHECK;
        let _ = function;
        self.stream_all(
            crate::remote::async_stream_function_ref_of::<F, Args>(),
            CallMode::AsyncStream,
            encode_value(&args),
        )
    }

    fn stream_all<'g, T>(
        &'g self,
        function: FunctionRef,
        mode: CallMode,
        args: std::result::Result<Vec<u8>, String>,
    ) -> GroupStream<'g, T>
    where
        T: DeserializeOwned + Send + 'g,
    {
        let limit = self.max_parallel.unwrap_or(self.tunnels.len()).max(1);
        let hosts: Vec<_> = self
            .tunnels
            .iter()
            .map(|(host, tunnel)| {
                CallStream::new(tunnel, function.clone(), mode, args.clone())
                    .map(move |item| (host.as_str(), item))
            })
            .collect();
        GroupStream {
            items: Box::pin(futures_util::stream::iter(hosts).flatten_unordered(limit)),
        }
    }

    /// The sub-group of hosts on which `function(args)` returned true.
    /// Hosts where the call failed are left out.
    pub async fn filter<F, Args>(&self, function: F, args: Args) -> Group
    where
        F: RemoteFn<Args, Output = bool>,
        Args: Serialize + DeserializeOwned,
    {
        let () = crate::remote::CapturesNothing::<F>::CHECK;
        let verdicts = self.call(function, args).await;
        self.keep(|host| matches!(verdicts.get(host), Some(Ok(true))))
    }

    async fn call_all<R>(
        &self,
        function: FunctionRef,
        mode: CallMode,
        args: std::result::Result<Vec<u8>, String>,
    ) -> GroupResult<R>
    where
        R: DeserializeOwned + Send,
    {
        let timeout = self.timeout;
        let task = format!("call {}", function.name());
        self.each(Some(&task), |tunnel| {
            let call = Call::new(tunnel, function.clone(), mode, args.clone());
            let call = match timeout {
                Some(timeout) => call.timeout(timeout),
                None => call,
            };
            Box::pin(call)
        })
        .await
    }

    /// Runs `start` on every host, at most `max_parallel` at a time. With a
    /// `task` name, each host's start and end are reported to the group's progress.
    pub(crate) async fn each<'g, R>(
        &'g self,
        task: Option<&str>,
        start: impl Fn(
            &'g Tunnel,
        )
            -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<R>> + Send + 'g>>,
    ) -> GroupResult<R> {
        let limit = self.max_parallel.unwrap_or(self.tunnels.len()).max(1);
        let progress = task.and_then(|task| self.progress.clone().map(|progress| (progress, task)));
        let progress = &progress;
        // Built eagerly (futures are lazy) so the stream holds no closure,
        // which keeps the returned future `Send` for any caller.
        let mut runs = Vec::with_capacity(self.tunnels.len());
        for (host, tunnel) in &self.tunnels {
            let running = start(tunnel);
            runs.push(async move {
                if let Some((progress, task)) = progress {
                    progress.report(&ProgressEvent::Started {
                        host,
                        task,
                        total: None,
                    });
                }
                let result = running.await;
                if let Some((progress, _)) = progress {
                    progress.report(&ProgressEvent::Finished {
                        host,
                        ok: result.is_ok(),
                    });
                }
                (host.clone(), result)
            });
        }
        let results = futures_util::stream::iter(runs)
            .buffer_unordered(limit)
            .collect::<BTreeMap<_, _>>()
            .await;
        GroupResult { results }
    }

    fn keep(&self, wanted: impl Fn(&str) -> bool) -> Group {
        Group {
            tunnels: self
                .tunnels
                .iter()
                .filter(|(host, _)| wanted(host))
                .map(|(host, tunnel)| (host.clone(), tunnel.clone()))
                .collect(),
            max_parallel: self.max_parallel,
            timeout: self.timeout,
            progress: self.progress.clone(),
        }
    }

    /// Hosts in either group.
    pub fn union(&self, other: &Group) -> Group {
        let mut union = self.clone();
        for (host, tunnel) in &other.tunnels {
            union
                .tunnels
                .entry(host.clone())
                .or_insert_with(|| tunnel.clone());
        }
        union
    }

    /// Hosts in both groups.
    pub fn intersection(&self, other: &Group) -> Group {
        self.keep(|host| other.tunnels.contains_key(host))
    }

    /// Hosts in this group but not in `other`.
    pub fn difference(&self, other: &Group) -> Group {
        self.keep(|host| !other.tunnels.contains_key(host))
    }

    /// Hosts in exactly one of the groups.
    pub fn symmetric_difference(&self, other: &Group) -> Group {
        self.difference(other).union(&other.difference(self))
    }
}

impl From<Tunnel> for Group {
    fn from(tunnel: Tunnel) -> Group {
        let mut group = Group::default();
        group.tunnels.insert(tunnel.host().to_string(), tunnel);
        group
    }
}

macro_rules! set_operator {
    ($trait:ident, $method:ident, $set:ident) => {
        impl std::ops::$trait<&Group> for &Group {
            type Output = Group;
            fn $method(self, other: &Group) -> Group {
                self.$set(other)
            }
        }

        impl std::ops::$trait<Group> for Group {
            type Output = Group;
            fn $method(self, other: Group) -> Group {
                self.$set(&other)
            }
        }
    };
}

set_operator!(BitOr, bitor, union);
set_operator!(BitAnd, bitand, intersection);
set_operator!(Sub, sub, difference);
set_operator!(BitXor, bitxor, symmetric_difference);

impl<R, E> GroupResult<R, E> {
    /// How many hosts answered, successfully or not.
    pub fn len(&self) -> usize {
        self.results.len()
    }

    /// Whether the group was empty.
    pub fn is_empty(&self) -> bool {
        self.results.is_empty()
    }

    /// What `host` returned.
    pub fn get(&self, host: &str) -> Option<&std::result::Result<R, E>> {
        self.results.get(host)
    }

    /// `(host, value)` for every host whose call succeeded, in host order.
    pub fn successful(&self) -> impl Iterator<Item = (&str, &R)> {
        self.results
            .iter()
            .filter_map(|(host, result)| result.as_ref().ok().map(|value| (host.as_str(), value)))
    }

    /// `(host, error)` for every host whose call failed, in host order.
    pub fn failures(&self) -> impl Iterator<Item = (&str, &E)> {
        self.results
            .iter()
            .filter_map(|(host, result)| result.as_ref().err().map(|error| (host.as_str(), error)))
    }

    /// Every host's result.
    pub fn into_inner(self) -> BTreeMap<String, std::result::Result<R, E>> {
        self.results
    }

    /// Every host's value, or one error listing every failed host
    /// ([`Error::Hosts`] for chopsticks' own errors).
    pub fn into_result(self) -> std::result::Result<BTreeMap<String, R>, E>
    where
        E: HostFailures,
    {
        let mut values = BTreeMap::new();
        let mut failures = Vec::new();
        for (host, result) in self.results {
            match result {
                Ok(value) => {
                    values.insert(host, value);
                }
                Err(error) => failures.push(error),
            }
        }
        if failures.is_empty() {
            Ok(values)
        } else {
            Err(E::from_failures(failures))
        }
    }
}
