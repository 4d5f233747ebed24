//! Connectivity matrices: built from probe records, compared with expectations, printed as truth
//! tables a person can read (one table per port/protocol, rows = from, columns = to).

use crate::lab::ProbeRecord;
use std::collections::{BTreeMap, BTreeSet};

/// A (port, protocol) column group, e.g. `(80, "TCP")`.
pub type PortProto = (u16, String);

/// Connectivity of ordered pod pairs per (port, protocol). Missing cells are "not probed".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Matrix {
    pub pods: Vec<String>,
    pub cells: BTreeMap<(PortProto, String, String), bool>,
}

/// One cell that differs between two matrices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CellDiff {
    pub port: u16,
    pub protocol: String,
    pub from: String,
    pub to: String,
    pub before: Option<bool>,
    pub after: Option<bool>,
}

impl std::fmt::Display for CellDiff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let word = |b: Option<bool>| match b {
            Some(true) => "connected",
            Some(false) => "blocked",
            None => "not probed",
        };
        write!(
            f,
            "{} -> {} {}/{}: {} -> {}",
            self.from,
            self.to,
            self.protocol,
            self.port,
            word(self.before),
            word(self.after)
        )
    }
}

impl Matrix {
    pub fn new(pods: Vec<String>) -> Self {
        Self {
            pods,
            cells: BTreeMap::new(),
        }
    }

    pub fn from_records(pods: Vec<String>, records: &[ProbeRecord]) -> Self {
        let mut m = Self::new(pods);
        for r in records {
            m.cells.insert(
                ((r.port, r.protocol.clone()), r.from.clone(), r.to.clone()),
                r.connected,
            );
        }
        m
    }

    pub fn set(&mut self, pp: &PortProto, from: &str, to: &str, v: bool) {
        self.cells
            .insert((pp.clone(), from.to_string(), to.to_string()), v);
    }

    pub fn get(&self, pp: &PortProto, from: &str, to: &str) -> Option<bool> {
        self.cells
            .get(&(pp.clone(), from.to_string(), to.to_string()))
            .copied()
    }

    pub fn port_protos(&self) -> Vec<PortProto> {
        let s: BTreeSet<PortProto> = self.cells.keys().map(|(pp, _, _)| pp.clone()).collect();
        // TCP before UDP, then by port.
        let mut v: Vec<PortProto> = s.into_iter().collect();
        v.sort_by(|a, b| (&a.1, a.0).cmp(&(&b.1, b.0)));
        v
    }

    /// Cells whose value differs (cells present in either matrix).
    pub fn diff(&self, after: &Matrix) -> Vec<CellDiff> {
        let keys: BTreeSet<&(PortProto, String, String)> =
            self.cells.keys().chain(after.cells.keys()).collect();
        keys.into_iter()
            .filter_map(|k| {
                let before = self.cells.get(k).copied();
                let now = after.cells.get(k).copied();
                (before != now).then(|| CellDiff {
                    port: k.0 .0,
                    protocol: k.0 .1.clone(),
                    from: k.1.clone(),
                    to: k.2.clone(),
                    before,
                    after: now,
                })
            })
            .collect()
    }

    /// Truth tables, one per (port, protocol). `.` connected, `X` blocked, `-` not probed (a pod
    /// to itself). With `previous`, changed cells are marked (`X!`/`.!`) and, with `color`, green
    /// (now connected) or red (now blocked).
    pub fn render(&self, previous: Option<&Matrix>, color: bool) -> String {
        let width = self.pods.iter().map(String::len).max().unwrap_or(3).max(3) + 2;
        let mut out = String::new();
        for pp in self.port_protos() {
            out.push_str(&format!(
                "{}/{}   (rows: from, columns: to; . connected, X blocked",
                pp.1, pp.0
            ));
            if previous.is_some() {
                out.push_str(", ! changed");
            }
            out.push_str(")\n");
            out.push_str(&format!("{:width$}", ""));
            for to in &self.pods {
                out.push_str(&format!("{to:>width$}"));
            }
            out.push('\n');
            for from in &self.pods {
                out.push_str(&format!("{from:width$}"));
                for to in &self.pods {
                    let now = self.get(&pp, from, to);
                    let mut cell = match now {
                        Some(true) => ".".to_string(),
                        Some(false) => "X".to_string(),
                        None => "-".to_string(),
                    };
                    let changed =
                        previous.is_some_and(|p| p.get(&pp, from, to) != now && now.is_some());
                    if changed {
                        cell.push('!');
                    }
                    let padded = format!("{cell:>width$}");
                    if changed && color {
                        let code = if now == Some(true) { "32" } else { "31" };
                        out.push_str(&format!("\x1b[1;{code}m{padded}\x1b[0m"));
                    } else {
                        out.push_str(&padded);
                    }
                }
                out.push('\n');
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(from: &str, to: &str, connected: bool) -> ProbeRecord {
        ProbeRecord {
            from: from.into(),
            to: to.into(),
            port: 80,
            protocol: "TCP".into(),
            connected,
        }
    }

    #[test]
    fn render_marks_blocked_and_changed_cells_and_diff_lists_them() {
        let pods = vec!["x/a".to_string(), "x/b".to_string()];
        let before = Matrix::from_records(
            pods.clone(),
            &[rec("x/a", "x/b", true), rec("x/b", "x/a", true)],
        );
        let after =
            Matrix::from_records(pods, &[rec("x/a", "x/b", true), rec("x/b", "x/a", false)]);
        let text = after.render(Some(&before), false);
        assert!(text.contains("TCP/80"), "{text}");
        assert!(text.contains("X!"), "{text}");
        assert!(!text.contains(".!"), "{text}");
        let d = before.diff(&after);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].to_string(), "x/b -> x/a TCP/80: connected -> blocked");
    }
}
