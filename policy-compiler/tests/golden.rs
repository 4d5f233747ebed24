//! Golden nft JSON for representative policies (regenerate with `UPDATE_GOLDEN=1`), and proof
//! that every golden ruleset is accepted by the real `nft -j -f` in a throwaway netns (root).

// The compiler's clippy.toml forbids I/O in the crate; this file is not the compiler: golden files are read and (with UPDATE_GOLDEN) written here, not by the compiler.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]
mod common;

use palisade_policy::compile;
use std::path::PathBuf;

fn golden_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("golden")
}

fn rendered() -> Vec<(&'static str, String)> {
    common::scenarios()
        .into_iter()
        .map(|(name, st)| {
            let rs = compile(&st, common::NODE).ruleset;
            (
                name,
                serde_json::to_string_pretty(&rs.full_replace().json).unwrap() + "\n",
            )
        })
        .collect()
}

fn scenario(name: &str) -> palisade_policy::model::ClusterState {
    common::scenarios()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, st)| st)
        .unwrap()
}

#[test]
fn golden_rulesets_are_unchanged() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for (name, text) in rendered() {
        let path = golden_dir().join(format!("{name}.json"));
        if update {
            std::fs::write(&path, &text).unwrap();
            continue;
        }
        let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run with UPDATE_GOLDEN=1 to create it)",
                path.display()
            )
        });
        assert!(
            want == text,
            "{name}: rendering changed; review and rerun with UPDATE_GOLDEN=1\n{text}"
        );
    }
}

#[test]
fn golden_rulesets_load_into_real_nft_root() {
    for (name, text) in rendered() {
        let ns = common::Netns::new();
        ns.nft_load(&text)
            .unwrap_or_else(|e| panic!("{name}: nft rejected the ruleset: {e}"));
        // Load twice: a full replace must also work over an existing table.
        ns.nft_load(&text)
            .unwrap_or_else(|e| panic!("{name}: second full replace failed: {e}"));
        let listed = ns.list_table();
        assert!(
            listed.as_array().unwrap().len() > 10,
            "{name}: table looks empty"
        );
        // Nothing but our table exists: no user string turned into extra nft syntax.
        assert_eq!(ns.list_tables().trim(), "table inet palisade", "{name}");
        // Every rule comment in the kernel is one of ours, verbatim.
        let ours: Vec<String> = compile(&scenario(name), common::NODE)
            .ruleset
            .chains
            .values()
            .flat_map(|c| c.rules.iter().filter_map(|r| r.comment.clone()))
            .collect();
        let mut seen = 0;
        for item in listed.as_array().unwrap() {
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
