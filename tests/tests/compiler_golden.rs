//! Every representative scenario's ruleset (the golden files' source) is accepted by the real
//! `nft -j -f` in a throwaway namespace, twice (a full replace over an existing table), and lists
//! back with our comments verbatim and no other table: no user string became nft syntax.

use palisade_policy::compile;
use palisade_policy::scenarios::{scenarios, NODE};
use palisade_tests::{Netns, NftNs};

fn rendered() -> Vec<(&'static str, String)> {
    scenarios()
        .into_iter()
        .map(|(name, st)| {
            let rs = compile(&st, NODE).ruleset;
            (
                name,
                serde_json::to_string_pretty(&rs.full_replace().json).unwrap() + "\n",
            )
        })
        .collect()
}

fn scenario(name: &str) -> palisade_policy::model::ClusterState {
    scenarios()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, st)| st)
        .unwrap()
}

#[test]
fn golden_rulesets_load_into_real_nft_root() {
    for (name, text) in rendered() {
        let ns = Netns::new("pal-cmp-");
        ns.nft_load(&text)
            .unwrap_or_else(|e| panic!("{name}: nft rejected the ruleset: {e}"));
        // Load twice: a full replace must also work over an existing table.
        ns.nft_load(&text)
            .unwrap_or_else(|e| panic!("{name}: second full replace failed: {e}"));
        let listed = ns.list_table();
        let rules: Vec<&serde_json::Value> = listed["rules"]
            .as_object()
            .unwrap()
            .values()
            .flat_map(|r| r.as_array().unwrap())
            .collect();
        assert!(
            listed["objects"].as_array().unwrap().len() + rules.len() > 10,
            "{name}: table looks empty"
        );
        // Nothing but our table exists: no user string turned into extra nft syntax.
        assert_eq!(ns.list_tables().trim(), "table inet palisade", "{name}");
        // Every rule comment in the kernel is one of ours, verbatim.
        let ours: Vec<String> = compile(&scenario(name), NODE)
            .ruleset
            .chains
            .values()
            .flat_map(|c| c.rules.iter().filter_map(|r| r.comment.clone()))
            .collect();
        let mut seen = 0;
        for item in rules {
            if let Some(c) = item
                .get("rule")
                .and_then(|r| r.get("comment"))
                .and_then(|c| c.as_str())
            {
                assert!(
                    ours.iter().any(|o| o == c),
                    "{name}: unexpected comment {c:?}"
                );
                seen += 1;
            }
        }
        assert!(seen > 0, "{name}: no rule comments listed");
    }
}
