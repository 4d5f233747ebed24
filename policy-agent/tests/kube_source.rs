//! The Kubernetes source against an in-test API server speaking the real list/watch protocol
//! (palisade-testkit's `apiserver`); kube-rs' client and watcher are used unchanged.

mod support;

use std::time::Duration;

use palisade_agent::source::{KubeSource, SourceError, SourceEvent};
use palisade_testkit::apiserver::ApiServer;
use serde_json::{json, Value};
use support::{applied_pod, describe_all, is, pod_label, Events, WAIT};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Waits that include one kube-rs backoff step after an error (800 ms, doubling, with jitter).
const WAIT_WITH_BACKOFF: Duration = Duration::from_secs(10);

fn pod(namespace: &str, name: &str, app: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": namespace, "labels": {"app": app},
                        "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...big...}"},
                        "managedFields": [{"manager": "kubectl", "operation": "Apply", "apiVersion": "v1"}]},
           "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox",
                     "ports": [{"name": "http", "containerPort": 80}]}]},
           "status": {"podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.5"}]}})
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}}})
}

fn node(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
           "spec": {"podCIDR": "10.244.1.0/24"},
           "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]}})
}

fn netpol(namespace: &str, name: &str) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": name, "namespace": namespace},
           "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}})
}

struct Running {
    events: Events,
    task: JoinHandle<Result<(), SourceError>>,
}

fn start(server: &ApiServer, watch_timeout: Option<u32>) -> Running {
    support::init_logging();
    let mut source = KubeSource::from_client(server.client());
    if let Some(secs) = watch_timeout {
        source = source.with_watch_timeout(secs);
    }
    let (tx, rx) = mpsc::channel(64);
    Running {
        events: Events::new(rx),
        task: tokio::spawn(source.run(tx)),
    }
}

/// Applies the usual small cluster: two pods, a namespace, a policy and a node.
fn populate(server: &ApiServer) {
    server.apply(namespace("default"));
    server.apply(pod("default", "a", "web"));
    server.apply(pod("default", "b", "db"));
    server.apply(netpol("default", "deny"));
    server.apply(node("n1"));
}

#[tokio::test]
async fn initial_list_emits_every_object_stripped_then_synced_once() {
    let server = ApiServer::start().await;
    populate(&server);
    let mut run = start(&server, None);
    let events = run
        .events
        .until("Synced", WAIT, |e| *e == SourceEvent::Synced)
        .await;
    let lines = describe_all(&events);
    for wanted in [
        "Applied Namespace default",
        "Applied Pod default/a",
        "Applied Pod default/b",
        "Applied NetworkPolicy default/deny",
        "Applied Node n1",
    ] {
        assert!(
            lines.iter().any(|l| l == wanted),
            "{wanted} missing from {lines:?}"
        );
    }
    assert_eq!(
        lines.len(),
        6,
        "exactly the five objects then Synced: {lines:?}"
    );
    // Converted at the edge: what arrives is the model pod (no metadata, annotations or
    // managedFields to carry), with its labels and status IPs.
    let a = applied_pod(&events, "a").expect("pod a");
    assert_eq!(pod_label(a).as_deref(), Some("web"), "labels are kept");
    assert_eq!(
        a.ips,
        vec!["10.244.1.5".parse::<std::net::IpAddr>().unwrap()].into(),
        "status IPs are kept"
    );

    // Later events flow, and Synced is not sent again.
    server.apply(pod("default", "c", "web"));
    let later = run
        .events
        .until("Applied c", WAIT, |e| is(e, "Applied Pod default/c"))
        .await;
    assert!(
        !later.contains(&SourceEvent::Synced),
        "Synced sent twice: {:?}",
        describe_all(&later)
    );
    run.task.abort();
}

/// Pods of namespace `big` beside the usual small cluster: three list pages of 500.
const BULK_PODS: usize = 1201;

fn populate_bulk(server: &ApiServer) {
    populate(server);
    for i in 0..BULK_PODS {
        server.apply(pod("big", &format!("p{i:04}"), "bulk"));
    }
}

