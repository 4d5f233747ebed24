//! The Kubernetes source: one kube-rs watcher per kind (Pods, Namespaces, NetworkPolicies, Nodes,
//! ClusterNetworkPolicies; all namespaces), merged into one stream of [`SourceEvent`]s.
//!
//! ClusterNetworkPolicy is a CRD: where it is not installed the API answers 404, which counts as an
//! empty list (no such policy can exist), so the agent syncs and enforces NetworkPolicies; the
//! watcher keeps retrying with backoff and picks the CRD up when it is installed.
//!
//! Memory: objects are never cached here. Per kind only the keys of the objects we have emitted (and their
//! resourceVersion) are kept, which is what it takes to turn a relist into `Deleted` events for objects
//! that vanished while the watch was down, and to skip re-emitting objects a relist shows unchanged;
//! for Pods, Nodes and Namespaces also the change emitted last (a Pod's is the engine's own `Arc`),
//! so that a status heartbeat is not sent on. ~100 bytes per object. In flight: up to one list
//! page of decoded objects per kind, which each kind's watcher task may run ahead of the consumer.
//!
//! Errors: every watch error is logged with the kind and retried with kube's default backoff (800 ms
//! doubling to 30 s, client-go's parameters); a 410 Gone makes the watcher relist. Nothing here panics.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use futures::stream::{self, BoxStream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Client, Config, Resource};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{ClusterNetworkPolicy, Kind, Object, ObjectRef, SourceError, SourceEvent};
use palisade_policy::model::Change;

/// Server-side timeout of one watch request when none is configured (the API server's own default range
/// is 30-60 min; client-go uses 5-10 min; kube-rs 290 s).
pub const DEFAULT_WATCH_TIMEOUT_SECS: u32 = 290;

/// Watches Pods, Namespaces, NetworkPolicies and Nodes in all namespaces and emits [`SourceEvent`]s.
///
/// Build it with [`KubeSource::in_cluster`], [`KubeSource::from_kubeconfig`] or
/// [`KubeSource::from_client`], then drive it with [`KubeSource::run`].
pub struct KubeSource {
    client: Client,
    watch_timeout_secs: u32,
}

impl std::fmt::Debug for KubeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeSource")
            .field("watch_timeout_secs", &self.watch_timeout_secs)
            .finish()
    }
}

impl KubeSource {
    /// A source using the pod's service account (`KUBERNETES_SERVICE_HOST`/`PORT` and
    /// `/var/run/secrets/kubernetes.io/serviceaccount`).
    pub fn in_cluster() -> Result<Self, SourceError> {
        let config = Config::incluster().map_err(|e| SourceError::KubeConfig {
            origin: "in-cluster service account".into(),
            message: e.to_string(),
        })?;
        Self::from_config(config)
    }

