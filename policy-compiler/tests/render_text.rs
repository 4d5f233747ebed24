//! `Ruleset::full_replace_text` (streamed, for memory) is byte for byte the rendered full replace.

use palisade_policy::compile;
use palisade_policy::scenarios as common;

#[test]
fn full_replace_text_is_byte_identical_to_the_rendered_batch_for_every_golden_scenario() {
    let scenarios = common::scenarios();
    assert!(!scenarios.is_empty(), "no scenarios to compare");
    for (name, st) in scenarios {
        let rs = compile(&st, common::NODE).ruleset;
        let batch = rs.full_replace();
        let text = rs.full_replace_text();
        assert_eq!(text, batch.to_json_string(), "scenario {name}");
        assert_eq!(text.len(), batch.bytes(), "scenario {name}: byte count");
    }
}