/// How many of `events` applied a pod of namespace `big`.
fn bulk_applied(events: &[SourceEvent]) -> usize {
    describe_all(events)
        .iter()
        .filter(|d| d.starts_with("Applied Pod big/"))
        .count()
}

#[tokio::test]
async fn initial_list_follows_continue_tokens_beyond_one_page() {
    let server = ApiServer::start().await;
    populate_bulk(&server);
    let mut run = start(&server, None);
    let events = run
        .events
        .until("Synced", WAIT, |e| *e == SourceEvent::Synced)
        .await;
    let bulk = bulk_applied(&events);
    assert_eq!(
        bulk, 1201,
        "every pod of every page is applied before Synced"
    );
    let lists = server.requests_for("pods", false);
    assert!(
        lists.len() >= 3,
        "1203 pods at 500 per page need 3 list requests: {lists:?}"
    );
    assert!(
        lists
            .iter()
            .skip(1)
            .all(|r| r.params.contains_key("continue")),
        "pages 2.. send the continue token"
    );
    run.task.abort();
}

#[tokio::test]
async fn the_next_page_is_fetched_while_the_consumer_still_works_through_the_current_one() {
    let server = ApiServer::start().await;
    populate_bulk(&server);
    let mut run = start(&server, None);
    // Nobody reads the events yet: the source blocks once its channel (64) is full, far into the
    // first page of 500; the watcher, polled by a task of its own, asks for the second page anyway.
    server
        .wait_for_requests(
            "the second page of pods before any event is read",
            WAIT,
            |r| {
                r.iter()
                    .filter(|r| {
                        r.resource == "pods" && !r.watch && r.params.contains_key("continue")
                    })
                    .count()
                    >= 1
            },
        )
        .await;
    let events = run
        .events
        .until("Synced", WAIT, |e| *e == SourceEvent::Synced)
        .await;
    assert_eq!(
        bulk_applied(&events),
        1201,
        "every pod of every page, once, before Synced"
    );
    run.task.abort();
}

fn cnp(name: &str, peer: Value) -> Value {
    json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
           "metadata": {"name": name},
           "spec": {"tier": "Admin", "priority": 10, "subject": {"namespaces": {}},
                    "egress": [{"action": "Accept", "to": [peer]}]},
           "status": {"conditions": []}})
}

#[tokio::test]
async fn cluster_network_policies_are_watched_and_a_missing_crd_means_none_not_a_stall() {
    let server = ApiServer::start().await;
    populate(&server);
    server.installed("clusternetworkpolicies", false);
    let mut run = start(&server, None);
    // The CRD is not installed: the source syncs anyway (there can be no such policy).
    run.events
        .until("Synced", WAIT, |e| *e == SourceEvent::Synced)
        .await;
    server.installed("clusternetworkpolicies", true);
    server.apply(cnp("dns", json!({"networks": ["10.96.0.10/32"]})));
    // A domainNames peer is refused by name and field, not silently ignored.
    server.apply(cnp("fqdn", json!({"domainNames": ["example.com"]})));
    let events = run
        .events
        .until_all(
            WAIT_WITH_BACKOFF,
            &[
                "Applied ClusterNetworkPolicy dns",
                "Rejected ClusterNetworkPolicy fqdn",
            ],
        )
        .await;
    let why = events
        .iter()
        .find_map(|e| match e {
            SourceEvent::Rejected { error, .. } => Some(error.to_string()),
            _ => None,
        })
        .expect("a rejection");
    assert!(
        why.contains("spec.egress[0].to[0].domainNames"),
        "names the field: {why}"
    );
    // The CRD is deleted (and with it every ClusterNetworkPolicy): they are deleted here too.
    server.installed("clusternetworkpolicies", false);
    run.events
        .until_all(WAIT_WITH_BACKOFF, &["Deleted ClusterNetworkPolicy dns"])
        .await;
    run.task.abort();
}

