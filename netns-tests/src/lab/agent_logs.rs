//! What the nodes' agents logged during one test: a failed test's report carries it, since the
//! lab (and with it every agent log) is gone once the run ends.

use super::Lab;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;

/// Lines of each agent's log a report carries at most (the last ones).
pub const REPORT_LINES: usize = 120;

/// Where each node's agent log ended at one moment ([`Lab::agent_log_mark`]).
#[derive(Debug, Clone)]
pub struct AgentLogMark {
    logs: Vec<(String, PathBuf, u64)>,
}

impl Lab {
    /// The current end of every node's agent log.
    pub fn agent_log_mark(&self) -> AgentLogMark {
        AgentLogMark {
            logs: self
                .state
                .nodes
                .iter()
                .map(|n| {
                    let path = n.dir.join("agent.log");
                    let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                    (n.name.clone(), path, len)
                })
                .collect(),
        }
    }

    /// What each agent logged after `mark` (its last `max_lines` lines per node), as a block to
    /// append to a failure: one header per node, then its lines.
    pub fn agent_logs_since(&self, mark: &AgentLogMark, max_lines: usize) -> String {
        let mut out = String::new();
        for (node, path, from) in &mark.logs {
            let text = strip_ansi(&read_from(path, *from));
            let lines: Vec<&str> = text.lines().collect();
            let shown = &lines[lines.len().saturating_sub(max_lines)..];
            out.push_str(&format!(
                "--- {node}'s agent log during the test ({} line(s){}, {}):\n",
                lines.len(),
                if shown.len() < lines.len() {
                    format!(", the last {}", shown.len())
                } else {
                    String::new()
                },
                path.display()
            ));
            for l in shown {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }
}

/// `text` without terminal colour sequences (`ESC [ ... letter`; the agent colours its log).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Skip `[`, parameters, and the final letter.
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The file's text from byte `from` (from its start if it shrank: a restarted agent may have
/// truncated it), or why it could not be read.
fn read_from(path: &std::path::Path, from: u64) -> String {
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return format!("(cannot open: {e})"),
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = if len < from { 0 } else { from };
    let mut buf = Vec::new();
    match f
        .seek(SeekFrom::Start(start))
        .and_then(|_| f.read_to_end(&mut buf))
    {
        Ok(_) => String::from_utf8_lossy(&buf).into_owned(),
        Err(e) => format!("(cannot read: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::{read_from, strip_ansi};
    use std::io::Write;

    #[test]
    fn only_what_was_written_after_the_mark_is_read() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(b"before\n").unwrap();
        let mark = 7;
        f.write_all(b"after 1\nafter 2\n").unwrap();
        assert_eq!(read_from(f.path(), mark), "after 1\nafter 2\n");
        // A log that shrank (truncated by a restart) is read whole.
        assert_eq!(read_from(f.path(), 1000), "before\nafter 1\nafter 2\n");
    }

    #[test]
    fn colour_sequences_are_left_out_of_reports() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[34mDEBUG\u{1b}[0m x=1"),
            "2026 DEBUG x=1"
        );
    }
}
