//! The manifest-directory source on a real directory with inotify. The rescan interval is set to an hour
//! so every change below must arrive through inotify (a broken watch fails the tests instead of being
//! papered over by the periodic rescan).

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use palisade_agent::source::{ManifestSource, SourceError, SourceEvent};
use palisade_testkit::temp::{temp_dir, TempDir};
use support::{applied_pod, describe_all, is, pod_label, Events, WAIT};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

fn pod(name: &str, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{app: {app}}}\nspec:\n  containers: [{{name: c, image: busybox}}]\n"
    )
}

fn docs(documents: &[String]) -> String {
    documents.join("---\n")
}

/// Writes a temp dotfile and renames it over `name`, as the lab and `kubectl`-like tools do.
fn write_atomic(dir: &Path, name: &str, content: &str) {
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, content).expect("write temp file");
    std::fs::rename(&tmp, dir.join(name)).expect("rename into place");
}

/// Truncates and rewrites `name` in place.
fn write_in_place(dir: &Path, name: &str, content: &str) {
    std::fs::write(dir.join(name), content).expect("write in place");
}

struct Running {
    dir: TempDir,
    events: Events,
    task: JoinHandle<Result<(), SourceError>>,
    markers: usize,
}

impl Running {
    async fn start(dir: TempDir) -> Self {
        support::init_logging();
        let source =
            ManifestSource::new(dir.path()).with_rescan_interval(Duration::from_secs(3600));
        let (tx, rx) = mpsc::channel(64);
        let task = tokio::spawn(source.run(tx));
        let mut running = Running {
            dir,
            events: Events::new(rx),
            task,
            markers: 0,
        };
        running
            .events
            .until("Synced", WAIT, |e| *e == SourceEvent::Synced)
            .await;
        running
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a new marker file and returns every event up to its `Applied`: since the source handles
    /// changes in order, that is everything the earlier writes caused. The marker is a Node named
    /// `zzzz-...`, the last key in the source's order, so it also comes last when inotify delivers it in
    /// one batch with earlier writes.
    async fn settle(&mut self) -> Vec<SourceEvent> {
        self.markers += 1;
        let name = format!("zzzz-marker{:04}", self.markers);
        let node = format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {name}}}\n");
        write_atomic(self.dir.path(), &format!("{name}.yaml"), &node);
        let wanted = format!("Applied Node {name}");
        let mut events = self.events.until(&wanted, WAIT, |e| is(e, &wanted)).await;
        events.pop();
        events
    }
}

fn label_of(events: &[SourceEvent], name: &str) -> Option<String> {
    applied_pod(events, name).and_then(pod_label)
}

#[tokio::test]
async fn initial_scan_applies_every_manifest_then_synced_ignoring_dotfiles_and_temp_files() {
    let dir = temp_dir("palisade-manifests-initial-");
    std::fs::write(
        dir.path().join("a.yaml"),
        docs(&[
            pod("a", "web"),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: prod}\n".into(),
        ]),
    )
    .expect("write");
    std::fs::write(
        dir.path().join("b.json"),
        r#"{"apiVersion":"networking.k8s.io/v1","kind":"NetworkPolicy","metadata":{"name":"deny","namespace":"prod"},"spec":{"podSelector":{}}}"#,
    )
    .expect("write");
    std::fs::write(dir.path().join("c.yml"), "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Node, metadata: {name: n1}}\n")
        .expect("write");
    std::fs::write(dir.path().join(".hidden.yaml"), pod("hidden", "x")).expect("write");
    std::fs::write(dir.path().join("d.yaml.tmp"), pod("tmp", "x")).expect("write");
    std::fs::write(dir.path().join("d.yaml~"), pod("backup", "x")).expect("write");
    std::fs::write(dir.path().join("notes.txt"), pod("notes", "x")).expect("write");

    support::init_logging();
    let source = ManifestSource::new(dir.path()).with_rescan_interval(Duration::from_secs(3600));
    let (tx, rx) = mpsc::channel(64);
    let task = tokio::spawn(source.run(tx));
    let mut events = Events::new(rx);
    let got = events
        .until("Synced", WAIT, |e| *e == SourceEvent::Synced)
        .await;
    let mut lines = describe_all(&got);
    assert_eq!(lines.pop().as_deref(), Some("Synced"));
    lines.sort();
    assert_eq!(
        lines,
        [
            "Applied Namespace prod",
            "Applied NetworkPolicy prod/deny",
            "Applied Node n1",
            "Applied Pod default/a"
        ]
    );
    task.abort();
}

