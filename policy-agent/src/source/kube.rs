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
//! so that a status heartbeat is not sent on: one map entry per object, its key one string
//! (`namespace/name`), its resourceVersion a number, and the number of the list that last showed it
//! (a relist needs no second set of keys). In flight: up to one list
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
use palisade_policy::model::{Change, PodSharing};

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
    /// Its resourceVersion then.
    rv: Rv,
    /// The (re)list of its kind that last showed it: a relist deletes what it did not show.
    seen: u32,
    /// The change emitted last, kept for Pods, Nodes and Namespaces only: their status heartbeats
    /// (a kubelet's probe times, a Node's conditions) arrive as watch events that, once stripped,
    /// change nothing, and are not sent on. Policies have no status and are always sent.
    last: Option<Last>,
}

/// A resourceVersion as kept: opaque to clients by contract, a decimal number in practice (etcd's
/// revision), kept as one without an allocation. Two words: other text is boxed twice (a thin
/// pointer), so a [`Known`] is 40 bytes, not 48 (1 MB of the tracker's table at 100k pods).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rv {
    None,
    Number(u64),
    #[allow(clippy::box_collection)]
    Text(Box<String>),
}

impl Rv {
    fn of(rv: Option<&str>) -> Self {
        match rv {
            None | Some("") => Rv::None,
            // Digits only and no leading zero: exactly the texts a u64 prints back as.
            Some(text)
                if text.bytes().all(|b| b.is_ascii_digit())
                    && (text.len() == 1 || !text.starts_with('0')) =>
            {
                text.parse()
                    .map_or_else(|_| Rv::Text(Box::new(text.into())), Rv::Number)
            }
            Some(text) => Rv::Text(Box::new(text.into())),
        }
    }
}

/// An object's key within its kind: `namespace/name` in one string (`/name` for cluster-scoped
/// kinds; neither part can hold a `/`), where an [`ObjectRef`] takes two.
fn key_of(object: &ObjectRef) -> Box<str> {
    format!("{}/{}", object.namespace, object.name).into()
}

fn reference_of(kind: Kind, key: &str) -> ObjectRef {
    let (namespace, name) = key.split_once('/').unwrap_or(("", key));
    ObjectRef {
        kind,
        namespace: namespace.into(),
        name: name.into(),
    }
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
    known: HashMap<Kind, HashMap<Box<str>, Known>>,
    /// Per kind, the number of its current (re)list: the one in progress between `Init` and
    /// `InitDone`, else the last one. An object the list shows is marked with it, so a relist needs
    /// no second set of every key.
    lists: HashMap<Kind, u32>,
    /// Kinds that completed their first list.
    listed: HashSet<Kind>,
    synced: bool,
    /// Pods' label sets, namespaces and node names, shared.
    sharing: PodSharing,
}

impl Tracker {
    fn handle(&mut self, kind: Kind, event: Event<Object>) -> Vec<SourceEvent> {
        let mut out = Vec::new();
        match event {
            Event::Init => {
                debug!(kind = %kind, "kubernetes source: (re)list started");
                let list = self.lists.entry(kind).or_default();
                *list = list.wrapping_add(1);
            }
            Event::InitApply(object) => {
                let object = object.strip();
                let key = key_of(&object.reference());
                let rv = Rv::of(object.meta().resource_version.as_deref());
                let list = self.list_of(kind);
                if let Some(k) = self.known.entry(kind).or_default().get_mut(&key) {
                    k.seen = list;
                    if rv != Rv::None && k.rv == rv {
                        return out;
                    }
                }
                out.extend(self.emit(kind, key, rv, object));
            }
            Event::InitDone => {
                let list = self.list_of(kind);
                let known = self.known.entry(kind).or_default();
                let mut gone: Vec<Box<str>> = known
                    .iter()
                    .filter(|(_, k)| k.seen != list)
                    .map(|(key, _)| key.clone())
                    .collect();
                gone.sort();
                if !gone.is_empty() {
                    info!(kind = %kind, count = gone.len(), "kubernetes source: objects deleted while the watch was down");
                }
                for key in gone {
                    known.remove(&key);
                    out.push(SourceEvent::deleted(reference_of(kind, &key)));
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
                let key = key_of(&object.reference());
                let rv = Rv::of(object.meta().resource_version.as_deref());
                out.extend(self.emit(kind, key, rv, object));
            }
            Event::Delete(object) => {
                let reference = object.reference();
                self.known
                    .entry(kind)
                    .or_default()
                    .remove(&*key_of(&reference));
                out.push(SourceEvent::deleted(reference));
            }
        }
        out
    }

    /// The number of `kind`'s current (or last) list.
    fn list_of(&self, kind: Kind) -> u32 {
        self.lists.get(&kind).copied().unwrap_or_default()
    }

    /// Records `object` (of `kind`, under `key`) at `rv`, shown by the current list, and returns
    /// its event (its labels shared), unless it would tell the engine what it was last told about
    /// the same object.
    fn emit(&mut self, kind: Kind, key: Box<str>, rv: Rv, object: Object) -> Option<SourceEvent> {
        let list = self.list_of(kind);
        let event = SourceEvent::applied(object).share(&mut self.sharing);
        let keeps_last = matches!(kind, Kind::Pod | Kind::Node | Kind::Namespace);
        let entry = self
            .known
            .entry(kind)
            .or_default()
            .entry(key)
            .or_insert_with(|| Known {
                rv: Rv::None,
                seen: list,
                last: None,
            });
        entry.rv = rv;
        entry.seen = list;
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ns(name: &str, rv: &str, team: &str) -> Object {
        Object::Namespace(Box::new(
            serde_json::from_value(json!({"metadata": {"name": name, "resourceVersion": rv,
                                          "labels": {"team": team}}}))
            .expect("namespace"),
        ))
    }

    fn said(events: &[SourceEvent]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                SourceEvent::Changed { object, change } => {
                    let verb = if matches!(change, Change::DeleteNamespace { .. }) {
                        "deleted"
                    } else {
                        "applied"
                    };
                    format!("{verb} {object}")
                }
                other => format!("{other:?}"),
            })
            .collect()
    }

