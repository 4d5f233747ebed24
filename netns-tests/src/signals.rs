//! Teardown on SIGINT/SIGTERM/SIGHUP: labs being built (or owned by a test process) register their
//! run directory; a signal tears every registered lab down from its state file, then exits 130.
//!
//! signal-hook's iterator does the async-signal-safe part (its handler only wakes a pipe); a watcher
//! thread does the work, so this works whichever thread the signal lands on.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};

static REGISTERED: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static INSTALL: Once = Once::new();
/// How long the owner of a lab gets to tear it down itself after a signal.
const GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Whether a signal asked us to stop: long operations check this before creating resources.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Registers a lab run dir for teardown on a signal (installs the handler on first use).
pub fn register(run_dir: &Path) {
    install();
    if let Ok(mut r) = REGISTERED.lock() {
        r.insert(run_dir.to_path_buf());
    }
}

/// The lab is gone or handed over (CLI `up` finished): a signal no longer tears it down.
pub fn unregister(run_dir: &Path) {
    if let Ok(mut r) = REGISTERED.lock() {
        r.remove(run_dir);
    }
}

fn install() {
    INSTALL.call_once(|| {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(
                    "cannot install signal handlers ({e}): a signal will not tear labs down"
                );
                return;
            }
        };
        std::thread::spawn(move || {
            if signals.forever().next().is_none() {
                return;
            }
            INTERRUPTED.store(true, Ordering::SeqCst);
            // Give the owning thread a moment to notice (its next step fails with Interrupted and
            // its guard tears down from the in-memory state); then tear down whatever is left
            // from the state files ourselves.
            let start = std::time::Instant::now();
            while start.elapsed() < GRACE
                && REGISTERED.lock().map(|r| !r.is_empty()).unwrap_or(false)
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let dirs: Vec<PathBuf> = REGISTERED
                .lock()
                .map(|r| r.iter().cloned().collect())
                .unwrap_or_default();
            for dir in dirs {
                eprintln!(
                    "palisade-lab: signal received, tearing down {}",
                    dir.display()
                );
                if let Err(e) = crate::lab::down_run_dir(&dir) {
                    eprintln!("palisade-lab: {e}");
                }
            }
            std::process::exit(130);
        });
    });
}
