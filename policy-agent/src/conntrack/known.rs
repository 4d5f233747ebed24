//! The flows the last full sweep found involving local pods or pending addresses, so that a commit
//! that only moved some addresses in or out of address sets can re-judge the flows of those
//! addresses at once, without walking the kernel's whole conntrack table
//! ([`super::Revoker::sweep_targeted`]).
//!
//! Why that is enough for the flows it knows: an address-keyed set (`addr`, `addr . addr`,
//! `ifname . addr`) is only ever matched against a packet's own addresses, so moving an element with
//! address X in or out of one changes the verdict of no flow whose judged source and destination
//! (original source; reply source, i.e. after DNAT) are both other than X. Flows that started after the last full sweep are not known here: the agent
//! follows a targeted sweep with a full one, at most every [`super::YOUNG_FLOWS_GAP`].

use netlink_packet_netfilter::NetfilterProtoFamily;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Instant;

/// Most flows remembered; a dump that finds more forgets them all, and targeted sweeps fall back
/// to full ones until a dump finds fewer. A flow takes ~140 bytes here (its ~80-byte key and the
/// record's entry; a key as the crate's parsed attributes took ~620), so the whole record is
/// ~9 MB, less than half of what 32k flows took before; finding a scope's flows scans it (~0.4 ms
/// at 32k, measured).
pub const KNOWN_MAX: usize = 65_536;

/// One flow a full sweep judged and kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    pub family: NetfilterProtoFamily,
    /// Original tuple and zone, the attributes as the kernel sent them (read with
    /// [`super::Entry::new`]): what a conntrack GET needs. One allocation of ~60 bytes a flow,
    /// where the crate's parsed attributes took six.
    pub key: Box<[u8]>,
    /// What the rules judge it by: original source, reply source.
    pub src: IpAddr,
    pub dst: IpAddr,
}

/// The record of the last full sweep.
#[derive(Debug, Default)]
pub struct KnownFlows {
    /// `None`: no full sweep yet, or the last one found more than [`KNOWN_MAX`].
    flows: Option<Vec<Known>>,
    /// When the last full sweep started: flows younger than that are not in the record.
    swept_at: Option<Instant>,
}

/// A record being filled by one full sweep.
#[derive(Debug)]
pub struct Recording {
    flows: Vec<Known>,
    overflow: bool,
    started: Instant,
}

impl Recording {
    pub fn new(started: Instant) -> Self {
        Recording {
            flows: Vec::new(),
            overflow: false,
            started,
        }
    }

    /// Notes a flow the sweep kept (`known` makes it: not called once the record overflowed).
    pub fn keep(&mut self, known: impl FnOnce() -> Known) {
        if self.flows.len() >= KNOWN_MAX {
            self.overflow = true;
            self.flows = Vec::new();
        }
        if !self.overflow {
            self.flows.push(known());
        }
    }
}

impl KnownFlows {
    /// The full sweep that filled `rec` is done: its flows replace the record.
    pub fn replace(&mut self, rec: Recording) {
        self.flows = (!rec.overflow).then_some(rec.flows);
        self.swept_at = Some(rec.started);
    }

    /// The full sweep failed: what it would have replaced can no longer be trusted.
    pub fn forget(&mut self) {
        self.flows = None;
    }

    /// When the last full sweep started (`None`: never).
    pub fn swept_at(&self) -> Option<Instant> {
        self.swept_at
    }

    /// Indices of the known flows judged by an address in `scope` (`None`: nothing is known, a
    /// full sweep must do).
    pub fn concerned(&self, scope: &BTreeSet<IpAddr>) -> Option<Vec<usize>> {
        let flows = self.flows.as_ref()?;
        Some(
            flows
                .iter()
                .enumerate()
                .filter(|(_, k)| scope.contains(&k.src) || scope.contains(&k.dst))
                .map(|(i, _)| i)
                .collect(),
        )
    }

    pub fn get(&self, i: usize) -> Option<&Known> {
        self.flows.as_ref()?.get(i)
    }

    /// Drops the flows at `gone` (indices from [`KnownFlows::concerned`]): cut, or no longer there.
    pub fn drop_indices(&mut self, gone: &BTreeSet<usize>) {
        if let Some(flows) = self.flows.as_mut() {
            let mut i = 0;
            flows.retain(|_| {
                let keep = !gone.contains(&i);
                i += 1;
                keep
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(src: &str, dst: &str) -> Known {
        Known {
            family: NetfilterProtoFamily::IPv4,
            key: Box::default(),
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
        }
    }

    fn scope(ips: &[&str]) -> BTreeSet<IpAddr> {
        ips.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn nothing_is_known_before_a_full_sweep() {
        let k = KnownFlows::default();
        assert_eq!(k.concerned(&scope(&["10.0.0.1"])), None);
        assert_eq!(k.swept_at(), None);
    }

    #[test]
    fn a_targeted_sweep_concerns_the_flows_judged_by_an_address_of_its_scope() {
        let t = Instant::now();
        let mut rec = Recording::new(t);
        rec.keep(|| known("10.0.0.1", "10.0.1.5")); // by source
        rec.keep(|| known("10.0.2.7", "10.0.0.1")); // by destination
        rec.keep(|| known("10.0.2.7", "10.0.1.5")); // neither
        let mut k = KnownFlows::default();
        k.replace(rec);
        assert_eq!(k.swept_at(), Some(t));
        assert_eq!(k.concerned(&scope(&["10.0.0.1"])), Some(vec![0, 1]));
        assert_eq!(k.concerned(&scope(&["10.9.9.9"])), Some(vec![]));
        k.drop_indices(&[0].into());
        assert_eq!(k.concerned(&scope(&["10.0.0.1"])), Some(vec![0]));
        assert_eq!(k.get(0), Some(&known("10.0.2.7", "10.0.0.1")));
    }

    #[test]
    fn a_sweep_that_finds_too_many_flows_leaves_nothing_known() {
        let mut rec = Recording::new(Instant::now());
        for i in 0..=KNOWN_MAX {
            rec.keep(|| known("10.0.0.1", &format!("10.1.{}.{}", i / 256 % 256, i % 256)));
        }
        let mut k = KnownFlows::default();
        k.replace(rec);
        assert_eq!(k.concerned(&scope(&["10.0.0.1"])), None);
    }

    #[test]
    fn a_failed_full_sweep_forgets_the_record() {
        let mut rec = Recording::new(Instant::now());
        rec.keep(|| known("10.0.0.1", "10.0.1.5"));
        let mut k = KnownFlows::default();
        k.replace(rec);
        k.forget();
        assert_eq!(k.concerned(&scope(&["10.0.0.1"])), None);
    }
}