#[tokio::test]
async fn atomic_rename_of_a_new_file_is_applied_within_milliseconds() {
    let mut run = Running::start(temp_dir("palisade-manifests-rename-")).await;
    let started = Instant::now();
    write_atomic(run.path(), "new.yaml", &pod("fresh", "web"));
    run.events
        .until("Applied fresh", WAIT, |e| {
            is(e, "Applied Pod default/fresh")
        })
        .await;
    let latency = started.elapsed();
    eprintln!("file rename -> SourceEvent: {latency:?}");
    assert!(
        latency < Duration::from_millis(500),
        "inotify path too slow: {latency:?}"
    );
    run.task.abort();
}

#[tokio::test]
async fn editing_a_file_applies_changed_and_new_objects_and_deletes_removed_ones() {
    let dir = temp_dir("palisade-manifests-edit-");
    std::fs::write(
        dir.path().join("app.yaml"),
        docs(&[pod("keep", "same"), pod("change", "v1"), pod("drop", "x")]),
    )
    .expect("write");
    let mut run = Running::start(dir).await;

    // In-place write (truncate + write + close).
    write_in_place(
        run.path(),
        "app.yaml",
        &docs(&[pod("keep", "same"), pod("change", "v2"), pod("added", "y")]),
    );
    let events = run.settle().await;
    let mut lines = describe_all(&events);
    lines.sort();
    assert_eq!(
        lines,
        [
            "Applied Pod default/added",
            "Applied Pod default/change",
            "Deleted Pod default/drop"
        ]
    );
    assert_eq!(label_of(&events, "change").as_deref(), Some("v2"));

    // Atomic rename over the file.
    write_atomic(
        run.path(),
        "app.yaml",
        &docs(&[pod("keep", "same"), pod("change", "v3")]),
    );
    let events = run.settle().await;
    let mut lines = describe_all(&events);
    lines.sort();
    assert_eq!(
        lines,
        ["Applied Pod default/change", "Deleted Pod default/added"]
    );
    assert_eq!(label_of(&events, "change").as_deref(), Some("v3"));
    run.task.abort();
}

#[tokio::test]
async fn deleting_a_file_deletes_all_its_objects() {
    let dir = temp_dir("palisade-manifests-delete-");
    std::fs::write(
        dir.path().join("a.yaml"),
        docs(&[pod("x", "web"), pod("y", "web")]),
    )
    .expect("write");
    std::fs::write(dir.path().join("b.yaml"), pod("z", "web")).expect("write");
    let mut run = Running::start(dir).await;
    std::fs::remove_file(run.path().join("a.yaml")).expect("remove");
    let events = run.settle().await;
    let mut lines = describe_all(&events);
    lines.sort();
    assert_eq!(lines, ["Deleted Pod default/x", "Deleted Pod default/y"]);

    // Renaming a manifest to a temp name takes it out as well.
    std::fs::rename(
        run.path().join("b.yaml"),
        run.path().join("b.yaml.disabled"),
    )
    .expect("rename");
    let events = run.settle().await;
    assert_eq!(describe_all(&events), ["Deleted Pod default/z"]);
    run.task.abort();
}

#[tokio::test]
async fn broken_or_half_written_files_keep_their_last_good_objects() {
    let dir = temp_dir("palisade-manifests-broken-");
    std::fs::write(
        dir.path().join("a.yaml"),
        docs(&[pod("x", "web"), pod("y", "web")]),
    )
    .expect("write");
    let json_pod =
        r#"{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "j", "namespace": "default"}}"#;
    std::fs::write(dir.path().join("j.json"), json_pod).expect("write");
    let mut run = Running::start(dir).await;

    let broken = [
        (
            "invalid YAML",
            format!(
                "{}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: [\n",
                pod("x", "web")
            ),
        ),
        (
            "a document cut before its kind",
            format!("{}---\napiVersion: v1\n", pod("x", "web")),
        ),
        (
            "a pod without a name",
            format!(
                "{}---\napiVersion: v1\nkind: Pod\nmetadata: {{namespace: default}}\n",
                pod("x", "web")
            ),
        ),
        (
            "a field of the wrong type",
            format!(
                "{}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: y, labels: [1]}}\n",
                pod("x", "web")
            ),
        ),
        ("truncated JSON", json_pod[..json_pod.len() - 5].to_owned()),
    ];
    for (what, content) in broken {
        let name = if content.starts_with('{') {
            "j.json"
        } else {
            "a.yaml"
        };
        // Both ways of writing must be seen (an in-place write of a changed label proves it), and
        // neither may let the bad content through.
        write_in_place(run.path(), "probe.yaml", &pod("probe", what));
        write_in_place(run.path(), name, &content);
        let events = run.settle().await;
        assert_eq!(
            describe_all(&events),
            ["Applied Pod default/probe"],
            "{what}: a bad file written in place must change nothing"
        );
        write_atomic(run.path(), name, &content);
        let events = run.settle().await;
        assert!(
            events.is_empty(),
            "{what}: a bad file must change nothing, got {:?}",
            describe_all(&events)
        );
    }

    // Fixing the file applies it.
    write_atomic(run.path(), "a.yaml", &pod("x", "fixed"));
    let events = run.settle().await;
    let mut lines = describe_all(&events);
    lines.sort();
    assert_eq!(lines, ["Applied Pod default/x", "Deleted Pod default/y"]);
    assert_eq!(label_of(&events, "x").as_deref(), Some("fixed"));
    run.task.abort();
}