    /// A source using the kubeconfig file at `path` (its current context).
    pub async fn from_kubeconfig(path: &Path) -> Result<Self, SourceError> {
        let origin = || format!("kubeconfig {}", path.display());
        let kubeconfig = Kubeconfig::read_from(path).map_err(|e| SourceError::KubeConfig {
            origin: origin(),
            message: e.to_string(),
        })?;
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|e| SourceError::KubeConfig {
                origin: origin(),
                message: e.to_string(),
            })?;
        Self::from_config(config)
    }

    /// A source using an explicit client configuration.
    pub fn from_config(config: Config) -> Result<Self, SourceError> {
        let client =
            Client::try_from(config).map_err(|e| SourceError::KubeClient(e.to_string()))?;
        Ok(Self::from_client(client))
    }

    /// A source using an existing client (tests build one against a local server).
    pub fn from_client(client: Client) -> Self {
        KubeSource {
            client,
            watch_timeout_secs: DEFAULT_WATCH_TIMEOUT_SECS,
        }
    }

    /// Sets the server-side timeout of each watch request. When it expires the watch is resumed from the
    /// last seen resourceVersion (no relist). Values below 1 s are raised to 1 s.
    pub fn with_watch_timeout(mut self, secs: u32) -> Self {
        self.watch_timeout_secs = secs.max(1);
        self
    }

    /// Runs the four watchers until the receiver of `tx` is dropped, then returns `Ok(())`.
    ///
    /// Emits, in order per kind:
    /// - `Applied` for every object of a (re)list and for every watch ADDED/MODIFIED; objects are
    ///   [stripped](Object::strip) of managedFields and annotations. A relist does not re-emit an object
    ///   whose resourceVersion is unchanged since we last emitted it.
    /// - `Deleted` for every watch DELETED, and after each relist for every object that was known before
    ///   but is missing from it (deleted while the watch was down).
    /// - `Synced` once, after every kind completed its first list.
    ///
    /// Watch errors (API server down, 403, 410 Gone, decode errors) are logged and retried with kube's
    /// default backoff; they never end `run`.
    pub async fn run<T: From<SourceEvent>>(self, tx: mpsc::Sender<T>) -> Result<(), SourceError> {
        let config = watcher::Config::default().timeout(self.watch_timeout_secs);
        let streams = vec![
            kind_stream::<Pod>(&self.client, &config, Kind::Pod, |o| {
                Object::Pod(Box::new(o))
            }),
            kind_stream::<Namespace>(&self.client, &config, Kind::Namespace, |o| {
                Object::Namespace(Box::new(o))
            }),
            kind_stream::<NetworkPolicy>(&self.client, &config, Kind::NetworkPolicy, |o| {
                Object::NetworkPolicy(Box::new(o))
            }),
            kind_stream::<Node>(&self.client, &config, Kind::Node, |o| {
                Object::Node(Box::new(o))
            }),
            kind_stream::<ClusterNetworkPolicy>(
                &self.client,
                &config,
                Kind::ClusterNetworkPolicy,
                |o| Object::ClusterNetworkPolicy(Box::new(o)),
            ),
        ];
        let mut events = stream::select_all(streams);
        let mut tracker = Tracker::default();
        let mut crd_missing = false;
        info!("kubernetes source: watching pods, namespaces, networkpolicies, nodes and clusternetworkpolicies");
        loop {
            let next = tokio::select! {
                next = events.next() => next,
                _ = tx.closed() => None,
            };
            let Some((kind, event)) = next else {
                // The receiver is gone (the watchers themselves never end).
                debug!("kubernetes source: receiver dropped, stopping");
                return Ok(());
            };
            let event = match event {
                Ok(event) => event,
                Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                    info!(kind = %kind, message = %status.message, "kubernetes watch expired (410 Gone); relisting");
                    continue;
                }
                Err(err) if kind == Kind::ClusterNetworkPolicy && not_found(&err) => {
                    if !crd_missing {
                        crd_missing = true;
                        info!(
                            kind = %kind,
                            "the ClusterNetworkPolicy CRD (policy.networking.k8s.io/v1alpha2) is not installed: none are enforced; watching for it (kubectl apply -f deploy/ installs it)"
                        );
                    }
                    let absent = tracker.absent(kind);
                    for out in absent {
                        if tx.send(out.into()).await.is_err() {
                            return Ok(());
                        }
                    }
                    continue;
                }
                Err(err) => {
                    warn!(
                        kind = %kind,
                        error = %err,
                        "kubernetes watch failed; retrying with backoff (check API server reachability and RBAC: list/watch {kind})"
                    );
                    continue;
                }
            };
            if kind == Kind::ClusterNetworkPolicy && crd_missing {
                crd_missing = false;
                info!(kind = %kind, "the ClusterNetworkPolicy CRD is installed now: enforcing them");
            }
            for out in tracker.handle(kind, event) {
                if tx.send(out.into()).await.is_err() {
                    debug!("kubernetes source: receiver dropped, stopping");
                    return Ok(());
                }
            }
        }
    }
}

