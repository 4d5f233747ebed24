//! Waiting for the machine to go quiet before a measurement: after a ruleset is swapped (same-lab
//! mode), the kernel may still be freeing the old table and loading work may still be draining, and
//! a slice measured during that measures the swap, not the ruleset.

use std::time::{Duration, Instant};

/// CPU time counters of all CPUs together, from `/proc/stat` (jiffies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    pub busy: u64,
    pub total: u64,
}

/// Parses the aggregate `cpu` line of `/proc/stat`: idle and iowait are idle, the rest busy.
pub fn parse_stat(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 5 {
        return None;
    }
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v[4];
    Some(CpuTimes {
        busy: total - idle,
        total,
    })
}

fn read() -> Option<CpuTimes> {
    parse_stat(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// Waits until the CPUs were at most `max_busy` (0..1, of all CPUs) busy over one `window`, for at
/// most `limit`. Returns how long it waited and whether the machine went quiet.
pub fn wait_quiet(max_busy: f64, window: Duration, limit: Duration) -> (Duration, bool) {
    let start = Instant::now();
    let Some(mut last) = read() else {
        return (Duration::ZERO, false);
    };
    while start.elapsed() < limit {
        std::thread::sleep(window);
        let Some(now) = read() else {
            return (start.elapsed(), false);
        };
        let total = now.total.saturating_sub(last.total);
        let busy = now.busy.saturating_sub(last.busy);
        if total > 0 && (busy as f64) <= max_busy * total as f64 {
            return (start.elapsed(), true);
        }
        last = now;
    }
    (start.elapsed(), false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_aggregate_line_counts_idle_and_iowait_as_idle() {
        let stat = "cpu  100 5 50 800 20 3 2 0 0 0\ncpu0 50 2 25 400 10 1 1 0 0 0\nintr 1\n";
        assert_eq!(
            parse_stat(stat),
            Some(CpuTimes {
                busy: 160,
                total: 980
            })
        );
        assert_eq!(parse_stat("intr 1\n"), None);
        assert_eq!(parse_stat("cpu  1 2\n"), None);
    }
}
