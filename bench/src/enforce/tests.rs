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