#[tokio::test]
async fn multi_document_files_with_lists_skip_only_unknown_kinds() {
    let mut run = Running::start(temp_dir("palisade-manifests-multidoc-")).await;
    let content = format!(
        "---\n{}---\n# just a comment\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\n---\n\
         apiVersion: v1\nkind: List\nitems:\n- {{apiVersion: v1, kind: Namespace, metadata: {{name: prod}}}}\n\
         - {{apiVersion: networking.k8s.io/v1, kind: NetworkPolicy, metadata: {{name: np}}, spec: {{podSelector: {{}}}}}}\n---\n{}",
        pod("p1", "web"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p2}\n",
    );
    write_atomic(run.path(), "all.yaml", &content);
    let events = run.settle().await;
    let mut lines = describe_all(&events);
    lines.sort();
    assert_eq!(
        lines,
        [
            "Applied Namespace prod",
            "Applied NetworkPolicy default/np",
            "Applied Pod default/p1",
            "Applied Pod default/p2"
        ],
        "namespaced objects without a namespace land in default; the Deployment is skipped"
    );
    run.task.abort();
}

#[tokio::test]
async fn objects_moving_between_files_are_never_deleted() {
    let dir = temp_dir("palisade-manifests-move-");
    std::fs::write(
        dir.path().join("a.yaml"),
        docs(&[pod("x", "web"), pod("y", "db"), pod("stay", "s")]),
    )
    .expect("write");
    let mut run = Running::start(dir).await;

    // Move x and y to b.yaml: the new file first, then the old one without them.
    write_atomic(
        run.path(),
        "b.yaml",
        &docs(&[pod("x", "web"), pod("y", "db")]),
    );
    write_in_place(run.path(), "a.yaml", &pod("stay", "s"));
    let events = run.settle().await;
    assert!(
        events.is_empty(),
        "identical objects moved between files cause no event: {:?}",
        describe_all(&events)
    );

    // Renaming the file to another manifest name is no change either.
    std::fs::rename(run.path().join("b.yaml"), run.path().join("b2.yaml")).expect("rename");
    std::fs::rename(run.path().join("b2.yaml"), run.path().join("b.yaml")).expect("rename back");
    let events = run.settle().await;
    assert!(
        events.is_empty(),
        "renaming a manifest causes no event: {:?}",
        describe_all(&events)
    );

    // The objects now belong to b.yaml: removing it deletes them, a.yaml's object stays.
    std::fs::remove_file(run.path().join("b.yaml")).expect("remove");
    let events = run.settle().await;
    let mut lines = describe_all(&events);
    lines.sort();
    assert_eq!(lines, ["Deleted Pod default/x", "Deleted Pod default/y"]);

    // An object defined by two files takes the definition of the file sorting last; when that file
    // drops it, the other definition applies again.
    write_atomic(run.path(), "c.yaml", &pod("stay", "override"));
    let events = run.settle().await;
    assert_eq!(label_of(&events, "stay").as_deref(), Some("override"));
    std::fs::remove_file(run.path().join("c.yaml")).expect("remove");
    let events = run.settle().await;
    assert_eq!(describe_all(&events), ["Applied Pod default/stay"]);
    assert_eq!(label_of(&events, "stay").as_deref(), Some("s"));
    run.task.abort();
}

#[tokio::test]
async fn a_missing_directory_is_an_error_naming_it() {
    let dir = temp_dir("palisade-manifests-missing-");
    let missing = dir.path().join("nope");
    let (tx, _rx) = mpsc::channel::<SourceEvent>(8);
    let result = tokio::time::timeout(WAIT, ManifestSource::new(&missing).run(tx))
        .await
        .expect("returns at once");
    let err = result.expect_err("a missing directory cannot be watched");
    assert!(err.to_string().contains("nope"), "{err}");
}

