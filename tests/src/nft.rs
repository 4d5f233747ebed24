//! Our nft table in a test namespace: load a document, list the table in a form two tables can be
//! compared in (no handles, sorted), list the namespace's tables.

use crate::Netns;
use serde_json::Value;

/// What the kernel tests of the compiler ask of a namespace's nftables.
pub trait NftNs {
    /// Runs `nft -j -f -` with the document on stdin inside the namespace; nft's stderr on failure.
    fn nft_load(&self, doc: &str) -> Result<(), String>;
    /// `nft -j list table inet palisade`, normalised: no handles, no metainfo, set elements sorted.
    fn list_table(&self) -> Value;
    /// `nft list tables` inside the namespace.
    fn list_tables(&self) -> String;
}

impl NftNs for Netns {
    fn nft_load(&self, doc: &str) -> Result<(), String> {
        let out = self.exec_with_stdin(&["nft", "-j", "-f", "-"], doc.as_bytes());
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn list_table(&self) -> Value {
        let out = self.try_exec(&["nft", "-j", "list", "table", "inet", "palisade"]);
        assert!(
            out.status.success(),
            "nft list: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut v: Value = serde_json::from_slice(&out.stdout).expect("nft -j prints JSON");
        normalise(&mut v);
        let mut items: Vec<Value> = v["nftables"]
            .as_array()
            .expect("nft -j prints an nftables array")
            .iter()
            .filter(|x| x.get("metainfo").is_none())
            .cloned()
            .collect();
        // The kernel lists objects in creation order; compare by kind and name instead. The sort is
        // stable, so the rules of one chain keep their order.
        items.sort_by_key(|x| {
            let (kind, body) = x
                .as_object()
                .and_then(|o| o.iter().next())
                .expect("an nftables item is an object of one key");
            let name = body
                .get("chain")
                .or_else(|| body.get("name"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            (kind.clone(), name)
        });
        Value::Array(items)
    }

    fn list_tables(&self) -> String {
        self.exec(&["nft", "list", "tables"])
    }
}

/// Drops handles (they differ between two tables of the same content) and sorts set elements.
fn normalise(v: &mut Value) {
    match v {
        Value::Object(o) => {
            o.remove("handle");
            if let Some(Value::Array(e)) = o.get_mut("elem") {
                e.sort_by_key(|x| x.to_string());
            }
            o.values_mut().for_each(normalise);
        }
        Value::Array(a) => a.iter_mut().for_each(normalise),
        _ => {}
    }
}