#[tokio::test]
async fn synced_waits_until_every_kind_is_listed() {
    let server = ApiServer::start().await;
    populate(&server);
    server.refuse("nodes", true);
    let mut run = start(&server, None);
    let before = run
        .events
        .until_all(
            WAIT,
            &[
                "Applied Namespace default",
                "Applied Pod default/a",
                "Applied NetworkPolicy default/deny",
            ],
        )
        .await;
    server
        .wait_for_requests("a refused node list", WAIT, |rs| {
            rs.iter().any(|r| r.resource == "nodes" && r.status == 503)
        })
        .await;
    let mut before = before;
    before.extend(run.events.ready());
    assert!(
        !before.contains(&SourceEvent::Synced),
        "Synced before nodes were listed: {:?}",
        describe_all(&before)
    );

    server.refuse("nodes", false);
    let after = run
        .events
        .until("Synced", WAIT_WITH_BACKOFF, |e| *e == SourceEvent::Synced)
        .await;
    let lines = describe_all(&after);
    assert!(
        lines.iter().any(|l| l == "Applied Node n1"),
        "node applied before Synced: {lines:?}"
    );
    run.task.abort();
}

#[tokio::test]
async fn watch_added_modified_deleted_become_applied_and_deleted() {
    let server = ApiServer::start().await;
    let mut run = start(&server, None);
    run.events
        .until("Synced on an empty cluster", WAIT, |e| {
            *e == SourceEvent::Synced
        })
        .await;

    server.apply(pod("default", "a", "web"));
    let events = run
        .events
        .until("Applied a", WAIT, |e| is(e, "Applied Pod default/a"))
        .await;
    assert_eq!(
        pod_label(applied_pod(&events, "a").expect("a")).as_deref(),
        Some("web")
    );

    server.apply(pod("default", "a", "api"));
    let events = run
        .events
        .until("Applied a again", WAIT, |e| is(e, "Applied Pod default/a"))
        .await;
    assert_eq!(
        pod_label(applied_pod(&events, "a").expect("a")).as_deref(),
        Some("api"),
        "MODIFIED carries the new labels"
    );

    server.apply(netpol("prod", "allow"));
    server.apply(node("n2"));
    server.apply(namespace("prod"));
    run.events
        .until_all(
            WAIT,
            &[
                "Applied NetworkPolicy prod/allow",
                "Applied Node n2",
                "Applied Namespace prod",
            ],
        )
        .await;

    server.delete("Pod", "default", "a");
    server.delete("NetworkPolicy", "prod", "allow");
    server.delete("Node", "", "n2");
    server.delete("Namespace", "", "prod");
    run.events
        .until_all(
            WAIT,
            &[
                "Deleted Pod default/a",
                "Deleted NetworkPolicy prod/allow",
                "Deleted Node n2",
                "Deleted Namespace prod",
            ],
        )
        .await;
    run.task.abort();
}

/// A kubelet's status heartbeat (new probe times, same labels, IPs and phase) is a MODIFIED event
/// that changes nothing compiled: the source does not send it on, so the engine is not even woken
/// (1,000 a second at 10k pods). A real change right after is sent; a pod deleted and created again
/// identical is sent again.
#[tokio::test]
async fn a_status_heartbeat_that_changes_nothing_compiled_is_not_sent_on() {
    let server = ApiServer::start().await;
    let mut run = start(&server, None);
    run.events
        .until("Synced on an empty cluster", WAIT, |e| {
            *e == SourceEvent::Synced
        })
        .await;
    server.apply(pod("default", "a", "web"));
    run.events
        .until("Applied a", WAIT, |e| is(e, "Applied Pod default/a"))
        .await;
    for second in 1..=3 {
        let mut heartbeat = pod("default", "a", "web");
        heartbeat["status"]["conditions"] = json!([{"type": "Ready", "status": "True",
            "lastProbeTime": format!("2026-12-04T00:00:0{second}Z")}]);
        server.apply(heartbeat);
    }
    server.apply(pod("default", "b", "web"));
    let events = run
        .events
        .until("Applied b", WAIT, |e| is(e, "Applied Pod default/b"))
        .await;
    assert!(
        !describe_all(&events).contains(&"Applied Pod default/a".to_string()),
        "heartbeats of a were sent on: {:?}",
        describe_all(&events)
    );
    server.apply(pod("default", "a", "api"));
    run.events
        .until("a's label change", WAIT, |e| is(e, "Applied Pod default/a"))
        .await;
    server.delete("Pod", "default", "a");
    run.events
        .until("Deleted a", WAIT, |e| is(e, "Deleted Pod default/a"))
        .await;
    server.apply(pod("default", "a", "api"));
    run.events
        .until("a created again, identical", WAIT, |e| {
            is(e, "Applied Pod default/a")
        })
        .await;
    run.task.abort();
}

