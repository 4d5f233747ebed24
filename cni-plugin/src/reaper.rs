//! Deleting a host veth after DEL has answered.
//!
//! Deleting a veth pair costs ~10 ms in the kernel (the unregister waits for RCU grace periods),
//! more than everything else DEL does, and `ptp` pays it too. What DEL must have done before it
//! answers is take the pod off the network (the host veth down: its routes go with it) and release
//! what it held (pending mark, record, address). So DEL forks a reaper first, while the plugin is
//! still single-threaded, and the reaper deletes the pair as soon as DEL lets it go
//! ([`Reaper::release`], or the plugin's exit): the runtime gets its answer without waiting for the
//! kernel, and the pair is gone a few milliseconds later (or with the pod's namespace, whichever
//! comes first).
//!
//! The reaper is double-forked (reparented to init, never a zombie of the runtime), in its own
//! session, with /dev/null for stdio (the runtime's pipes close when DEL exits), and bounded by an
//! alarm. A reaper that never ran leaves a down link without a record: the next ADD of that
//! attachment deletes it (`ops::add`), and nothing routes to it.

use crate::error::{Error, Result};
use crate::netlink::Netlink;
use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult};
use std::os::fd::OwnedFd;

/// How long a reaper may live at most (it needs milliseconds; this only bounds a wedged one).
const REAPER_DEADLINE_SECS: u32 = 30;

/// The parent's end of a forked reaper: releasing it (or exiting) lets the reaper delete the link.
pub struct Reaper {
    go: OwnedFd,
}

impl Reaper {
    /// The link is no longer needed: the reaper deletes it now.
    pub fn release(self) {
        drop(self.go);
    }
}

/// Forks a reaper for `link` when that is safe: the link exists and this process has one thread
/// (a fork of a multi-threaded process may only exec). None: delete the link in place.
pub fn fork_for(link: &str) -> Result<Option<Reaper>> {
    if !link_exists(link) || thread_count()? != 1 {
        return Ok(None);
    }
    let (wait_end, go_end) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| errno("a pipe", e))?;
    // SAFETY: the process has exactly one thread (checked above), so the child may run any code:
    // no lock can be held by a thread that does not exist in it.
    match unsafe { fork() }.map_err(|e| errno("forking the link reaper", e))? {
        ForkResult::Parent { child } => {
            drop(wait_end);
            // The intermediate child exits at once; reap it so it is never a zombie.
            waitpid(child, None).map_err(|e| errno("waiting for the reaper's parent", e))?;
            Ok(Some(Reaper { go: go_end }))
        }
        ForkResult::Child => {
            drop(go_end);
            let _ = nix::unistd::setsid();
            // SAFETY: still one thread (this child of a single-threaded parent).
            match unsafe { fork() } {
                Ok(ForkResult::Child) => {
                    let code = reap(link, wait_end);
                    std::process::exit(code);
                }
                _ => {
                    // SAFETY: _exit ends the intermediate child without running the parent's
                    // atexit handlers or flushing its copies of the parent's buffers.
                    unsafe { libc::_exit(0) }
                }
            }
        }
    }
}

/// The reaper: stdio to /dev/null, wait for the parent to let go, delete the link, exit.
fn reap(link: &str, wait_end: OwnedFd) -> i32 {
    // SAFETY: alarm only arms a timer; SIGALRM's default action ends the process.
    unsafe { libc::alarm(REAPER_DEADLINE_SECS) };
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..=2 {
            // SAFETY: dup2 onto the standard descriptors of this process only.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
    let mut buf = [0u8; 1];
    // Returns at EOF: the parent released us or exited.
    loop {
        match nix::unistd::read(&wait_end, &mut buf) {
            Ok(0) => break,
            Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        }
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    {
        Ok(rt) => rt,
        Err(_) => return 1,
    };
    match rt.block_on(async { Netlink::current()?.delete_link(link).await }) {
        Ok(_) => 0,
        Err(_) => 1,
    }
}

fn link_exists(name: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated string; if_nametoindex only reads it.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

/// Threads of this process (`/proc/self/stat`, field 20).
fn thread_count() -> Result<usize> {
    let stat = std::fs::read_to_string("/proc/self/stat")
        .map_err(|e| Error::io("reading /proc/self/stat", e))?;
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(17))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| {
            Error::io(
                "reading the thread count from /proc/self/stat",
                std::io::Error::other("unexpected format"),
            )
        })
}

fn errno(what: &str, e: nix::errno::Errno) -> Error {
    Error::io(what, std::io::Error::from(e))
}

#[cfg(test)]
mod tests {
    /// A DEL run inside a multi-threaded process must see the other threads and not fork.
    #[test]
    fn thread_count_sees_a_new_thread() {
        let before = super::thread_count().unwrap();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || rx.recv());
        assert!(before >= 1);
        assert!(super::thread_count().unwrap() >= 2);
        drop(tx);
        let _ = t.join();
    }

    #[test]
    fn a_missing_link_has_no_reaper() {
        assert!(super::fork_for("pal-no-such-link").unwrap().is_none());
    }
}
