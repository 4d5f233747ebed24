//! The built-in allocator's store: host-local's on-disk layout under `<dataDir>/<network>/` (one
//! file per reserved address holding `"<containerID>\r\n<ifname>"`, `last_reserved_ip.<set>` for
//! round robin, and `lock`, flock'd around every allocation and release), so either plugin can read
//! the other's store.

use crate::config::{next_ip, Range, RangeSet};
use crate::error::{Error, Result};
use palisade_contract as contract;
use std::fs::{self, OpenOptions};
use std::io::{ErrorKind, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// File name of host-local's lock in the network's store directory.
pub const LOCK_FILE: &str = "lock";
/// Prefix of host-local's round-robin cursor files.
pub const LAST_RESERVED_PREFIX: &str = "last_reserved_ip.";
/// Separator between container id and ifname in a reservation file (host-local's `LineBreak`).
pub const LINE_BREAK: &str = "\r\n";

/// The store of one network, locked for as long as it lives.
pub struct Store {
    dir: PathBuf,
    _lock: contract::lock::FileLock,
}

/// One reservation file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub ip: IpAddr,
    pub container_id: String,
    pub ifname: String,
}

impl Store {
    /// Opens (creating) `<data_dir>/<network>` and takes its exclusive lock.
    pub fn open(data_dir: &Path, network: &str) -> Result<Self> {
        let dir = data_dir.join(network);
        fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("creating IPAM store {}", dir.display()), e))?;
        let lock = contract::lock::FileLock::acquire(&dir.join(LOCK_FILE))
            .map_err(|e| Error::io(format!("IPAM store: {e}"), e.source))?;
        Ok(Store { dir, _lock: lock })
    }

    /// Reserves `ip` for (id, ifname); false when it is already taken.
    fn reserve(&self, ip: IpAddr, id: &str, ifname: &str, range_set: usize) -> Result<bool> {
        let path = self.dir.join(ip.to_string());
        let mut f = match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(Error::io(format!("reserving {}", path.display()), e)),
        };
        let content = format!("{}{LINE_BREAK}{ifname}", id.trim());
        if let Err(e) = f.write_all(content.as_bytes()) {
            let _ = fs::remove_file(&path);
            return Err(Error::io(format!("writing {}", path.display()), e));
        }
        let last = self.dir.join(format!("{LAST_RESERVED_PREFIX}{range_set}"));
        fs::write(&last, ip.to_string())
            .map_err(|e| Error::io(format!("writing {}", last.display()), e))?;
        Ok(true)
    }

    fn last_reserved(&self, range_set: usize) -> Option<IpAddr> {
        fs::read_to_string(self.dir.join(format!("{LAST_RESERVED_PREFIX}{range_set}")))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Every reservation in the store (files named by an address).
    pub fn reservations(&self) -> Result<Vec<Reservation>> {
        let entries = fs::read_dir(&self.dir)
            .map_err(|e| Error::io(format!("reading IPAM store {}", self.dir.display()), e))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(ip) = name.to_str().and_then(|n| n.parse::<IpAddr>().ok()) else {
                continue;
            };
            let Ok(data) = fs::read_to_string(entry.path()) else {
                continue;
            };
            let data = data.trim();
            let (cid, ifname) = match data.split_once(LINE_BREAK) {
                Some((c, i)) => (c.to_string(), i.trim().to_string()),
                // Legacy host-local files hold only the container id.
                None => (data.to_string(), String::new()),
            };
            out.push(Reservation {
                ip,
                container_id: cid,
                ifname,
            });
        }
        out.sort_by_key(|r| r.ip);
        Ok(out)
    }

    pub(super) fn matches(r: &Reservation, id: &str, ifname: &str) -> bool {
        r.container_id == id.trim() && (r.ifname == ifname || r.ifname.is_empty())
    }

    /// Addresses held by (id, ifname).
    pub fn by_id(&self, id: &str, ifname: &str) -> Result<Vec<IpAddr>> {
        Ok(self
            .reservations()?
            .into_iter()
            .filter(|r| Self::matches(r, id, ifname))
            .map(|r| r.ip)
            .collect())
    }

    pub(super) fn remove(&self, ip: IpAddr) -> Result<()> {
        let path = self.dir.join(ip.to_string());
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io(format!("releasing {}", path.display()), e)),
        }
    }

    /// Releases everything (id, ifname) holds; an unknown id is fine.
    pub fn release_by_id(&self, id: &str, ifname: &str) -> Result<Vec<IpAddr>> {
        let ips = self.by_id(id, ifname)?;
        for ip in &ips {
            self.remove(*ip)?;
        }
        Ok(ips)
    }

    /// Allocates one address per range set for (id, ifname), honouring requested addresses.
    /// On any failure every address reserved by this call is released again.
    pub fn allocate(
        &self,
        sets: &[RangeSet],
        id: &str,
        ifname: &str,
        requested: &[IpAddr],
    ) -> Result<Vec<IpAddr>> {
        let held = self.by_id(id, ifname)?;
        for (i, set) in sets.iter().enumerate() {
            if let Some(ip) = held.iter().find(|ip| set.iter().any(|r| r.contains(**ip))) {
                return Err(Error::IpamDuplicate(format!(
                    "{ip} (range set {i}) has been allocated to {id}/{ifname}, duplicate allocation is not allowed"
                )));
            }
        }
        let mut got: Vec<Option<IpAddr>> = vec![None; sets.len()];
        let result = self.allocate_into(sets, id, ifname, requested, &mut got);
        if result.is_err() {
            for ip in got.iter().flatten() {
                let _ = self.remove(*ip);
            }
        }
        result?;
        Ok(got.into_iter().flatten().collect())
    }

    fn allocate_into(
        &self,
        sets: &[RangeSet],
        id: &str,
        ifname: &str,
        requested: &[IpAddr],
        got: &mut [Option<IpAddr>],
    ) -> Result<()> {
        for ip in requested {
            let Some((i, range)) = sets
                .iter()
                .enumerate()
                .find_map(|(i, s)| s.iter().find(|r| r.contains(*ip)).map(|r| (i, r)))
            else {
                return Err(Error::IpamRequest(format!(
                    "requested IP address {ip} is not in any range"
                )));
            };
            if got[i].is_some() {
                return Err(Error::IpamRequest(format!(
                    "requested IP address {ip}: range set {i} already has a requested address"
                )));
            }
            if *ip == range.gateway {
                return Err(Error::IpamRequest(format!(
                    "requested IP address {ip} is the subnet's gateway"
                )));
            }
            if !self.reserve(*ip, id, ifname, i)? {
                return Err(Error::IpamRequest(format!(
                    "requested IP address {ip} is not available in range set {}",
                    describe(&sets[i])
                )));
            }
            got[i] = Some(*ip);
        }
        for (i, set) in sets.iter().enumerate() {
            if got[i].is_some() {
                continue;
            }
            let last = self.last_reserved(i);
            let mut found = None;
            for (ip, range) in RangeIter::new(set, last) {
                if ip == range.gateway {
                    continue;
                }
                if self.reserve(ip, id, ifname, i)? {
                    found = Some(ip);
                    break;
                }
            }
            match found {
                Some(ip) => got[i] = Some(ip),
                None => {
                    return Err(Error::IpamExhausted(format!(
                        "no IP addresses available in range set {}",
                        describe(set)
                    )))
                }
            }
        }
        Ok(())
    }
}