#[tokio::test]
async fn run_returns_ok_when_the_receiver_is_dropped() {
    let run = Running::start(temp_dir("palisade-manifests-drop-")).await;
    run.events.close();
    let result = tokio::time::timeout(WAIT, run.task)
        .await
        .expect("run ends once the receiver is gone");
    assert!(matches!(result, Ok(Ok(()))), "{result:?}");
}

#[tokio::test]
async fn status_heartbeats_and_node_heartbeats_are_not_emitted_but_an_ip_change_is() {
    let dir = temp_dir("palisade-manifests-heartbeat-");
    let pod = |rv: u32, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: beat, namespace: default, resourceVersion: '{rv}', labels: {{app: a}}}}\nspec: {{nodeName: n1, containers: [{{name: c, image: x}}]}}\nstatus: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}], conditions: [{{type: Ready, status: 'True', lastProbeTime: '2026-01-01T00:00:{:02}Z'}}], containerStatuses: [{{name: c, image: x, imageID: x, ready: true, restartCount: {rv}}}]}}\n",
            rv % 60
        )
    };
    let node = |rv: u32| {
        format!(
            "apiVersion: v1\nkind: Node\nmetadata: {{name: n1, resourceVersion: '{rv}'}}\nspec: {{podCIDRs: [10.244.1.0/24]}}\nstatus: {{addresses: [{{type: InternalIP, address: 172.31.0.1}}], conditions: [{{type: Ready, status: 'True', lastHeartbeatTime: '2026-01-01T00:00:{:02}Z'}}]}}\n",
            rv % 60
        )
    };
    write_atomic(dir.path(), "beat.yaml", &pod(1, "10.244.1.5"));
    write_atomic(dir.path(), "n1.yaml", &node(1));
    let mut run = Running::start(dir).await;
    for rv in 2..5 {
        write_atomic(run.path(), "beat.yaml", &pod(rv, "10.244.1.5"));
        write_atomic(run.path(), "n1.yaml", &node(rv));
    }
    let events = run.settle().await;
    assert_eq!(
        describe_all(&events),
        Vec::<String>::new(),
        "heartbeats changed only what nothing reads"
    );
    write_atomic(run.path(), "beat.yaml", &pod(5, "10.244.1.6"));
    let events = run.settle().await;
    assert_eq!(describe_all(&events), ["Applied Pod default/beat"]);
    run.task.abort();
}

/// Reading and parsing files happens off the runtime's threads: the agent's HTTP endpoint shares
/// them, and a thread held for as long as a large manifest takes to parse (20k pods: ~5 s in a
/// debug build) left its probes and scrapes unanswered all that time. On this test's one-thread
/// runtime, a task ticking every millisecond must keep ticking while 10,000 pods are parsed.
#[tokio::test]
async fn a_large_manifest_is_parsed_without_holding_the_runtime() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let dir = temp_dir("palisade-manifests-large-");
    let pods: Vec<String> = (0..10_000).map(|i| pod(&format!("p{i}"), "a")).collect();
    std::fs::write(dir.path().join("pods.yaml"), docs(&pods)).expect("write");
    let ticks = Arc::new(AtomicUsize::new(0));
    let ticker = {
        let ticks = ticks.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(1));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                ticks.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let (tx, mut rx) = mpsc::channel::<SourceEvent>(64);
    let started = Instant::now();
    let before = ticks.load(Ordering::Relaxed);
    let task = tokio::spawn(
        ManifestSource::new(dir.path())
            .with_rescan_interval(Duration::from_secs(3600))
            .run(tx),
    );
    // The first event comes once the whole directory is read and parsed: in a debug build, beside
    // the other tests on two cores, that took over 5 s (`WAIT`) once; what this test holds is
    // that the runtime ticks meanwhile, not how long the parse takes.
    let first = tokio::time::timeout(Duration::from_secs(60), rx.recv()).await;
    let (scan, during) = (started.elapsed(), ticks.load(Ordering::Relaxed) - before);
    assert!(matches!(first, Ok(Some(_))), "no event from the scan");
    eprintln!("initial scan of 10,000 pods: {scan:?}, {during} ticks meanwhile");
    assert!(
        during >= 10,
        "the runtime was held while the manifest was parsed ({scan:?}): {during} ticks"
    );
    task.abort();
    ticker.abort();
}
