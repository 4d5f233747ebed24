//! Names unique to one test run, short enough for a network namespace or an interface.

use std::sync::atomic::{AtomicUsize, Ordering};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// `<prefix><pid>x<n>`: unique to this process and call, so parallel tests and runs never share a
/// namespace, directory or link name.
pub fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::SeqCst)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_calls_with_one_prefix_give_two_names() {
        assert_ne!(unique("a"), unique("a"));
        assert!(unique("pal").starts_with(&format!("pal{}x", std::process::id())));
    }
}
