//! Teardown on SIGINT/SIGTERM/SIGHUP: labs being built (or owned by a test process) register their
//! run directory; a signal tears every registered lab down from its state file, then exits 130.
//!
//! The handler itself only writes a byte to a pipe (async-signal-safe); a watcher thread does the
//! work, so this works whichever thread the signal lands on.

use std::collections::BTreeSet;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Mutex, Once};

static REGISTERED: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());
static INTERRUPTED: AtomicBool = AtomicBool::new(false);
static PIPE_WRITE: AtomicI32 = AtomicI32::new(-1);
static INSTALL: Once = Once::new();
/// How long the owner of a lab gets to tear it down itself after a signal.
const GRACE: std::time::Duration = std::time::Duration::from_secs(3);

extern "C" fn on_signal(_: libc::c_int) {
    let fd = PIPE_WRITE.load(Ordering::SeqCst);
    if fd >= 0 {
        let b = [1u8];
        // SAFETY: write(2) on a valid pipe fd is async-signal-safe.
        unsafe {
            libc::write(fd, b.as_ptr().cast(), 1);
        }
    }
}

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
        let Ok((read, write)) = nix::unistd::pipe() else {
            tracing::error!("cannot create the signal pipe: a signal will not tear labs down");
            return;
        };
        PIPE_WRITE.store(write.into_raw_fd(), Ordering::SeqCst);
        let handler = nix::sys::signal::SigHandler::Handler(on_signal);
        let action = nix::sys::signal::SigAction::new(
            handler,
            nix::sys::signal::SaFlags::SA_RESTART,
            nix::sys::signal::SigSet::empty(),
        );
        for sig in [
            nix::sys::signal::Signal::SIGINT,
            nix::sys::signal::Signal::SIGTERM,
            nix::sys::signal::Signal::SIGHUP,
        ] {
            // SAFETY: the handler only calls write(2).
            if let Err(e) = unsafe { nix::sys::signal::sigaction(sig, &action) } {
                tracing::error!("cannot install a handler for {sig}: {e}");
            }
        }
        std::thread::spawn(move || {
            let mut b = [0u8; 1];
            // SAFETY: reading one byte from our own pipe.
            let n = unsafe { libc::read(read.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
            if n <= 0 {
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