#[tokio::test]
async fn watch_timeout_resumes_from_last_resource_version_without_relist() {
    let server = ApiServer::start().await;
    populate(&server);
    let mut run = start(&server, Some(1));
    run.events
        .until("Synced", WAIT, |e| *e == SourceEvent::Synced)
        .await;
    let rv_d = server.apply(pod("default", "d", "web"));
    run.events
        .until("Applied d", WAIT, |e| is(e, "Applied Pod default/d"))
        .await;

    // The 1 s watch ends; the watcher must come back with a resourceVersion at or after d's.
    server
        .wait_for_requests("a resumed pod watch", WAIT, |rs| {
            rs.iter().any(|r| {
                r.resource == "pods"
                    && r.watch
                    && r.params
                        .get("resourceVersion")
                        .and_then(|v| v.parse::<u64>().ok())
                        .is_some_and(|v| v >= rv_d)
            })
        })
        .await;
    let watches = server.requests_for("pods", true);
    assert!(
        watches
            .iter()
            .all(|r| r.params.get("timeoutSeconds").map(String::as_str) == Some("1")),
        "{watches:?}"
    );
    assert!(
        watches.iter().all(|r| !r.gone),
        "no watch needed a relist: {watches:?}"
    );

    server.apply(pod("default", "e", "web"));
    let events = run
        .events
        .until("Applied e", WAIT, |e| is(e, "Applied Pod default/e"))
        .await;
    assert!(
        !events.iter().any(|e| is(e, "Applied Pod default/a")),
        "a resumed watch replays nothing old: {:?}",
        describe_all(&events)
    );
    assert_eq!(
        server.requests_for("pods", false).len(),
        1,
        "a watch timeout must not cause a relist"
    );
    run.task.abort();
}

#[tokio::test]
async fn bookmarks_keep_a_quiet_kind_resumable_after_compaction() {
    let server = ApiServer::start().await;
    populate(&server);
    let mut run = start(&server, Some(1));
    run.events
        .until("Synced", WAIT, |e| *e == SourceEvent::Synced)
        .await;

    // Pods churn, nodes stay quiet: only the BOOKMARK at the end of each node watch moves the node
    // watcher's resourceVersion forward.
    server.apply(pod("default", "churn", "v1"));
    let churned = server.apply(pod("default", "churn", "v2"));
    server
        .wait_for_requests("a node watch resumed from a bookmark", WAIT, |rs| {
            rs.iter().any(|r| {
                r.resource == "nodes"
                    && r.watch
                    && r.params
                        .get("resourceVersion")
                        .and_then(|v| v.parse::<u64>().ok())
                        .is_some_and(|v| v >= churned)
            })
        })
        .await;
    server.compact();
    let after_compaction = server.requests().len();
    server
        .wait_for_requests("a node watch after the compaction", WAIT, |rs| {
            rs[after_compaction..]
                .iter()
                .any(|r| r.resource == "nodes" && r.watch)
        })
        .await;
    let node_watches = server.requests_for("nodes", true);
    assert!(
        node_watches.iter().all(|r| !r.gone),
        "the bookmarked node watch resumes after compaction without 410: {node_watches:?}"
    );
    assert_eq!(
        server.requests_for("nodes", false).len(),
        1,
        "no node relist"
    );
    run.events
        .until("Applied churn", WAIT, |e| {
            is(e, "Applied Pod default/churn")
        })
        .await;
    run.task.abort();
}