    fn list(t: &mut Tracker, objects: Vec<Object>) -> Vec<String> {
        let mut out = t.handle(Kind::Namespace, Event::Init);
        for o in objects {
            out.extend(t.handle(Kind::Namespace, Event::InitApply(o)));
        }
        out.extend(t.handle(Kind::Namespace, Event::InitDone));
        said(&out)
    }

    #[test]
    fn a_relist_deletes_what_it_did_not_show_and_repeats_nothing_unchanged() {
        let mut t = Tracker::default();
        let first = list(
            &mut t,
            vec![ns("a", "1", "x"), ns("b", "2", "x"), ns("c", "3", "x")],
        );
        assert_eq!(
            first,
            [
                "applied Namespace a",
                "applied Namespace b",
                "applied Namespace c"
            ]
        );
        // a unchanged (same resourceVersion), b changed, c gone, d new.
        let second = list(
            &mut t,
            vec![ns("a", "1", "x"), ns("b", "9", "y"), ns("d", "10", "x")],
        );
        assert_eq!(
            second,
            [
                "applied Namespace b",
                "applied Namespace d",
                "deleted Namespace c"
            ]
        );
        // An object deleted by a watch event is not deleted again by the next relist.
        t.handle(Kind::Namespace, Event::Delete(ns("d", "11", "x")));
        let third = list(&mut t, vec![ns("a", "1", "x"), ns("b", "9", "y")]);
        assert!(third.is_empty(), "{third:?}");
    }

    #[test]
    fn an_object_applied_by_a_watch_between_relists_survives_the_next_relist_that_shows_it() {
        let mut t = Tracker::default();
        list(&mut t, vec![ns("a", "1", "x")]);
        t.handle(Kind::Namespace, Event::Apply(ns("b", "2", "x")));
        let relist = list(&mut t, vec![ns("a", "1", "x"), ns("b", "2", "x")]);
        assert!(relist.is_empty(), "{relist:?}");
    }

    #[test]
    fn resource_versions_are_numbers_when_they_print_back_the_same_else_text() {
        assert_eq!(Rv::of(None), Rv::None);
        assert_eq!(Rv::of(Some("")), Rv::None);
        assert_eq!(Rv::of(Some("123456")), Rv::Number(123456));
        assert_eq!(Rv::of(Some("0123")), Rv::Text(Box::new("0123".into())));
        assert_eq!(Rv::of(Some("abc")), Rv::Text(Box::new("abc".into())));
        assert_eq!(Rv::of(Some("+5")), Rv::Text(Box::new("+5".into())));
        let past_u64 = "18446744073709551616";
        assert_eq!(Rv::of(Some(past_u64)), Rv::Text(Box::new(past_u64.into())));
        assert_ne!(Rv::of(Some("0123")), Rv::of(Some("123")));
        // The tracker keeps one per object: 100k pods make every word 1 MB of its table.
        assert_eq!(std::mem::size_of::<Rv>(), 16);
        assert!(std::mem::size_of::<Known>() <= 40);
    }

    #[test]
    fn keys_round_trip_for_namespaced_and_cluster_scoped_objects() {
        for object in [
            ObjectRef {
                kind: Kind::Pod,
                namespace: "default".into(),
                name: "web-1".into(),
            },
            ObjectRef {
                kind: Kind::Node,
                namespace: "".into(),
                name: "node-1".into(),
            },
        ] {
            assert_eq!(reference_of(object.kind, &key_of(&object)), object);
        }
    }
}
