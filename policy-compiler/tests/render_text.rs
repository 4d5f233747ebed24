//! `Ruleset::full_replace_text` (streamed, for memory) is byte for byte the rendered full replace.

// The compiler's clippy.toml forbids I/O in the crate; this file is not the compiler: it includes
// tests/common, whose namespace helpers run processes (to move out of the pure crate: issue 14).
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]
mod common;

use palisade_policy::compile;

#[test]
fn full_replace_text_is_byte_identical_to_the_rendered_batch_for_every_golden_scenario() {
    let scenarios = common::scenarios();
    assert!(!scenarios.is_empty(), "no scenarios to compare");
    for (name, st) in scenarios {
        let rs = compile(&st, common::NODE).ruleset;
        let batch = rs.full_replace();
        let text = rs.full_replace_text();
        assert_eq!(text, batch.to_json_string(), "scenario {name}");
        assert_eq!(text.len(), batch.bytes, "scenario {name}: byte count");
    }
}
