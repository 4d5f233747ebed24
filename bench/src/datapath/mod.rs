//! The datapath benchmark: lab topology, synthetic workload, rulesets of every compared system,
//! traffic generators and the report.

pub mod cmd;
pub mod k8s;
pub mod quiet;
pub mod report;
pub mod rulesets;
pub mod run;
pub mod stats;
pub mod topo;
pub mod traffic;
pub mod workload;

/// FNV-1a 64 of `key`: stable short names and orders derived from keys, the compiler's own
/// [`stable_hash`](palisade_policy::ruleset::names::stable_hash) of one part.
pub fn fnv1a(key: &str) -> u64 {
    palisade_policy::ruleset::names::stable_hash(&[key])
}

#[cfg(test)]
mod tests {
    #[test]
    fn fnv1a_is_the_standard_fnv1a_64_so_derived_names_stay_stable() {
        assert_eq!(super::fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(super::fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
