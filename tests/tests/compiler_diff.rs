//! Root test: a sequence of diffs applied to the real kernel leaves exactly the table a full
//! replace produces (compared via `nft -j list table`), in throwaway netns.

use palisade_policy::synth::{self, Rng, SynthConfig};
use palisade_policy::{compile, diff};
use palisade_tests::{Netns, NftNs};
use serde_json::Value;

#[test]
fn incremental_diffs_equal_full_replace_in_the_kernel_root() {
    let incremental = Netns::new("pal-cmp-");
    let mut changed_steps = 0;
    for seed in [3u64, 11] {
        let cfg = SynthConfig::small(seed);
        let mut st = synth::cluster(&cfg);
        let mut rng = Rng::new(seed);
        let mut last = compile(&st, "n0").ruleset;
        incremental
            .nft_load(&last.full_replace().to_json_string())
            .unwrap();
        for step in 0..25 {
            for j in 0..=rng.below(2) {
                let ch = synth::random_change(&cfg, &st, &mut rng, step * 4 + j);
                st.apply(ch);
            }
            let next = compile(&st, "n0").ruleset;
            let b = diff(&last, &next);
            if !b.is_empty() {
                changed_steps += 1;
                incremental
                    .nft_load(&b.to_json_string())
                    .unwrap_or_else(|e| {
                        panic!(
                            "seed {seed} step {step}: kernel rejected the diff: {e}\n{}",
                            b.to_json_string()
                        )
                    });
            }
            let fresh = Netns::new("pal-cmp-");
            fresh
                .nft_load(&next.full_replace().to_json_string())
                .unwrap();
            let (got, want) = (incremental.list_table(), fresh.list_table());
            if got != want {
                let g: Vec<String> = got
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(Value::to_string)
                    .collect();
                let w: Vec<String> = want
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(Value::to_string)
                    .collect();
                let extra: Vec<&String> = g.iter().filter(|x| !w.contains(x)).collect();
                let missing: Vec<&String> = w.iter().filter(|x| !g.contains(x)).collect();
                panic!("seed {seed} step {step}: kernel differs\nonly incremental: {extra:#?}\nonly full: {missing:#?}");
            }
            last = next;
        }
    }
    assert!(
        changed_steps > 10,
        "only {changed_steps} steps changed anything"
    );
}
