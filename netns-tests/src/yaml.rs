//! YAML in and out of the lab (case files, manifests it writes for the agent), read the way the
//! agent reads manifests: serde-saphyr with YAML 1.2's core schema, so only `true`/`false` are
//! booleans and a label value `n`, `y`, `on` or `no` stays a string. Objects are held as
//! `serde_json::Value`, the type the agent's manifest source parses into.

use crate::error::{LabError, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;

fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        strict_booleans: true,
        // One line per error (line and column are in it), not a multi-line source snippet.
        with_snippet: false,
    }
}

/// One YAML document of `text` as a `T`; `what` names it in the error.
pub fn from_str<T: DeserializeOwned>(text: &str, what: &str) -> Result<T> {
    serde_saphyr::from_str_with_options(text, options()).map_err(|e| LabError::Parse {
        what: what.to_string(),
        detail: e.to_string(),
    })
}

/// Every document of `text` (a completely empty document is not among them).
pub fn documents<T: DeserializeOwned>(text: &str, what: &str) -> Result<Vec<T>> {
    serde_saphyr::from_multiple_with_options(text, options()).map_err(|e| LabError::Parse {
        what: what.to_string(),
        detail: e.to_string(),
    })
}

/// `value` as a YAML document; `what` names it in the error.
pub fn to_string<T: Serialize>(value: &T, what: &str) -> Result<String> {
    serde_saphyr::to_string(value).map_err(|e| LabError::Parse {
        what: what.to_string(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn only_true_and_false_are_booleans_as_for_the_agent() {
        let v: Value = from_str("{a: n, b: on, c: true, d: 8080}", "t").unwrap();
        assert_eq!(v, json!({"a": "n", "b": "on", "c": true, "d": 8080}));
    }

    #[test]
    fn an_object_written_and_read_back_is_the_same() {
        let obj = json!({"kind": "Pod", "metadata": {"labels": {"x": "no", "y": "1"}}, "spec": {"ports": [80]}});
        let text = to_string(&obj, "t").unwrap();
        assert_eq!(from_str::<Value>(&text, "t").unwrap(), obj, "{text}");
    }

    #[test]
    fn documents_skip_nothing_but_empty_ones_and_errors_name_the_input() {
        let docs: Vec<Value> = documents("a: 1\n---\nb: 2\n", "t").unwrap();
        assert_eq!(docs, vec![json!({"a": 1}), json!({"b": 2})]);
        let e = from_str::<Value>("a: [", "cases.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("cases.yaml"), "{e}");
    }
}
