//! The overlay in the flat lab: every node on one subnet, so with the default
//! `--encapsulation cross-subnet` cross-node pod traffic is routed directly, never encapsulated.

use palisade_netns_tests::cases;
use palisade_netns_tests::lab::{Family, Lab};

/// Cross-node probes in both families (the baseline matrix spans both nodes), then the underlay's
/// counter of UDP to the overlay port must still be 0 (it counts bridged and routed packets).
pub fn same_subnet_pod_traffic_is_not_encapsulated(lab: &mut Lab) -> Result<(), String> {
    for family in [Family::V4, Family::V6] {
        cases::check_baseline(lab, family, "baseline across nodes on one subnet")?;
    }
    let n = lab.encapsulated_packets().map_err(|e| e.to_string())?;
    if n != 0 {
        return Err(format!(
            "the underlay carried {n} packets to the overlay port: nodes on one subnet must route pod traffic directly (cross-subnet)"
        ));
    }
    Ok(())
}