#[tokio::test]
async fn deletes_missed_while_disconnected_are_replayed_by_resuming_the_watch() {
    let server = ApiServer::start().await;
    populate(&server);
    let mut run = start(&server, None);
    run.events
        .until("Synced", WAIT, |e| *e == SourceEvent::Synced)
        .await;
    let last_rv = server.resource_version();

    server.disconnect();
    server.delete("Pod", "default", "a");
    server
        .wait_for_requests(
            "a pod request refused while down",
            WAIT_WITH_BACKOFF,
            |rs| rs.iter().any(|r| r.resource == "pods" && r.status == 503),
        )
        .await;
    server.reconnect();

    let events = run
        .events
        .until("Deleted a", WAIT_WITH_BACKOFF, |e| {
            is(e, "Deleted Pod default/a")
        })
        .await;
    assert!(
        !events.iter().any(|e| is(e, "Applied Pod default/b")),
        "resume re-emits nothing: {:?}",
        describe_all(&events)
    );
    let resumed = server.requests_for("pods", true);
    assert!(
        resumed
            .iter()
            .skip(1)
            .all(|r| r.params.get("resourceVersion") == Some(&last_rv.to_string())),
        "the watch resumes from the last resourceVersion {last_rv}: {resumed:?}"
    );
    assert_eq!(
        server.requests_for("pods", false).len(),
        1,
        "resuming must not relist"
    );
    run.task.abort();
}

#[tokio::test]
async fn gone_410_forces_a_relist_that_deletes_objects_missing_from_it() {
    let server = ApiServer::start().await;
    populate(&server);
    server.apply(pod("default", "c", "cache"));
    let mut run = start(&server, None);
    run.events
        .until("Synced", WAIT, |e| *e == SourceEvent::Synced)
        .await;

    server.disconnect();
    server.delete("Pod", "default", "a");
    server.apply(pod("default", "b", "db-v2"));
    server.apply(pod("default", "new", "web"));
    server.compact();
    server
        .wait_for_requests(
            "a pod request refused while down",
            WAIT_WITH_BACKOFF,
            |rs| rs.iter().any(|r| r.resource == "pods" && r.status == 503),
        )
        .await;
    server.reconnect();

    let events = run
        .events
        .until("Deleted a", WAIT_WITH_BACKOFF, |e| {
            is(e, "Deleted Pod default/a")
        })
        .await;
    let lines = describe_all(&events);
    assert!(
        server.requests_for("pods", true).iter().any(|r| r.gone),
        "the resume was answered 410"
    );
    assert_eq!(
        server.requests_for("pods", false).len(),
        2,
        "410 causes exactly one relist"
    );
    assert_eq!(
        pod_label(applied_pod(&events, "b").expect("b changed while down is applied")).as_deref(),
        Some("db-v2")
    );
    assert!(
        lines.iter().any(|l| l == "Applied Pod default/new"),
        "{lines:?}"
    );
    assert!(
        !lines.iter().any(|l| l == "Applied Pod default/c"),
        "unchanged c is not re-emitted: {lines:?}"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.starts_with("Deleted") && l != "Deleted Pod default/a"),
        "{lines:?}"
    );

    // The source keeps watching after the relist.
    server.delete("Pod", "default", "c");
    run.events
        .until("Deleted c", WAIT, |e| is(e, "Deleted Pod default/c"))
        .await;
    run.task.abort();
}

#[tokio::test]
async fn run_returns_ok_when_the_receiver_is_dropped() {
    let server = ApiServer::start().await;
    populate(&server);
    let mut run = start(&server, None);
    run.events
        .until("Synced", WAIT, |e| *e == SourceEvent::Synced)
        .await;
    run.events.close();
    let result = tokio::time::timeout(WAIT, run.task)
        .await
        .expect("run ends once the receiver is gone");
    assert!(matches!(result, Ok(Ok(()))), "{result:?}");
}
