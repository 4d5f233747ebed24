//! A model of what the kernel does with our nft JSON batches, at the level of our own table:
//! chains with their rules, sets and maps with their elements. It checks what the kernel checks
//! for the commands we emit (missing objects, deleting referenced chains or sets, deleting
//! missing elements, rules referring to missing sets or chains, conflicting map keys), and
//! applies a batch atomically. Used to prove `diff` equals a full replace without root.

use crate::error::PolicyError;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// Our table as the kernel would hold it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelTable {
    pub exists: bool,
    /// Chain name → (definition JSON, rules as JSON text).
    pub chains: BTreeMap<String, (String, Vec<String>)>,
    /// Set or map name → (definition JSON without elements, key JSON text → value JSON text).
    pub sets: BTreeMap<String, (String, BTreeMap<String, String>)>,
    /// Named counters.
    pub counters: BTreeSet<String>,
    /// The `size` each set was added with: a limit, not content (two tables holding the same
    /// elements are equal whatever sizes their sets were added with; `diff` recreates a set
    /// only when it outgrows its size, so a shrunk one keeps the larger).
    pub sizes: SetSizes,
}

/// Set name → the `size` it was added with; never part of a table's equality.
#[derive(Debug, Clone, Default)]
pub struct SetSizes(pub BTreeMap<String, u64>);

impl PartialEq for SetSizes {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for SetSizes {}

/// What rules and map elements refer to by name.
#[derive(Default)]
struct Refs {
    sets: BTreeSet<String>,
    chains: BTreeSet<String>,
    counters: BTreeSet<String>,
}

fn bad(msg: impl Into<String>) -> PolicyError {
    PolicyError::BadBatch(msg.into())
}

fn name_of(body: &Value) -> Result<String, PolicyError> {
    body.get("name")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| bad(format!("no name in {body}")))
}

fn refs(v: &Value, r: &mut Refs) {
    match v {
        Value::String(s) => {
            if let Some(n) = s.strip_prefix('@') {
                r.sets.insert(n.to_string());
            }
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, r)),
        Value::Object(o) => {
            for (k, x) in o {
                if k == "jump" || k == "goto" {
                    if let Some(t) = x.get("target").and_then(Value::as_str) {
                        r.chains.insert(t.to_string());
                    }
                }
                if let (true, Some(n)) = (k == "counter", x.as_str()) {
                    r.counters.insert(n.to_string());
                }
                refs(x, r);
            }
        }
        _ => {}
    }
}

impl KernelTable {
    /// Applies one `{"nftables": [...]}` batch atomically: on error nothing changes.
    pub fn apply(&mut self, batch: &Value) -> Result<(), PolicyError> {
        let cmds = batch
            .get("nftables")
            .and_then(Value::as_array)
            .ok_or_else(|| bad("not an nftables document"))?;
        let mut next = self.clone();
        for (i, c) in cmds.iter().enumerate() {
            next.command(c)
                .map_err(|e| bad(format!("command {i} {c}: {e}")))?;
        }
        *self = next;
        Ok(())
    }

    fn referenced(&self) -> Refs {
        let mut found = Refs::default();
        for (_, rules) in self.chains.values() {
            for r in rules {
                if let Ok(v) = serde_json::from_str::<Value>(r) {
                    refs(&v, &mut found);
                }
            }
        }
        for (_, elems) in self.sets.values() {
            for val in elems.values() {
                if let Ok(v) = serde_json::from_str::<Value>(val) {
                    refs(&v, &mut found);
                }
            }
        }
        found
    }