/// Whether a watch error says the resource does not exist (404: a CRD that is not installed).
fn not_found(err: &watcher::Error) -> bool {
    match err {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 404,
        watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}

/// A watcher event with the object already converted, tagged by kind.
type KindEvent = (Kind, Result<Event<Object>, watcher::Error>);

/// Events a kind's watcher may run ahead of the consumer: one list page (kube's page size is 500)
/// and a few more, so the next page is requested and decoded while the consumer still works
/// through the current one.
const PREFETCH_EVENTS: usize = 512;

/// A kind's watcher, polled by a task of its own that runs up to [`PREFETCH_EVENTS`] ahead of the
/// consumer. Polled inline, kube's watcher asks for page N+1 only once the consumer has taken the
/// last item of page N, so the list alternated between waiting for the server and decoding (the
/// machine half idle during a 100k-pod list). The task ends when the returned stream is dropped.
fn kind_stream<K>(
    client: &Client,
    config: &watcher::Config,
    kind: Kind,
    wrap: fn(K) -> Object,
) -> BoxStream<'static, KindEvent>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::all(client.clone());
    let mut events = watcher::watcher(api, config.clone())
        .default_backoff()
        .map(move |event| (kind, event.map(|event| map_event(event, wrap))))
        .boxed();
    let (tx, rx) = mpsc::channel(PREFETCH_EVENTS);
    let task = AbortOnDrop(tokio::spawn(async move {
        while let Some(event) = events.next().await {
            if tx.send(event).await.is_err() {
                return;
            }
        }
    }));
    stream::unfold((rx, task), |(mut rx, task)| async move {
        let event = rx.recv().await?;
        Some((event, (rx, task)))
    })
    .boxed()
}

/// Aborts a task when dropped: a watcher's task, idle in a long watch request, goes with the stream
/// that reads it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn map_event<K>(event: Event<K>, wrap: fn(K) -> Object) -> Event<Object> {
    match event {
        Event::Apply(o) => Event::Apply(wrap(o)),
        Event::Delete(o) => Event::Delete(wrap(o)),
        Event::Init => Event::Init,
        Event::InitApply(o) => Event::InitApply(wrap(o)),
        Event::InitDone => Event::InitDone,
    }
}

/// What was last told the engine about one object.
struct Known {
    /// Its resourceVersion then (empty when the object had none).
    rv: Box<str>,
    /// The change emitted last, kept for Pods, Nodes and Namespaces only: their status heartbeats
    /// (a kubelet's probe times, a Node's conditions) arrive as watch events that, once stripped,
    /// change nothing, and are not sent on. Policies have no status and are always sent.
    last: Option<Last>,
}

/// A change as [`Known`] keeps it. A Pod's is the `Arc` the engine's state shares: a pointer per
/// pod, where a whole `Change` (sized for a policy) took ~180 bytes and, with its own copy of the
/// key, ~30 MB at 100k pods.
enum Last {
    Pod(Arc<palisade_policy::model::Pod>),
    Other(Box<Change>),
}

impl Last {
    fn of(change: &Change) -> Self {
        match change {
            Change::UpsertPod(p) => Last::Pod(Arc::clone(p)),
            other => Last::Other(Box::new(other.clone())),
        }
    }

    fn is(&self, change: &Change) -> bool {
        match (self, change) {
            (Last::Pod(held), Change::UpsertPod(p)) => Arc::ptr_eq(held, p) || **held == **p,
            (Last::Other(held), c) => **held == *c,
            _ => false,
        }
    }
}

/// Keys (and resourceVersions) of the objects emitted per kind; turns watcher events into source events.
#[derive(Default)]
struct Tracker {
    known: HashMap<Kind, HashMap<ObjectRef, Known>>,
    /// Objects seen since the last `Init` of each kind (a relist in progress).
    relisting: HashMap<Kind, HashSet<ObjectRef>>,
    /// Kinds that completed their first list.
    listed: HashSet<Kind>,
    synced: bool,
}

