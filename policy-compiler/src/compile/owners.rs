//! [`AddressOwners`]: which subject pods claim each address, for the incremental compiler's
//! element patches.
//!
//! Why not `HashMap<IpAddr, Vec<String>>`: an `IpAddr` key pads every entry to 48 bytes, and each
//! address paid two allocations (the vector and a copy of the pod's key) for the one owner it nearly
//! always has: at 100k pods that map was ~17 MB of the agent's heap. Here the families have maps of
//! their own (a 4-byte key for IPv4), a single owner is held inline, and the owner is the pod's
//! shared [`PodKey`].

use crate::model::PodKey;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The keys of the subjects claiming one address, sorted, each once; never empty.
#[derive(Debug, Clone)]
enum Owners {
    One(PodKey),
    Many(Box<[PodKey]>),
}

impl Owners {
    fn as_slice(&self) -> &[PodKey] {
        match self {
            Self::One(k) => std::slice::from_ref(k),
            Self::Many(ks) => ks,
        }
    }
}

/// Adds `key` to `map[addr]`, keeping the owners sorted.
fn insert<A: Hash + Eq>(map: &mut HashMap<A, Owners>, addr: A, key: &PodKey) {
    let Some(held) = map.get_mut(&addr) else {
        map.insert(addr, Owners::One(PodKey::clone(key)));
        return;
    };
    let ks = held.as_slice();
    if let Err(at) = ks.binary_search(key) {
        let mut v = Vec::with_capacity(ks.len() + 1);
        v.extend_from_slice(&ks[..at]);
        v.push(PodKey::clone(key));
        v.extend_from_slice(&ks[at..]);
        *held = Owners::Many(v.into_boxed_slice());
    }
}

/// Removes `key` from `map[addr]`, and the address when it has no owner left.
fn remove<A: Hash + Eq>(map: &mut HashMap<A, Owners>, addr: &A, key: &str) {
    let Some(held) = map.get_mut(addr) else {
        return;
    };
    let rest: Vec<PodKey> = held
        .as_slice()
        .iter()
        .filter(|k| &***k != key)
        .cloned()
        .collect();
    match rest.len() {
        0 => {
            map.remove(addr);
        }
        1 => *held = Owners::One(PodKey::clone(&rest[0])),
        _ => *held = Owners::Many(rest.into_boxed_slice()),
    }
}

/// The subjects claiming each address.
#[derive(Debug, Clone, Default)]
pub(crate) struct AddressOwners {
    v4: HashMap<Ipv4Addr, Owners>,
    v6: HashMap<Ipv6Addr, Owners>,
}

impl AddressOwners {
    /// `key` claims `ip` (again: no change).
    pub fn insert(&mut self, ip: IpAddr, key: &PodKey) {
        match ip {
            IpAddr::V4(a) => insert(&mut self.v4, a, key),
            IpAddr::V6(a) => insert(&mut self.v6, a, key),
        }
    }

    /// `key` no longer claims `ip`.
    pub fn remove(&mut self, ip: &IpAddr, key: &str) {
        match ip {
            IpAddr::V4(a) => remove(&mut self.v4, a, key),
            IpAddr::V6(a) => remove(&mut self.v6, a, key),
        }
    }

    /// Keys of the subjects claiming `ip`, sorted.
    pub fn get(&self, ip: &IpAddr) -> &[PodKey] {
        let owners = match ip {
            IpAddr::V4(a) => self.v4.get(a),
            IpAddr::V6(a) => self.v6.get(a),
        };
        owners.map_or(&[], Owners::as_slice)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(o: &AddressOwners, ip: &str) -> Vec<String> {
        let ip: IpAddr = ip.parse().unwrap();
        o.get(&ip).iter().map(|k| k.to_string()).collect()
    }

    #[test]
    fn owners_of_an_address_stay_sorted_and_unique_and_the_last_removal_drops_it() {
        let mut o = AddressOwners::default();
        let (a, b, c): (PodKey, PodKey, PodKey) = ("ns/a".into(), "ns/b".into(), "ns/c".into());
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let v6: IpAddr = "fd00::1".parse().unwrap();
        o.insert(v4, &c);
        o.insert(v4, &a);
        o.insert(v4, &b);
        o.insert(v4, &a);
        o.insert(v6, &b);
        assert_eq!(keys(&o, "10.0.0.1"), ["ns/a", "ns/b", "ns/c"]);
        assert_eq!(keys(&o, "fd00::1"), ["ns/b"]);
        assert!(keys(&o, "10.0.0.2").is_empty());
        o.remove(&v4, "ns/b");
        assert_eq!(keys(&o, "10.0.0.1"), ["ns/a", "ns/c"]);
        o.remove(&v4, "ns/a");
        o.remove(&v4, "ns/x");
        assert_eq!(keys(&o, "10.0.0.1"), ["ns/c"]);
        o.remove(&v4, "ns/c");
        o.remove(&v6, "ns/b");
        assert!(o.v4.is_empty() && o.v6.is_empty());
    }

    #[test]
    fn an_owner_is_the_pods_shared_key_not_a_copy() {
        let mut o = AddressOwners::default();
        let a: PodKey = "ns/a".into();
        o.insert("10.0.0.1".parse().unwrap(), &a);
        assert_eq!(PodKey::strong_count(&a), 2);
    }
}
