//! What this node dropped before any policy because its sender lied, in `/metrics`:
//! `palisade_forged_packets_total{kind}`, read from the named counters of our table
//! (`palisade_policy::ruleset::names::FORGED_KINDS`) in the same read as the per-policy counters.
//! A sustained rise means a pod (or a host) is trying: the source guard's `source`, the overlay
//! port's `overlay`, the related chain's `related`.

use palisade_policy::ruleset::names::FORGED_KINDS;
use std::collections::HashMap;

const NAME: &str = "palisade_forged_packets_total";
const HELP: &str = "Packets this node dropped before any policy because their sender lied: source = a packet from a pod's veth not carrying one of that pod's addresses (source guard), overlay = a datagram to the overlay's UDP port from a host that is not a node (it would have been decapsulated under any pod's address), related = an ICMP error (or other related packet) from a pod about a connection it is not part of. The agent's own full replaces keep the counts.";

/// The family in the Prometheus text format: a series for each of those counters our table holds
/// (`overlay` only while the overlay is in use); nothing when it holds none.
pub fn render(values: &HashMap<String, u64>) -> String {
    let series: Vec<String> = FORGED_KINDS
        .iter()
        .filter_map(|(counter, kind)| {
            values
                .get(*counter)
                .map(|n| format!("{NAME}{{kind=\"{kind}\"}} {n}\n"))
        })
        .collect();
    if series.is_empty() {
        return String::new();
    }
    format!(
        "# HELP {NAME} {HELP}\n# TYPE {NAME} counter\n{}",
        series.concat()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_policy::ruleset::names::{CNT_FORGED_RELATED, CNT_FORGED_SOURCE};

    #[test]
    fn each_forged_counter_of_the_table_is_one_series_by_kind() {
        let values: HashMap<String, u64> = [
            (CNT_FORGED_SOURCE.to_string(), 40),
            (CNT_FORGED_RELATED.to_string(), 3),
            ("cnt_0123_in".to_string(), 9),
        ]
        .into();
        let text = render(&values);
        assert!(text.contains("# TYPE palisade_forged_packets_total counter\n"));
        let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                r#"palisade_forged_packets_total{kind="source"} 40"#,
                r#"palisade_forged_packets_total{kind="related"} 3"#,
            ],
            "no overlay series without its counter; policy counters are not this family's"
        );
        assert_eq!(render(&HashMap::new()), "");
    }
}