impl Tracker {
    fn handle(&mut self, kind: Kind, event: Event<Object>) -> Vec<SourceEvent> {
        let mut out = Vec::new();
        match event {
            Event::Init => {
                debug!(kind = %kind, "kubernetes source: (re)list started");
                self.relisting.insert(kind, HashSet::new());
            }
            Event::InitApply(object) => {
                let object = object.strip();
                let key = object.reference();
                let rv = object
                    .meta()
                    .resource_version
                    .as_deref()
                    .unwrap_or_default();
                self.relisting.entry(kind).or_default().insert(key.clone());
                let known = self.known.entry(kind).or_default();
                let unchanged = !rv.is_empty() && known.get(&key).is_some_and(|k| *k.rv == *rv);
                if unchanged {
                    return out;
                }
                let rv = rv.into();
                out.extend(emit(known, key, rv, SourceEvent::applied(object)));
            }
            Event::InitDone => {
                let listed = self.relisting.remove(&kind).unwrap_or_default();
                let known = self.known.entry(kind).or_default();
                let mut gone: Vec<ObjectRef> = known
                    .keys()
                    .filter(|key| !listed.contains(*key))
                    .cloned()
                    .collect();
                gone.sort();
                if !gone.is_empty() {
                    info!(kind = %kind, count = gone.len(), "kubernetes source: objects deleted while the watch was down");
                }
                for key in gone {
                    known.remove(&key);
                    out.push(SourceEvent::deleted(key));
                }
                debug!(kind = %kind, objects = known.len(), "kubernetes source: list complete");
                self.listed.insert(kind);
                if !self.synced && Kind::ALL.iter().all(|k| self.listed.contains(k)) {
                    self.synced = true;
                    info!("kubernetes source: every kind listed, synced");
                    out.push(SourceEvent::Synced);
                }
            }
            Event::Apply(object) => {
                let object = object.strip();
                let key = object.reference();
                let rv = object
                    .meta()
                    .resource_version
                    .as_deref()
                    .unwrap_or_default()
                    .into();
                let known = self.known.entry(kind).or_default();
                out.extend(emit(known, key, rv, SourceEvent::applied(object)));
            }
            Event::Delete(object) => {
                let key = object.reference();
                self.known.entry(kind).or_default().remove(&key);
                if let Some(relisting) = self.relisting.get_mut(&kind) {
                    relisting.remove(&key);
                }
                out.push(SourceEvent::deleted(key));
            }
        }
        out
    }

    /// The API has no such resource (its CRD is not installed): as an empty list, so objects known
    /// before are deleted and the kind counts as listed for `Synced`.
    fn absent(&mut self, kind: Kind) -> Vec<SourceEvent> {
        if self.listed.contains(&kind) && self.known.get(&kind).is_none_or(HashMap::is_empty) {
            return Vec::new(); // told already
        }
        let mut out = self.handle(kind, Event::Init);
        out.extend(self.handle(kind, Event::InitDone));
        out
    }
}

/// Records `key` at `rv` and returns `event`, unless it would tell the engine what it was last
/// told about the same object.
fn emit(
    known: &mut HashMap<ObjectRef, Known>,
    key: ObjectRef,
    rv: Box<str>,
    event: SourceEvent,
) -> Option<SourceEvent> {
    let keeps_last = matches!(key.kind, Kind::Pod | Kind::Node | Kind::Namespace);
    let entry = known.entry(key).or_insert_with(|| Known {
        rv: Box::default(),
        last: None,
    });
    entry.rv = rv;
    if let SourceEvent::Changed { change, .. } = &event {
        if keeps_last {
            if entry.last.as_ref().is_some_and(|l| l.is(change)) {
                return None;
            }
            entry.last = Some(Last::of(change));
        }
    }
    Some(event)
}