    fn command(&mut self, c: &Value) -> Result<(), PolicyError> {
        let (verb, obj) = c
            .as_object()
            .and_then(|o| o.iter().next())
            .ok_or_else(|| bad("empty command"))?;
        let (kind, body) = obj
            .as_object()
            .and_then(|o| o.iter().next())
            .ok_or_else(|| bad("empty object"))?;
        if kind != "table" && !self.exists {
            return Err(bad("table does not exist"));
        }
        match (verb.as_str(), kind.as_str()) {
            ("add", "table") => self.exists = true,
            ("delete", "table") => {
                if !self.exists {
                    return Err(bad("delete of missing table"));
                }
                *self = KernelTable::default();
            }
            ("add", "chain") => {
                let n = name_of(body)?;
                self.chains
                    .entry(n)
                    .or_insert_with(|| (body.to_string(), Vec::new()));
            }
            ("flush", "chain") => {
                let n = name_of(body)?;
                self.chains
                    .get_mut(&n)
                    .ok_or_else(|| bad(format!("flush of missing chain {n}")))?
                    .1
                    .clear();
            }
            ("delete", "chain") => {
                let n = name_of(body)?;
                let (_, rules) = self
                    .chains
                    .get(&n)
                    .ok_or_else(|| bad(format!("delete of missing chain {n}")))?;
                if !rules.is_empty() {
                    return Err(bad(format!("delete of non-empty chain {n}")));
                }
                if self.referenced().chains.contains(&n) {
                    return Err(bad(format!("delete of referenced chain {n}")));
                }
                self.chains.remove(&n);
            }
            ("add", "set" | "map") => {
                let n = name_of(body)?;
                let mut def = body.clone();
                let elems = def.as_object_mut().and_then(|o| o.remove("elem"));
                let size = def
                    .as_object_mut()
                    .and_then(|o| o.remove("size"))
                    .and_then(|v| v.as_u64());
                if !self.sets.contains_key(&n) {
                    if let Some(size) = size {
                        self.sizes.0.insert(n.clone(), size);
                    }
                    self.sets
                        .insert(n.clone(), (def.to_string(), BTreeMap::new()));
                }
                if let Some(e) = elems {
                    self.add_elements(&n, kind == "map", &e)?;
                }
            }
            ("flush", "set" | "map") => {
                let n = name_of(body)?;
                self.sets
                    .get_mut(&n)
                    .ok_or_else(|| bad(format!("flush of missing set {n}")))?
                    .1
                    .clear();
            }
            ("delete", "set" | "map") => {
                let n = name_of(body)?;
                if !self.sets.contains_key(&n) {
                    return Err(bad(format!("delete of missing set {n}")));
                }
                if self.referenced().sets.contains(&n) {
                    return Err(bad(format!("delete of referenced set {n}")));
                }
                self.sets.remove(&n);
                self.sizes.0.remove(&n);
            }
            ("add", "element") => {
                let n = name_of(body)?;
                let is_map = self
                    .sets
                    .get(&n)
                    .is_some_and(|(d, _)| d.contains("\"map\":\"verdict\""));
                self.add_elements(&n, is_map, body.get("elem").unwrap_or(&Value::Null))?;
            }
            ("delete", "element") => {
                let n = name_of(body)?;
                let set = self
                    .sets
                    .get_mut(&n)
                    .ok_or_else(|| bad(format!("no set {n}")))?;
                for e in body
                    .get("elem")
                    .and_then(Value::as_array)
                    .ok_or_else(|| bad("no elem"))?
                {
                    let key = match e {
                        Value::Array(kv) => kv.first().cloned().unwrap_or(Value::Null),
                        other => other.clone(),
                    };
                    if set.1.remove(&key.to_string()).is_none() {
                        return Err(bad(format!("delete of missing element {key} of {n}")));
                    }
                }
            }
            ("add", "rule") => {
                let chain = body
                    .get("chain")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("rule without chain"))?
                    .to_string();
                let mut named = Refs::default();
                refs(body, &mut named);
                for s in &named.sets {
                    if !self.sets.contains_key(s) {
                        return Err(bad(format!("rule refers to missing set {s}")));
                    }
                }
                for t in &named.chains {
                    if !self.chains.contains_key(t) {
                        return Err(bad(format!("rule jumps to missing chain {t}")));
                    }
                }
                for c in &named.counters {
                    if !self.counters.contains(c) {
                        return Err(bad(format!("rule refers to missing counter {c}")));
                    }
                }
                let mut r = body.clone();
                if let Some(o) = r.as_object_mut() {
                    o.remove("chain");
                }
                self.chains
                    .get_mut(&chain)
                    .ok_or_else(|| bad(format!("no chain {chain}")))?
                    .1
                    .push(r.to_string());
            }
            ("add", "counter") => {
                self.counters.insert(name_of(body)?);
            }
            ("delete", "counter") => {
                let n = name_of(body)?;
                if !self.counters.contains(&n) {
                    return Err(bad(format!("delete of missing counter {n}")));
                }
                if self.referenced().counters.contains(&n) {
                    return Err(bad(format!("delete of referenced counter {n}")));
                }
                self.counters.remove(&n);
            }
            (v, k) => return Err(bad(format!("unsupported command {v} {k}"))),
        }
        Ok(())
    }

    fn add_elements(&mut self, set: &str, is_map: bool, elems: &Value) -> Result<(), PolicyError> {
        let list = elems
            .as_array()
            .ok_or_else(|| bad("elem is not a list"))?
            .clone();
        let size = self.sizes.0.get(set).copied();
        for e in list {
            let (key, val) = match (&e, is_map) {
                (Value::Array(kv), true) if kv.len() == 2 => (kv[0].to_string(), kv[1].to_string()),
                (_, true) => return Err(bad(format!("map element without value {e}"))),
                (other, false) => (other.to_string(), String::new()),
            };
            if is_map {
                let mut named = Refs::default();
                refs(&e, &mut named);
                if let Some(missing) = named.chains.iter().find(|t| !self.chains.contains_key(*t)) {
                    return Err(bad(format!("map element goes to missing chain {missing}")));
                }
            }
            let entry = &mut self
                .sets
                .get_mut(set)
                .ok_or_else(|| bad(format!("no set {set}")))?
                .1;
            match entry.get(&key) {
                Some(old) if *old != val => {
                    return Err(bad(format!(
                        "element {key} of {set} exists with another value"
                    )))
                }
                Some(_) => {}
                None => {
                    // A set's `size` is a limit: the kernel answers ENFILE past it. Whether an
                    // `add` of an existing set changes its size differs between kernels (6.18
                    // takes the new one); the model keeps the first, the strictest.
                    if size.is_some_and(|size| entry.len() as u64 >= size) {
                        return Err(bad(format!(
                            "set {set} is full ({} elements, its size): the kernel answers ENFILE",
                            entry.len()
                        )));
                    }
                    entry.insert(key, val);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t() -> Value {
        json!({"table": {"family": "inet", "name": "palisade"}})
    }

    fn base() -> KernelTable {
        let mut k = KernelTable::default();
        k.apply(&json!({"nftables": [
            {"add": t()},
            {"add": {"chain": {"family": "inet", "table": "palisade", "name": "a"}}},
            {"add": {"chain": {"family": "inet", "table": "palisade", "name": "b"}}},
            {"add": {"set": {"family": "inet", "table": "palisade", "name": "s", "type": "ipv4_addr", "elem": ["10.0.0.1"]}}},
            {"add": {"map": {"family": "inet", "table": "palisade", "name": "m", "type": "ipv4_addr", "map": "verdict",
                             "elem": [["10.0.0.1", {"goto": {"target": "b"}}]]}}},
            {"add": {"rule": {"family": "inet", "table": "palisade", "chain": "a", "expr": [
                {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "@s"}},
                {"jump": {"target": "b"}}]}}}
        ]}))
        .unwrap();
        k
    }

    fn rejects(k: &KernelTable, cmd: Value) -> String {
        let mut k2 = k.clone();
        let e = k2
            .apply(&json!({"nftables": [cmd]}))
            .unwrap_err()
            .to_string();
        assert_eq!(&k2, k, "a failed batch changes nothing");
        e
    }

    #[test]
    fn model_rejects_what_the_kernel_rejects() {
        let k = base();
        let chain = |n: &str| json!({"family": "inet", "table": "palisade", "name": n});
        assert!(rejects(&k, json!({"delete": {"chain": chain("a")}})).contains("non-empty"));
        assert!(rejects(&k, json!({"delete": {"chain": chain("b")}})).contains("referenced"));
        assert!(rejects(&k, json!({"delete": {"set": chain("s")}})).contains("referenced"));
        assert!(rejects(&k, json!({"delete": {"element": {"family": "inet", "table": "palisade", "name": "s", "elem": ["10.0.0.9"]}}})).contains("missing element"));
        assert!(rejects(&k, json!({"add": {"element": {"family": "inet", "table": "palisade", "name": "m", "elem": [["10.0.0.1", {"goto": {"target": "a"}}]]}}})).contains("another value"));
        assert!(rejects(&k, json!({"add": {"rule": {"family": "inet", "table": "palisade", "chain": "b", "expr": [{"jump": {"target": "nope"}}]}}})).contains("missing chain"));
        assert!(rejects(&k, json!({"add": {"rule": {"family": "inet", "table": "palisade", "chain": "b", "expr": [{"match": {"op": "==", "left": 1, "right": "@nope"}}]}}})).contains("missing set"));
        assert!(rejects(
            &KernelTable::default(),
            json!({"add": {"chain": chain("x")}})
        )
        .contains("table does not exist"));
        // A set is full at its size, whatever an `add` of it says later.
        let mut full = k.clone();
        full.apply(&json!({"nftables": [
            {"add": {"set": {"family": "inet", "table": "palisade", "name": "sized", "type": "ipv4_addr", "size": 2, "elem": ["10.0.0.1", "10.0.0.2"]}}},
            {"add": {"set": {"family": "inet", "table": "palisade", "name": "sized", "type": "ipv4_addr", "size": 4}}},
            {"add": {"element": {"family": "inet", "table": "palisade", "name": "sized", "elem": ["10.0.0.2"]}}},
        ]}))
        .unwrap();
        assert!(rejects(&full, json!({"add": {"element": {"family": "inet", "table": "palisade", "name": "sized", "elem": ["10.0.0.3"]}}})).contains("ENFILE"));
        // And accepts the valid order: flush, then delete.
        let mut k2 = k.clone();
        k2.apply(&json!({"nftables": [{"flush": {"chain": chain("a")}}, {"delete": {"chain": chain("a")}}, {"delete": {"set": chain("s")}}]})).unwrap();
        assert!(!k2.chains.contains_key("a") && !k2.sets.contains_key("s"));
    }
}
