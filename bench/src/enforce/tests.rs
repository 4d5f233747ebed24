use super::irrelevant::{heartbeat_pod, heartbeat_targets};
use super::*;

#[test]
fn a_heartbeat_changes_nothing_the_compiler_sees() {
    let cluster = Cluster::generate_shape(Shape::for_pods(100, 10), 7).unwrap();
    let targets = heartbeat_targets(&cluster, 30);
    assert_eq!(targets.len(), 30);
    for pod in &targets {
        let beat = heartbeat_pod(pod, 12);
        assert_eq!(beat["metadata"]["resourceVersion"], "12");
        assert_ne!(beat, k8s::pod(pod));
        assert_eq!(
            k8s::change(&beat).unwrap(),
            k8s::change(&k8s::pod(pod)).unwrap()
        );
    }
}

#[test]
fn metric_sum_adds_every_labelled_sample_and_absent_is_none() {
    let text = "# TYPE palisade_transactions_total counter\n\
palisade_transactions_total{kind=\"full\"} 2\n\
palisade_transactions_total{kind=\"incremental\"} 40\n\
palisade_transactions_totally 9\n\
palisade_source_changes_total{result=\"unchanged\"} 7\n";
    assert_eq!(metric_sum(text, "palisade_transactions_total"), Some(42.0));
    assert_eq!(
        metric_value(text, "palisade_source_changes_total{result=\"unchanged\"}"),
        Some(7.0)
    );
    assert_eq!(metric_sum(text, "palisade_reconciles_total"), None);
}

#[test]
fn unique_pod_labels_give_every_background_pod_its_own_set_and_select_the_same_pods() {
    let plain = Cluster::generate_shape(Shape::for_pods(1000, 100), 7).unwrap();
    let unique = Cluster::generate_shape(
        Shape {
            unique_labels: true,
            ..Shape::for_pods(1000, 100)
        },
        7,
    )
    .unwrap();
    let background = |c: &Cluster| {
        c.pods
            .iter()
            .filter(|p| p.namespace.starts_with("ns-"))
            .map(|p| p.labels.clone())
            .collect::<Vec<_>>()
    };
    let distinct = |sets: Vec<std::collections::BTreeMap<String, String>>| {
        sets.into_iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
    };
    let n = background(&unique).len();
    assert_eq!(
        distinct(background(&unique)),
        n,
        "no two background pods share labels"
    );
    assert!(
        distinct(background(&plain)) < n / 2,
        "the plain shape repeats label sets"
    );
    for node in ["node-1", "node-2", "node-7"] {
        assert_eq!(
            format!("{:?}", plain.node_view(node)),
            format!("{:?}", unique.node_view(node)),
            "the extra label selects nothing: the same policies, pods and peers on {node}"
        );
    }
}
