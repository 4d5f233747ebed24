//! Golden nft JSON for representative policies (regenerate with `UPDATE_GOLDEN=1`). That the kernel
//! accepts each of them is palisade-tests' `compiler_golden` (root).

// The compiler's clippy.toml forbids I/O in the crate; this file is not the compiler: golden files are read and (with UPDATE_GOLDEN) written here, not by the compiler.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]
use palisade_policy::compile;
use palisade_policy::scenarios as common;
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
                serde_json::to_string_pretty(&rs.full_replace().json()).unwrap() + "\n",
            )
        })
        .collect()
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
