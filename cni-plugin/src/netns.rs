//! Entering a network namespace, safely: namespaces are per thread, so only a short-lived thread
//! that exists for that purpose ever calls `setns`. It opens a netlink socket there (a socket keeps
//! the namespace it was created in) or writes a sysctl, and ends. Tokio workers never move.

use crate::error::{Error, Result};
use nix::sched::{setns, CloneFlags};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;

/// `NS_GET_NSTYPE` ioctl (linux/nsfs.h: `_IO(0xb7, 0x3)`).
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;
/// This thread's network namespace.
pub const SELF_NETNS: &str = "/proc/thread-self/ns/net";

/// Opens `path` and verifies it is a network namespace (not a regular file, not another kind of
/// namespace). Errors name `CNI_NETNS` (code 4).
pub fn open(path: &str) -> Result<File> {
    let f = File::open(path)
        .map_err(|e| Error::env("CNI_NETNS", format!("cannot open {path:?}: {e}")))?;
    // SAFETY: ioctl on a valid fd with an argument-less request.
    let t = unsafe { libc::ioctl(f.as_raw_fd(), NS_GET_NSTYPE as _) };
    if t < 0 {
        return Err(Error::env(
            "CNI_NETNS",
            format!("{path:?} is not a namespace file"),
        ));
    }
    if t != libc::CLONE_NEWNET {
        return Err(Error::env(
            "CNI_NETNS",
            format!("{path:?} is a namespace, but not a network namespace"),
        ));
    }
    Ok(f)
}

/// Whether `ns` is the namespace this thread runs in (the node's).
pub fn is_current(ns: &File) -> Result<bool> {
    let a = ns
        .metadata()
        .map_err(|e| Error::io("stat of CNI_NETNS", e))?;
    let b =
        std::fs::metadata(SELF_NETNS).map_err(|e| Error::io(format!("stat of {SELF_NETNS}"), e))?;
    Ok(a.dev() == b.dev() && a.ino() == b.ino())
}

/// Runs `f` on a fresh thread that has entered `ns`, and returns its result.
pub fn run_in<T: Send + 'static>(
    ns: &File,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let fd = ns
        .try_clone()
        .map_err(|e| Error::io("duplicating the netns fd", e))?;
    std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || {
            setns(&fd, CloneFlags::CLONE_NEWNET).map_err(|e| {
                Error::io(
                    "entering the pod network namespace",
                    std::io::Error::from(e),
                )
            })?;
            f()
        })
        .map_err(|e| Error::io("spawning the netns thread", e))?
        .join()
        .map_err(|_| Error::io("netns thread", std::io::Error::other("panicked")))?
}

/// A netlink route socket created inside `ns`, bound, ready for `rtnetlink::from_socket`.
pub fn netlink_socket_in(ns: &File) -> Result<netlink_sys::Socket> {
    run_in(ns, || {
        let mut s = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE)
            .map_err(|e| Error::io("creating a netlink socket in the pod namespace", e))?;
        s.bind_auto()
            .map_err(|e| Error::io("binding the pod netlink socket", e))?;
        s.set_non_blocking(true)
            .map_err(|e| Error::io("making the pod netlink socket non-blocking", e))?;
        Ok(s)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_is_not_a_netns() {
        let p = std::env::temp_dir().join(format!("palisade-notns-{}", std::process::id()));
        std::fs::write(&p, b"x").unwrap();
        let err = open(p.to_str().unwrap()).unwrap_err();
        std::fs::remove_file(&p).unwrap();
        assert_eq!(err.code(), 4);
        assert!(err.to_string().contains("CNI_NETNS"), "{err}");
    }

    #[test]
    fn another_namespace_kind_is_not_a_netns() {
        let err = open("/proc/self/ns/uts").unwrap_err();
        assert!(err.to_string().contains("not a network namespace"), "{err}");
    }

    #[test]
    fn own_netns_is_recognised() {
        let f = open(SELF_NETNS).unwrap();
        assert!(is_current(&f).unwrap());
    }
}
