//! Our nft table in a test namespace: load a document, list the table in a form two tables can be
//! compared in, list the namespace's tables. The one normalization every test compares with.

use crate::netns::Netns;
use serde_json::Value;

/// Our table as a comparable value: no metainfo, handles, counter values or set sizes (a limit,
/// raised by a diff only when a set outgrows it: a table patched since its full replace may hold
/// a set at a larger size than a new full replace gives it); set elements and objects sorted (a
/// re-created table lists them in another order), rules in order per chain.
pub fn normalized(listing: &str) -> Value {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(m) => {
                m.remove("handle");
                if let Some(Value::Object(c)) = m.get_mut("counter") {
                    c.remove("packets");
                    c.remove("bytes");
                }
                for kind in ["set", "map"] {
                    if let Some(Value::Object(s)) = m.get_mut(kind) {
                        s.remove("size");
                    }
                }
                if let Some(Value::Array(e)) = m.get_mut("elem") {
                    e.sort_by_key(|x| x.to_string());
                }
                m.values_mut().for_each(strip);
            }
            Value::Array(a) => a.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut v: Value = serde_json::from_str(listing).expect("nft listing is JSON");
    strip(&mut v);
    // Objects in any order (a full replace creates them in another order than incremental commits
    // did); rules in their order within each chain.
    let mut objects = Vec::new();
    let mut rules = std::collections::BTreeMap::<String, Vec<Value>>::new();
    for item in v["nftables"].as_array().cloned().unwrap_or_default() {
        if item.get("metainfo").is_some() {
            continue;
        }
        match item["rule"]["chain"].as_str() {
            Some(chain) => rules.entry(chain.to_string()).or_default().push(item),
            None => objects.push(item),
        }
    }
    objects.sort_by_key(|x| x.to_string());
    serde_json::json!({"objects": objects, "rules": rules})
}

/// Runs `nft -f -` with `script` on stdin in the calling thread's network namespace (a test that
/// entered its own with `netns::enter_private_netns`); panics with nft's stderr when nft refuses it.
pub fn load_here(script: &str) {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("nft must be installed");
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes())
        .expect("nft reads its script");
    let out = child.wait_with_output().expect("nft runs");
    assert!(
        out.status.success(),
        "nft -f - refused the script: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The items of `nft -j list WORDS...` run in the calling thread's network namespace; panics with
/// nft's stderr when the listing fails.
pub fn list_here(words: &[&str]) -> Vec<Value> {
    let out = std::process::Command::new("nft")
        .arg("-j")
        .arg("list")
        .args(words)
        .output()
        .expect("nft must be installed");
    assert!(
        out.status.success(),
        "nft -j list {} failed: {}",
        words.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut listing: Value = serde_json::from_slice(&out.stdout).expect("nft lists JSON");
    match listing["nftables"].take() {
        Value::Array(items) => items,
        other => panic!(
            "nft -j list {}: no nftables array: {other}",
            words.join(" ")
        ),
    }
}

/// What kernel tests ask of a namespace's nftables.
pub trait NftNs {
    /// Runs `nft -j -f -` with the document on stdin inside the namespace; nft's stderr on failure.
    fn nft_load(&self, doc: &str) -> Result<(), String>;
    /// `nft -j list table inet palisade`, [`normalized`]; panics when the table is missing.
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
        normalized(&self.exec(&["nft", "-j", "list", "table", "inet", "palisade"]))
    }

    fn list_tables(&self) -> String {
        self.exec(&["nft", "list", "tables"])
    }
}