fn describe(set: &RangeSet) -> String {
    set.iter()
        .map(|r| format!("{}-{}", r.start, r.end))
        .collect::<Vec<_>>()
        .join(",")
}

/// host-local's round-robin iterator over a range set: starts after the last reserved address
/// (when it is in the set, else at the first range's start), wraps, and ends where it began.
pub struct RangeIter<'a> {
    set: &'a [Range],
    pos: Option<(usize, IpAddr)>,
    begin: (usize, IpAddr),
}

impl<'a> RangeIter<'a> {
    pub fn new(set: &'a [Range], last: Option<IpAddr>) -> Self {
        let begin =
            match last.and_then(|ip| set.iter().position(|r| r.contains(ip)).map(|i| (i, ip))) {
                Some(pos) => Self::advance(set, pos),
                None => (0, set[0].start),
            };
        RangeIter {
            set,
            pos: Some(begin),
            begin,
        }
    }

    fn advance(set: &[Range], (i, ip): (usize, IpAddr)) -> (usize, IpAddr) {
        if ip < set[i].end {
            (i, next_ip(ip))
        } else {
            let j = (i + 1) % set.len();
            (j, set[j].start)
        }
    }
}

impl<'a> Iterator for RangeIter<'a> {
    type Item = (IpAddr, &'a Range);

    fn next(&mut self) -> Option<Self::Item> {
        let cur = self.pos?;
        let nxt = Self::advance(self.set, cur);
        self.pos = (nxt != self.begin).then_some(nxt);
        Some((cur.1, &self.set[cur.0]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Ipam, NetConf};
    use palisade_testkit::temp::temp_dir;
    use std::collections::HashSet;

    fn sets(ranges: &str) -> Vec<RangeSet> {
        let json = format!(
            r#"{{"cniVersion":"1.1.0","name":"n","ipam":{{"type":"palisade","ranges":{ranges}}}}}"#
        );
        match NetConf::parse(json.as_bytes()).unwrap().ipam {
            Ipam::Builtin(b) => b.range_sets,
            other => panic!("{other:?}"),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn allocates_round_robin_skipping_the_gateway_in_host_local_layout() {
        let d = temp_dir("palisade-ipam-rr-");
        let s = sets(r#"[[{"subnet":"10.9.0.0/29"}]]"#);
        let store = Store::open(d.path(), "net").unwrap();
        assert_eq!(
            store.allocate(&s, "c1", "eth0", &[]).unwrap(),
            vec![ip("10.9.0.2")]
        );
        assert_eq!(
            store.allocate(&s, "c2", "eth0", &[]).unwrap(),
            vec![ip("10.9.0.3")]
        );
        let dir = d.path().join("net");
        assert_eq!(
            fs::read_to_string(dir.join("10.9.0.2")).unwrap(),
            "c1\r\neth0"
        );
        assert_eq!(
            fs::read_to_string(dir.join("last_reserved_ip.0")).unwrap(),
            "10.9.0.3"
        );
        assert!(dir.join("lock").exists());
        // Releasing c1 does not move the cursor back: the next one is .4 (round robin).
        store.release_by_id("c1", "eth0").unwrap();
        assert_eq!(
            store.allocate(&s, "c3", "eth0", &[]).unwrap(),
            vec![ip("10.9.0.4")]
        );
    }

    #[test]
    fn exhausted_range_errors_and_reserves_nothing_more() {
        let d = temp_dir("palisade-ipam-ex-");
        let s = sets(r#"[[{"subnet":"10.9.0.0/30"}]]"#); // usable: .1 (gateway) and .2
        let store = Store::open(d.path(), "net").unwrap();
        store.allocate(&s, "c1", "eth0", &[]).unwrap();
        let err = store.allocate(&s, "c2", "eth0", &[]).unwrap_err();
        assert_eq!(err.code(), crate::error::code::IPAM_EXHAUSTED, "{err}");
        assert_eq!(store.reservations().unwrap().len(), 1);
    }

    #[test]
    fn dual_stack_rolls_back_the_first_family_when_the_second_fails() {
        let d = temp_dir("palisade-ipam-dual-");
        let s = sets(r#"[[{"subnet":"10.9.0.0/24"}],[{"subnet":"fd00::/126"}]]"#);
        let store = Store::open(d.path(), "net").unwrap();
        assert_eq!(
            store.allocate(&s, "c1", "eth0", &[]).unwrap(),
            vec![ip("10.9.0.2"), ip("fd00::2")]
        );
        assert_eq!(
            store.allocate(&s, "c2", "eth0", &[]).unwrap(),
            vec![ip("10.9.0.3"), ip("fd00::3")]
        );
        assert!(store.allocate(&s, "c3", "eth0", &[]).is_err());
        assert!(store.by_id("c3", "eth0").unwrap().is_empty());
    }

    #[test]
    fn duplicate_allocation_for_the_same_attachment_is_refused() {
        let d = temp_dir("palisade-ipam-dup-");
        let s = sets(r#"[[{"subnet":"10.9.0.0/24"}]]"#);
        let store = Store::open(d.path(), "net").unwrap();
        store.allocate(&s, "c1", "eth0", &[]).unwrap();
        assert_eq!(
            store.allocate(&s, "c1", "eth0", &[]).unwrap_err().code(),
            crate::error::code::IPAM_DUPLICATE
        );
        assert!(store.allocate(&s, "c1", "eth1", &[]).is_ok());
    }

    #[test]
    fn requested_ips_are_honoured_or_refused() {
        let d = temp_dir("palisade-ipam-req-");
        let s = sets(r#"[[{"subnet":"10.9.0.0/24"}]]"#);
        let store = Store::open(d.path(), "net").unwrap();
        assert_eq!(
            store
                .allocate(&s, "c1", "eth0", &[ip("10.9.0.77")])
                .unwrap(),
            vec![ip("10.9.0.77")]
        );
        let taken = store
            .allocate(&s, "c2", "eth0", &[ip("10.9.0.77")])
            .unwrap_err();
        assert!(taken.to_string().contains("10.9.0.77"), "{taken}");
        assert!(store.allocate(&s, "c2", "eth0", &[ip("10.8.0.1")]).is_err());
        assert!(store.allocate(&s, "c2", "eth0", &[ip("10.9.0.1")]).is_err());
        assert!(store.by_id("c2", "eth0").unwrap().is_empty());
    }

    #[test]
    fn iterator_wraps_across_ranges_and_stops_where_it_began() {
        let s = sets(
            r#"[[{"subnet":"10.9.0.0/24","rangeStart":"10.9.0.10","rangeEnd":"10.9.0.11"},{"subnet":"10.9.1.0/24","rangeStart":"10.9.1.5","rangeEnd":"10.9.1.5"}]]"#,
        );
        let all: Vec<String> = RangeIter::new(&s[0], Some(ip("10.9.0.11")))
            .map(|(i, _)| i.to_string())
            .collect();
        assert_eq!(all, ["10.9.1.5", "10.9.0.10", "10.9.0.11"]);
        let from_start: Vec<String> = RangeIter::new(&s[0], Some(ip("192.168.0.1")))
            .map(|(i, _)| i.to_string())
            .collect();
        assert_eq!(from_start, ["10.9.0.10", "10.9.0.11", "10.9.1.5"]);
    }

    #[test]
    fn store_survives_reopen_and_legacy_files_release_by_id() {
        let d = temp_dir("palisade-ipam-reopen-");
        let s = sets(r#"[[{"subnet":"10.9.0.0/24"}]]"#);
        {
            let store = Store::open(d.path(), "net").unwrap();
            store.allocate(&s, "c1", "eth0", &[]).unwrap();
        }
        fs::write(d.path().join("net").join("10.9.0.50"), "old\n").unwrap();
        let store = Store::open(d.path(), "net").unwrap();
        assert_eq!(
            store.allocate(&s, "c2", "eth0", &[]).unwrap(),
            vec![ip("10.9.0.3")]
        );
        assert_eq!(
            store.release_by_id("old", "eth0").unwrap(),
            vec![ip("10.9.0.50")]
        );
        assert!(store.release_by_id("nobody", "eth0").unwrap().is_empty());
    }

    #[test]
    fn concurrent_allocations_from_threads_get_distinct_addresses() {
        let d = temp_dir("palisade-ipam-conc-");
        let s = sets(r#"[[{"subnet":"10.9.0.0/24"}]]"#);
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let (dir, s) = (d.path().to_path_buf(), s.clone());
                std::thread::spawn(move || {
                    let store = Store::open(&dir, "net").unwrap();
                    store.allocate(&s, &format!("c{i}"), "eth0", &[]).unwrap()[0]
                })
            })
            .collect();
        let ips: HashSet<IpAddr> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(ips.len(), 16);
    }
}
