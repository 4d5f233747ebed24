//! Deleting a host veth after DEL has answered.
//!
//! Deleting a veth pair costs ~10 ms in the kernel (the unregister waits for RCU grace periods),
//! more than everything else DEL does, and `ptp` pays it too. What DEL must have done before it
//! answers is take the pod off the network (the host veth down: its routes go with it) and release
//! what it held (pending mark, record, address). So DEL forks a reaper first, while the plugin is
//! still single-threaded, and the reaper deletes the pair as soon as DEL tells it
//! ([`Reaper::delete_link_now`], or the plugin's exit): the runtime gets its answer without waiting for the
//! kernel, and the pair is gone a few milliseconds later (or with the pod's namespace, whichever
//! comes first).
//!
//! The reaper is double-forked (reparented to init, never a zombie of the runtime), in its own
//! session, with /dev/null for stdio (the runtime's pipes close when DEL exits), and bounded by an
//! alarm. It also adopts DEL's nf_tables socket ([`Reaper::adopt`]): that socket's close waits for
//! the kernel to free other processes' recent commits, which parallel DELs would otherwise queue for. A reaper that never ran leaves a down link without a record: the next ADD of that
//! attachment deletes it (`ops::add`), and nothing routes to it.

use crate::error::{Error, Result};
use crate::netlink::Netlink;
use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult};
use std::io::IoSlice;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// How long a reaper may live at most (it needs milliseconds; this only bounds a wedged one).
const REAPER_DEADLINE_SECS: u32 = 30;
/// Parent to reaper: delete the link now.
const DELETE_NOW: u8 = b'D';
/// Parent to reaper: a descriptor to close when done (its close may wait; see `adopt`).
const ADOPT: u8 = b'F';

/// The parent's end of a forked reaper. Dropping it (or exiting) tells the reaper DEL is over: it
/// deletes the link if it has not yet, closes what it adopted, and exits.
pub struct Reaper {
    chan: OwnedFd,
}

impl Reaper {
    /// The link is down and no longer needed: the reaper deletes it now, while DEL goes on.
    pub fn delete_link_now(&self) -> Result<()> {
        self.send(DELETE_NOW, None)
    }

    /// Gives `fd` to the reaper, which closes it after the link is gone. For a NETLINK_NETFILTER
    /// socket whose close would wait for other processes' commits to be freed (see palisade-nft's
    /// `ElementWriter::into_fd`): in flight and then held by the reaper, the socket outlives
    /// our copy, so our close (and our exit) does not wait.
    pub fn adopt(&self, fd: OwnedFd) -> Result<()> {
        self.send(ADOPT, Some(&fd))
    }

    fn send(&self, what: u8, fd: Option<&OwnedFd>) -> Result<()> {
        let byte = [what];
        let iov = [IoSlice::new(&byte)];
        let fds = fd.map(|f| [f.as_raw_fd()]);
        let cmsgs: Vec<ControlMessage<'_>> = fds
            .as_ref()
            .map(|f| vec![ControlMessage::ScmRights(f)])
            .unwrap_or_default();
        sendmsg::<()>(
            self.chan.as_raw_fd(),
            &iov,
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map(|_| ())
        .map_err(|e| errno("writing to the link reaper", e))
    }
}

/// Forks a reaper for `link` when that is safe: the link exists and this process has one thread
/// (a fork of a multi-threaded process may only exec). None: delete the link in place.
pub fn fork_for(link: &str) -> Result<Option<Reaper>> {
    if !link_exists(link) || thread_count()? != 1 {
        return Ok(None);
    }
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| errno("a socket pair for the link reaper", e))?;
    // SAFETY: the process has exactly one thread (checked above), so the child may run any code:
    // no lock can be held by a thread that does not exist in it.
    match unsafe { fork() }.map_err(|e| errno("forking the link reaper", e))? {
        ForkResult::Parent { child } => {
            drop(theirs);
            // The intermediate child exits at once; reap it so it is never a zombie.
            waitpid(child, None).map_err(|e| errno("waiting for the reaper's parent", e))?;
            Ok(Some(Reaper { chan: ours }))
        }
        ForkResult::Child => {
            drop(ours);
            let _ = nix::unistd::setsid();
            // SAFETY: still one thread (this child of a single-threaded parent).
            match unsafe { fork() } {
                Ok(ForkResult::Child) => {
                    let code = reap(link, theirs);
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

/// The reaper: stdio to /dev/null; delete the link when told (or when the parent is gone), keep
/// what the parent hands over until then, exit.
fn reap(link: &str, chan: OwnedFd) -> i32 {
    // SAFETY: alarm only arms a timer; SIGALRM's default action ends the process.
    unsafe { libc::alarm(REAPER_DEADLINE_SECS) };
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..=2 {
            // SAFETY: dup2 onto the standard descriptors of this process only.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
    else {
        return 1;
    };
    let delete = || rt.block_on(async { Netlink::current()?.delete_link(link).await });
    let mut deleted: Option<Result<bool>> = None;
    let mut adopted: Vec<OwnedFd> = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        let mut iov = [std::io::IoSliceMut::new(&mut byte)];
        let mut space = nix::cmsg_space!([std::os::fd::RawFd; 4]);
        let msg = match recvmsg::<()>(
            chan.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => break,
        };
        let n = msg.bytes;
        if let Ok(cmsgs) = msg.cmsgs() {
            for c in cmsgs {
                if let ControlMessageOwned::ScmRights(fds) = c {
                    // SAFETY: descriptors just received with SCM_RIGHTS: new and ours alone.
                    adopted.extend(
                        fds.into_iter()
                            .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                    );
                }
            }
        }
        if n == 0 {
            break;
        }
        if byte[0] == DELETE_NOW && deleted.is_none() {
            deleted = Some(delete());
        }
    }
    let deleted = deleted.unwrap_or_else(delete);
    drop(adopted);
    i32::from(deleted.is_err())
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
