//! Waiting for a condition in a test without a fixed sleep.

use std::time::{Duration, Instant};

/// Polls `f` every 5 ms until it is true or `timeout` passes; returns whether it became true (a
/// last try after the deadline, so a slow machine's last chance counts).
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_that_never_holds_times_out_false() {
        assert!(!wait_until(Duration::from_millis(20), || false));
    }

    #[test]
    fn a_condition_that_comes_true_is_seen() {
        let mut n = 0;
        assert!(wait_until(Duration::from_secs(5), || {
            n += 1;
            n > 3
        }));
    }
}
