//! The conntrack edge: cuts established flows the current ruleset would no longer admit as new.
//!
//! Our base chains accept `ct state established,related` first, so a flow admitted once would live
//! on after a policy revoked it, or after our table was restored (flows opened while it was gone).
//! After such commits the engine calls [`Revoker::sweep`]: it dumps this network namespace's
//! conntrack table (IPv4 and IPv6) over nfnetlink, judges every entry that involves a local pod or
//! pending address with [`palisade_policy::compile::admit`] as our postrouting hook saw its first
//! packet (source = original source; destination, port = reply source, i.e. after DNAT), and deletes
//! the entries that would not be admitted now (by original tuple, zone and id), so the next packet
//! of such a flow meets the rules. Entries it cannot judge are left alone and counted.
//!
//! "From this node" (`fib saddr type local`) is answered from this namespace's own addresses, read
//! over rtnetlink and cached for [`ADDRS_MAX_AGE`].
//!
//! A dump walks the kernel's whole conntrack hash table (~10 ms at 256k buckets, whatever it holds).
//! A commit that only moved addresses in or out of address sets (peer pods coming, going, changing
//! labels) can only change the verdict of flows judged by those addresses: the flows the last dump
//! kept (`known`) are looked up one by one and judged at once ([`Revoker::sweep_targeted`]); the
//! flows younger than that dump wait for the next full sweep, which under such churn runs at most
//! every [`YOUNG_FLOWS_GAP`].
//!
//! Rooms: `seen` (what the hook saw of an entry, pure), `link` (the conntrack socket and its
//! requests), `entry` (an entry's attributes read in place), `known` (the flows a full sweep
//! kept), `report` (what a sweep did, logged and counted); the sweeps themselves here.

mod entry;
#[cfg(test)]
mod fixtures;
mod known;
mod link;
mod report;
mod seen;

use crate::error::{Error, Result};
pub use entry::Entry;
use entry::{CTA_ID, CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_ZONE};
use futures::TryStreamExt;
use known::{Known, KnownFlows, Recording};
use link::{nl, EntryKey, Link};
use netlink_packet_netfilter::conntrack::ConntrackAttribute;
use netlink_packet_netfilter::NetfilterProtoFamily;
use palisade_policy::compile::admit::{Admitter, Flow};
use palisade_policy::compile::Compiled;
pub use report::{log_report, Cut, SweepKind, SweepReport};
use rtnetlink::packet_route::address::AddressAttribute;
pub use seen::{seen, Seen, Unjudged};
use std::collections::{BTreeSet, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

/// How long the node's own addresses are trusted before they are listed again.
pub const ADDRS_MAX_AGE: Duration = Duration::from_secs(5);

/// After a targeted sweep, the full sweep that catches flows younger than the last one runs at
/// most this long after that last one started: under churn of peer pods, one walk of the conntrack
/// table per this much time, not one per commit. Flows the last full sweep saw are judged at once.
pub const YOUNG_FLOWS_GAP: Duration = Duration::from_millis(250);

/// What names an entry for deletion: original tuple, zone, id.
fn delete_key(e: &Entry<'_>) -> Option<EntryKey> {
    EntryKey::of(e.attributes(&[CTA_TUPLE_ORIG, CTA_ZONE, CTA_ID]))
}

/// The original tuple (and zone) of an entry the flow's reply direction would create: the entry's
/// reply tuple.
fn comeback_key(e: &Entry<'_>) -> Option<EntryKey> {
    EntryKey::of(
        e.attributes(&[CTA_TUPLE_REPLY, CTA_ZONE])
            .into_iter()
            .map(|a| match a {
                ConntrackAttribute::CtaTupleReply(t) => ConntrackAttribute::CtaTupleOrig(t),
                other => other,
            })
            .collect(),
    )
}

/// What a GET of a kept flow names it by (its original tuple and zone as the kernel sent them).
fn known_key(k: &Known) -> Option<EntryKey> {
    EntryKey::of(Entry::new(k.family, &k.key).attributes(&[CTA_TUPLE_ORIG, CTA_ZONE]))
}

/// This namespace's own addresses (`fib saddr type local`), cached.
struct NodeAddrs {
    handle: rtnetlink::Handle,
    rt: tokio::runtime::Handle,
    addrs: HashSet<IpAddr>,
    listed: Option<Instant>,
}

impl NodeAddrs {
    fn refresh(&mut self) -> Result<()> {
        if self.listed.is_some_and(|t| t.elapsed() < ADDRS_MAX_AGE) {
            return Ok(());
        }
        let handle = self.handle.clone();
        let msgs: Vec<_> = self
            .rt
            .block_on(async move { handle.address().get().execute().try_collect().await })
            .map_err(|e| Error::Netlink {
                action: "list this node's addresses",
                message: e.to_string(),
            })?;
        self.addrs = msgs
            .iter()
            .flat_map(|m| m.attributes.iter())
            .filter_map(|a| match a {
                AddressAttribute::Address(ip) | AddressAttribute::Local(ip) => Some(*ip),
                _ => None,
            })
            .collect();
        self.listed = Some(Instant::now());
        Ok(())
    }

    fn is_local(&self, ip: IpAddr) -> bool {
        ip.is_loopback() || self.addrs.contains(&ip)
    }
}

/// Cuts established flows that lost their permission. Lives on the reconcile thread.
pub struct Revoker {
    /// The conntrack socket and what requests on it need; a field of its own, so a dump's
    /// per-entry closure can read `addrs` meanwhile.
    link: Link,
    addrs: NodeAddrs,
    /// Flows cut recently, watched for a comeback in the other direction (see [`Revoker::recheck`]).
    watched: Vec<Watched>,
    next_recheck: Option<Instant>,
    /// The flows the last full sweep kept.
    known: KnownFlows,
}

/// An entry judged denied: its family, delete key, comeback key and why.
type Doomed = (NetfilterProtoFamily, EntryKey, EntryKey, Cut);

/// An entry judged denied, to be cut: `None` (and counted unjudged) when it cannot be named.
fn doom(e: &Entry<'_>, cut: Cut) -> Option<Doomed> {
    Some((e.family, delete_key(e)?, comeback_key(e)?, cut))
}

/// What one entry comes to.
enum Judged {
    /// Not ours to judge (no local pod or pending address), closed, or always admitted.
    Skip,
    Unjudged,
    Admitted(Flow),
    Denied(Cut),
}

/// Judges one entry as our postrouting hook saw its first packet, by `adm`.
fn judge(addrs: &NodeAddrs, adm: &Admitter<'_>, e: &Entry<'_>) -> Judged {
    let mut flow = match seen(e) {
        Ok(Seen::Judge(f)) => f,
        Ok(Seen::AlwaysAdmitted | Seen::Closed) => return Judged::Skip,
        Err(_) => return Judged::Unjudged,
    };
    if !adm.concerns(flow.src) && !adm.concerns(flow.dst) {
        return Judged::Skip;
    }
    flow.from_this_node = addrs.is_local(flow.src);
    let why = adm.admit(&flow);
    if why.admitted() {
        Judged::Admitted(flow)
    } else {
        Judged::Denied(Cut { flow, why })
    }
}

/// What a GET needs to find an entry again: original tuple and zone, as the kernel sent them.
fn lookup_key(e: &Entry<'_>) -> Box<[u8]> {
    e.copy_of(&[CTA_TUPLE_ORIG, CTA_ZONE])
}

/// A cut flow whose reply direction may pick it up again: a packet of the peer that answers (a TCP
/// retransmission, a late UDP answer) finds no entry and is tracked as a new flow from the peer,
/// which the rules may admit (the peer may open connections to the client); the client's packets
/// then pass as its replies. [`Revoker::recheck`] cuts such entries again while the flow is denied.
struct Watched {
    since: Instant,
    /// When this flow is looked up next.
    next: Instant,
    until: Instant,
    family: NetfilterProtoFamily,
    /// The cut entry's reply tuple (and zone): the original tuple of such a comeback.
    key: EntryKey,
    flow: Flow,
}

/// How long a cut flow is watched for a comeback in its reply direction: covers TCP's first ~9
/// retransmissions (200 ms doubling) and late UDP answers.
pub const WATCH_FOR: Duration = Duration::from_secs(60);
/// Interval of the comeback checks of a flow just cut (one conntrack GET per watched flow); it grows
/// with the time since the cut (an eighth of it, at most [`RECHECK_MAX`]), as TCP's retransmissions
/// do.
pub const RECHECK_EVERY: Duration = Duration::from_millis(20);
pub const RECHECK_MAX: Duration = Duration::from_secs(1);
/// At most this many cut flows are watched (the oldest are dropped first).
pub const WATCH_MAX: usize = 4096;

/// How many entries a full sweep judges between two questions whether to give way.
pub const GIVE_WAY_EVERY: u64 = 256;

impl Revoker {
    /// Opens an nfnetlink socket and an rtnetlink connection (run on `rt`) in the calling thread's
    /// network namespace.
    pub fn new(rt: &tokio::runtime::Handle) -> Result<Self> {
        let (conn, handle, _) = {
            let _guard = rt.enter();
            rtnetlink::new_connection().map_err(nl("open address socket"))?
        };
        rt.spawn(conn);
        Ok(Revoker {
            link: Link::open()?,
            addrs: NodeAddrs {
                handle,
                rt: rt.clone(),
                addrs: HashSet::new(),
                listed: None,
            },
            watched: Vec::new(),
            next_recheck: None,
            known: KnownFlows::default(),
        })
    }

    /// How long after `now` the full sweep that follows a targeted one may run: at once when the
    /// last full sweep started [`YOUNG_FLOWS_GAP`] ago or more.
    pub fn young_flows_wait(&self, now: Instant) -> Duration {
        self.known.swept_at().map_or(Duration::ZERO, |t| {
            (t + YOUNG_FLOWS_GAP).saturating_duration_since(now)
        })
    }

    /// When [`Revoker::recheck`] is due (`None`: no cut flow is watched).
    pub fn recheck_due(&self) -> Option<Instant> {
        self.next_recheck
    }

    /// Cuts watched flows that came back in their reply direction while still denied by `model`.
    pub fn recheck(&mut self, model: &Compiled) -> Result<SweepReport> {
        let start = Instant::now();
        let mut report = SweepReport {
            kind: SweepKind::Recheck,
            ..SweepReport::default()
        };
        self.watched.retain(|w| w.until > start);
        let watched = std::mem::take(&mut self.watched);
        let mut adm: Option<Admitter<'_>> = None;
        let mut watched = watched;
        for w in &mut watched {
            if w.next > start {
                continue;
            }
            w.next = start + ((start - w.since) / 8).clamp(RECHECK_EVERY, RECHECK_MAX);
            let Some((family, found)) = self.link.get(w.family, w.key.clone())? else {
                continue;
            };
            report.scanned += 1;
            let adm = adm.get_or_insert_with(|| Admitter::new(model));
            let mut flow = w.flow;
            flow.from_this_node = self.addrs.is_local(flow.src);
            let why = adm.admit(&flow);
            if why.admitted() {
                continue; // allowed again: the comeback is legitimate
            }
            report.judged += 1;
            let Some(key) = delete_key(&Entry::new(family, &found)) else {
                report.unjudged += 1;
                continue;
            };
            match self.link.delete(w.family, key) {
                Ok(true) => report.cut.push(Cut { flow, why }),
                Ok(false) => report.gone += 1,
                Err(e) => {
                    tracing::warn!(error = %e, flow = ?flow, "cannot delete the comeback of a revoked flow; checking again");
                    report.unjudged += 1;
                }
            }
        }
        self.watched = watched;
        self.next_recheck = self.watched.iter().map(|w| w.next).min();
        report.took = start.elapsed();
        Ok(report)
    }

    /// Judges every conntrack entry of this namespace against `model` and deletes those of flows the
    /// ruleset built from it would not admit as new. Entries involving no local pod or pending
    /// address are skipped after the parse (the ruleset cannot drop them). The flows it keeps are
    /// remembered for [`Revoker::sweep_targeted`].
    ///
    /// `give_way` is asked every [`GIVE_WAY_EVERY`] entries (from the first); once it says yes,
    /// the rest of the dump is left unread and the report says `yielded`: what was
    /// found doomed until then is cut, nothing is remembered (a partial view), and the caller owes
    /// a sweep. A change waiting to be committed must not wait for a whole table's judgement
    /// (~30 µs an entry in a debug build, tens of thousands of entries on a busy node).
    pub fn sweep(
        &mut self,
        model: &Compiled,
        give_way: &mut dyn FnMut() -> bool,
    ) -> Result<SweepReport> {
        let start = Instant::now();
        let mut report = SweepReport::default();
        if model.pods.is_empty() && model.pending.is_empty() {
            self.known.replace(Recording::new(start));
            return Ok(report);
        }
        self.addrs.refresh()?;
        let adm = Admitter::new(model);
        let mut to_cut: Vec<Doomed> = Vec::new();
        let mut rec = Recording::new(start);
        // One dump of both families (family unspecified): the kernel walks its whole conntrack hash
        // table (all namespaces' buckets) per dump, ~10 ms at 256k buckets, whatever we keep.
        let dumped = {
            let addrs = &self.addrs;
            let (scanned, judged, unjudged) = (
                &mut report.scanned,
                &mut report.judged,
                &mut report.unjudged,
            );
            let yielded = &mut report.yielded;
            let mut each = |e: &Entry<'_>| {
                if *scanned % GIVE_WAY_EVERY == 0 && give_way() {
                    *yielded = true;
                    return false;
                }
                *scanned += 1;
                match judge(addrs, &adm, e) {
                    Judged::Skip => {}
                    Judged::Unjudged => *unjudged += 1,
                    Judged::Admitted(flow) => {
                        *judged += 1;
                        rec.keep(|| Known {
                            family: e.family,
                            key: lookup_key(e),
                            src: flow.src,
                            dst: flow.dst,
                        });
                    }
                    Judged::Denied(cut) => match doom(e, cut) {
                        Some(d) => {
                            *judged += 1;
                            to_cut.push(d);
                        }
                        None => *unjudged += 1,
                    },
                }
                true
            };
            self.link.dump(NetfilterProtoFamily::Unspec, &mut each)
        };
        let abandoned = match dumped {
            Ok(a) => a,
            Err(e) => {
                self.known.forget();
                return Err(e);
            }
        };
        match abandoned {
            // Gave way: a partial view is not remembered.
            Some(seq) => {
                self.known.forget();
                self.link.abandon(seq)?;
            }
            None => self.known.replace(rec),
        }
        self.cut(to_cut, &mut report);
        report.took = start.elapsed();
        Ok(report)
    }

    /// Judges against `model` only the flows the last full sweep kept whose source or destination is
    /// in `scope` (the addresses a commit moved in or out of address sets), each looked up again
    /// first, and deletes those it would not admit as new. `Ok(None)`: nothing is known (no full
    /// sweep yet, or it found too many flows); a full sweep must do.
    pub fn sweep_targeted(
        &mut self,
        model: &Compiled,
        scope: &BTreeSet<IpAddr>,
    ) -> Result<Option<SweepReport>> {
        let start = Instant::now();
        let Some(concerned) = self.known.concerned(scope) else {
            return Ok(None);
        };
        let mut report = SweepReport {
            kind: SweepKind::Targeted,
            ..SweepReport::default()
        };
        if concerned.is_empty() {
            report.took = start.elapsed();
            return Ok(Some(report));
        }
        self.addrs.refresh()?;
        let adm = Admitter::new(model);
        let mut to_cut: Vec<Doomed> = Vec::new();
        let mut done: BTreeSet<usize> = BTreeSet::new();
        for i in concerned {
            let Some(k) = self.known.get(i) else {
                continue;
            };
            let family = k.family;
            let Some(key) = known_key(k) else {
                done.insert(i); // cannot be named: a full sweep judges it
                continue;
            };
            let Some((family, attrs)) = self.link.get(family, key)? else {
                done.insert(i); // closed and gone since the dump
                continue;
            };
            report.scanned += 1;
            let e = Entry::new(family, &attrs);
            match judge(&self.addrs, &adm, &e) {
                Judged::Skip => {
                    done.insert(i); // closed since, or another flow on the same tuple
                }
                Judged::Unjudged => report.unjudged += 1,
                Judged::Admitted(_) => report.judged += 1,
                Judged::Denied(cut) => match doom(&e, cut) {
                    Some(d) => {
                        report.judged += 1;
                        done.insert(i);
                        to_cut.push(d);
                    }
                    None => report.unjudged += 1,
                },
            }
        }
        self.known.drop_indices(&done);
        self.cut(to_cut, &mut report);
        report.took = start.elapsed();
        Ok(Some(report))
    }

    /// Deletes every entry whose original or reply tuple holds one of `released` (addresses whose
    /// pod went away or changed): a flow belongs to the pod that held the address when it was
    /// admitted, never to the next pod given that address. Policies play no part (this holds with
    /// `--keep-established-flows` too). Returns how many entries were deleted.
    pub fn flush_addresses(&mut self, released: &BTreeSet<IpAddr>) -> Result<u64> {
        if released.is_empty() {
            return Ok(0);
        }
        let mut doomed: Vec<(NetfilterProtoFamily, EntryKey)> = Vec::new();
        let mut unnamed = 0u64;
        let mut each = |e: &Entry<'_>| {
            let (o, r) = (e.orig(), e.reply());
            let involved = [o.src, o.dst, r.src, r.dst]
                .into_iter()
                .flatten()
                .any(|ip| released.contains(&ip));
            if involved {
                match delete_key(e) {
                    Some(key) => doomed.push((e.family, key)),
                    None => unnamed += 1,
                }
            }
            true
        };
        // `each` never declines: the dump is read to its end.
        self.link.dump(NetfilterProtoFamily::Unspec, &mut each)?;
        if unnamed > 0 {
            tracing::warn!(entries = unnamed, "conntrack entries of released addresses whose tuple cannot be read were left alone; they end with their timeouts");
        }
        let mut deleted = 0;
        for (family, key) in doomed {
            if self.link.delete(family, key)? {
                deleted += 1;
            }
        }
        Ok(deleted)
    }

    /// Deletes the doomed entries and watches each for a comeback in its reply direction.
    fn cut(&mut self, doomed: Vec<Doomed>, report: &mut SweepReport) {
        for (family, key, watch, cut) in doomed {
            match self.link.delete(family, key) {
                Ok(true) => {
                    if self.watched.len() >= WATCH_MAX {
                        self.watched.remove(0);
                    }
                    let now = Instant::now();
                    self.watched.push(Watched {
                        since: now,
                        next: now + RECHECK_EVERY,
                        until: now + WATCH_FOR,
                        family,
                        key: watch,
                        flow: cut.flow,
                    });
                    let next = now + RECHECK_EVERY;
                    self.next_recheck = Some(self.next_recheck.map_or(next, |n| n.min(next)));
                    report.cut.push(cut);
                }
                Ok(false) => report.gone += 1,
                Err(e) => {
                    tracing::warn!(error = %e, flow = ?cut.flow, "cannot delete the conntrack entry of a revoked flow; it lives on until its next change");
                    report.unjudged += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::{emitted, entry, ip, seen_of, tuple};
    use super::*;
    use netlink_packet_core::{DefaultNla, Nla, NlasIterator, Parseable};
    use netlink_packet_netfilter::conntrack::Protocol as CtProto;
    use palisade_policy::compile::admit::Admission;

    /// Node n1 (192.168.0.1) with a/web (10.0.1.1, ingress denied to all) and a/cli (10.0.1.2).
    fn deny_web() -> Compiled {
        use palisade_policy::model::{
            policy_from_k8s, Change, ClusterState, Labels, Namespace, Node, Pod, PodPhase,
        };
        let mut st = ClusterState::default();
        st.apply(Change::UpsertNode(Node {
            name: "n1".into(),
            pod_cidrs: vec![],
            internal_ips: vec![ip("192.168.0.1")],
            ..Node::default()
        }));
        st.apply(Change::UpsertNamespace(Namespace::new(
            "a",
            Labels::default(),
        )));
        for (name, addr) in [("web", "10.0.1.1"), ("cli", "10.0.1.2")] {
            st.apply(Change::UpsertPod(
                Pod {
                    namespace: "a".into(),
                    name: name.into(),
                    uid: name.into(),
                    labels: [("app".to_string(), name.to_string())]
                        .into_iter()
                        .collect(),
                    node_name: Some("n1".into()),
                    ips: vec![ip(addr)].into(),
                    ports: vec![].into(),
                    host_network: false,
                    phase: PodPhase::Running,
                }
                .into(),
            ));
        }
        let np = serde_json::from_value(serde_json::json!({
            "metadata": {"namespace": "a", "name": "deny-web"},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"]}
        }))
        .unwrap();
        st.apply(Change::UpsertPolicy(policy_from_k8s(&np).unwrap()));
        palisade_policy::compile(&st, "n1")
    }

    /// A revoker in the calling thread's namespace, and the runtime its rtnetlink half runs on.
    fn revoker() -> (tokio::runtime::Runtime, Revoker) {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let r = Revoker::new(rt.handle()).unwrap();
        (rt, r)
    }

    /// Moves the test's thread into a namespace of its own where a/web (10.0.1.1) and a/cli
    /// (10.0.1.2) are addresses on `lo` and conntrack tracks every flow.
    fn enter_netns_of_web_and_cli() {
        palisade_testkit::netns::enter_private_netns();
        for args in [
            &["link", "set", "lo", "up"][..],
            &["addr", "add", "10.0.1.1/32", "dev", "lo"],
            &["addr", "add", "10.0.1.2/32", "dev", "lo"],
        ] {
            let out = std::process::Command::new("ip")
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        }
        // Conntrack tracks this namespace once a rule asks for it.
        palisade_testkit::nft::load_here(
            "table inet t {\n chain c {\n type filter hook output priority 0;\n ct state new accept\n }\n}\n",
        );
    }

    /// A full sweep asked to give way stops judging where it was asked (every
    /// [`GIVE_WAY_EVERY`] entries), remembers nothing of its partial view (a targeted sweep then
    /// cannot stand in for a full one), and the next sweep judges the whole table. Real conntrack
    /// entries in a namespace of the test's own: UDP flows from a/cli to a/web, both addresses on
    /// `lo`.
    #[test]
    fn a_sweep_that_gives_way_stops_judging_and_remembers_nothing() {
        enter_netns_of_web_and_cli();
        const FLOWS: u64 = 3 * GIVE_WAY_EVERY;
        let _server = std::net::UdpSocket::bind("10.0.1.1:80").unwrap();
        // Each its own source port: the sockets stay open until the sweeps are done.
        let _clients: Vec<std::net::UdpSocket> = (0..FLOWS)
            .map(|_| {
                let s = std::net::UdpSocket::bind("10.0.1.2:0").unwrap();
                s.send_to(b"x", "10.0.1.1:80").unwrap();
                s
            })
            .collect();
        let (_rt, mut r) = revoker();
        let model = deny_web();
        let web: BTreeSet<IpAddr> = [ip("10.0.1.1")].into();

        let mut asked = 0;
        let gave_way = r
            .sweep(&model, &mut || {
                asked += 1;
                asked == 2
            })
            .unwrap();
        assert!(gave_way.yielded, "{gave_way:?}");
        assert_eq!(
            asked, 2,
            "asked at the first entry and then after {GIVE_WAY_EVERY}"
        );
        assert_eq!(
            gave_way.scanned, GIVE_WAY_EVERY,
            "judged on after giving way"
        );
        assert!(
            r.sweep_targeted(&model, &web).unwrap().is_none(),
            "a partial view stands in for a full sweep"
        );

        let whole = r.sweep(&model, &mut || false).unwrap();
        assert!(!whole.yielded);
        assert!(whole.scanned >= FLOWS, "{whole:?}");
        assert!(whole.judged >= FLOWS, "{whole:?}");
        assert!(
            r.sweep_targeted(&model, &web).unwrap().is_some(),
            "a whole sweep is remembered"
        );
    }

    /// What a sweep remembers a kept flow by is read back into the very attributes a GET must
    /// name: the original tuple and the zone, nothing else.
    #[test]
    fn a_kept_flows_key_reads_back_as_its_original_tuple_and_zone() {
        let orig = tuple("10.0.1.2", "10.96.0.10", CtProto::Tcp, Some((40000, 80)));
        let e = entry(
            orig.clone(),
            tuple("10.0.1.1", "10.0.1.2", CtProto::Tcp, Some((8080, 40000))),
        );
        let bytes = emitted(&e);
        let key = lookup_key(&Entry::new(NetfilterProtoFamily::IPv4, &bytes));
        assert_eq!(
            Entry::new(NetfilterProtoFamily::IPv4, &key).attributes(&[CTA_TUPLE_ORIG, CTA_ZONE]),
            vec![
                ConntrackAttribute::CtaTupleOrig(orig),
                ConntrackAttribute::Other(DefaultNla::new(CTA_ZONE, vec![0, 3])),
            ]
        );
    }

    /// Benchmark (not in CI: `cargo test --release -p palisade-agent --lib -- --ignored
    /// --nocapture what_a_full_sweep_spends`): what a full sweep of 20k and 50k conntrack entries
    /// spends beside the dump alone, same run, interleaved: the dump's messages unread (the
    /// kernel's walk and the reads: the floor), each entry read in place as a sweep reads it, each
    /// entry's attributes parsed by netlink-packet-netfilter (what a sweep did before [`Entry`]),
    /// and the whole sweep (every entry judged admitted and remembered). Real entries in a namespace of
    /// the test's own: UDP flows from a/web to a/cli, one per destination port.
    #[test]
    #[ignore]
    fn what_a_full_sweep_spends() {
        // Both under what a sweep remembers (`known::KNOWN_MAX`): every flow's key is kept.
        const SIZES: [u16; 2] = [20_000, 50_000];
        const ROUNDS: usize = 7;
        enter_netns_of_web_and_cli();
        let web = std::net::UdpSocket::bind("10.0.1.1:0").unwrap();
        let (_rt, mut r) = revoker();
        let model = deny_web();
        let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
        let mut sent = 0;
        for flows in SIZES {
            // The flows' entries live 30 s unanswered: the rounds take a few.
            for port in sent + 1..=flows {
                web.send_to(b"x", ("10.0.1.2", port)).unwrap();
            }
            sent = flows;
            let (mut raw, mut in_place, mut crate_parse, mut swept) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for _ in 0..ROUNDS {
                let t = Instant::now();
                r.link.dump_unread(NetfilterProtoFamily::Unspec).unwrap();
                raw.push(ms(t));

                // What a sweep reads of each entry, in place.
                let t = Instant::now();
                let mut entries = 0u64;
                r.link
                    .dump(NetfilterProtoFamily::Unspec, &mut |e| {
                        entries += 1;
                        std::hint::black_box(seen(e)).is_ok()
                    })
                    .unwrap();
                in_place.push(ms(t));
                assert!(entries >= u64::from(flows), "{entries} entries");

                // What a sweep read before: every attribute parsed by the crate.
                let t = Instant::now();
                let mut parsed = 0u64;
                r.link
                    .dump(NetfilterProtoFamily::Unspec, &mut |e| {
                        let attrs: Vec<ConntrackAttribute> = NlasIterator::new(e.bytes())
                            .map_while(|n| n.ok())
                            .filter_map(|n| ConntrackAttribute::parse(&n).ok())
                            .collect();
                        parsed += u64::from(!std::hint::black_box(attrs).is_empty());
                        true
                    })
                    .unwrap();
                crate_parse.push(ms(t));
                assert!(parsed >= u64::from(flows), "{parsed} entries parsed");

                let t = Instant::now();
                let report = r.sweep(&model, &mut || false).unwrap();
                swept.push(ms(t));
                assert!(report.judged >= u64::from(flows), "{report:?}");
                assert!(report.cut.is_empty(), "{report:?}");
            }
            let med = |v: &mut Vec<f64>| {
                v.sort_by(f64::total_cmp);
                v[v.len() / 2]
            };
            let (r0, i0, c0, s0) = (
                med(&mut raw),
                med(&mut in_place),
                med(&mut crate_parse),
                med(&mut swept),
            );
            let per = |m: f64| m * 1e3 / f64::from(flows);
            eprintln!("{flows} flows, median of {ROUNDS} rounds, ms (us an entry):");
            eprintln!("  dump unread           {r0:7.1} ({:.2})", per(r0));
            eprintln!(
                "  read in place         {i0:7.1} ({:.2})  reading: {:.2} us",
                per(i0),
                per(i0 - r0)
            );
            eprintln!(
                "  parsed by the crate   {c0:7.1} ({:.2})  parsing: {:.2} us",
                per(c0),
                per(c0 - r0)
            );
            eprintln!(
                "  full sweep            {s0:7.1} ({:.2})  x{:.2} of the dump unread",
                per(s0),
                s0 / r0
            );
        }
    }

    /// Benchmark (not in CI: `cargo test --release -p palisade-agent --lib -- --ignored
    /// --nocapture what_a_kept_flows_key_costs`): the memory of what a sweep remembers a kept
    /// flow by, 30k real entries, as the crate's parsed attributes (before) and as the raw
    /// attributes (now): the growth of the process's resident memory per key.
    #[test]
    #[ignore]
    fn what_a_kept_flows_key_costs() {
        const FLOWS: u16 = 30_000;
        enter_netns_of_web_and_cli();
        let web = std::net::UdpSocket::bind("10.0.1.1:0").unwrap();
        for port in 1..=FLOWS {
            web.send_to(b"x", ("10.0.1.2", port)).unwrap();
        }
        let (_rt, mut r) = revoker();
        let rss = || -> u64 {
            let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
            let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
            pages * 4096
        };
        let (mut parsed, mut raw) = (Vec::new(), Vec::new());
        let before = rss();
        r.link
            .dump(NetfilterProtoFamily::Unspec, &mut |e| {
                parsed.push(e.attributes(&[CTA_TUPLE_ORIG, CTA_ZONE]));
                true
            })
            .unwrap();
        let between = rss();
        r.link
            .dump(NetfilterProtoFamily::Unspec, &mut |e| {
                raw.push(lookup_key(e));
                true
            })
            .unwrap();
        let after = rss();
        assert!(parsed.len() >= usize::from(FLOWS) && raw.len() == parsed.len());
        eprintln!(
            "{} keys: as parsed attributes {} bytes each, raw {} bytes each",
            raw.len(),
            (between - before) / parsed.len() as u64,
            (after - between) / raw.len() as u64
        );
        std::hint::black_box((parsed, raw));
    }

    /// Entry → what the hook saw → verdict, as a sweep does it.
    fn verdict(c: &Compiled, e: &[ConntrackAttribute], from_this_node: bool) -> Option<Admission> {
        let adm = Admitter::new(c);
        match seen_of(e).unwrap() {
            Seen::Judge(mut f) => {
                if !adm.concerns(f.src) && !adm.concerns(f.dst) {
                    return None;
                }
                f.from_this_node = from_this_node;
                Some(adm.admit(&f))
            }
            _ => None,
        }
    }

    #[test]
    fn entries_map_to_the_verdict_of_the_rules_for_their_first_packet() {
        let c = deny_web();
        let denied = Some(Admission::Denied {
            direction: palisade_policy::model::Direction::Ingress,
            pod: "a/web".into(),
            policies: vec!["a/deny-web".into()],
        });
        // cli -> web through a Service VIP: judged at the backend, denied.
        let via_vip = entry(
            tuple("10.0.1.2", "10.96.0.10", CtProto::Tcp, Some((40000, 443))),
            tuple("10.0.1.1", "10.0.1.2", CtProto::Tcp, Some((8443, 40000))),
        );
        assert_eq!(verdict(&c, &via_vip, false), denied);
        // The same from this node (kubelet probe): exempt.
        let probe = entry(
            tuple("192.168.0.1", "10.0.1.1", CtProto::Tcp, Some((40000, 8443))),
            tuple("10.0.1.1", "192.168.0.1", CtProto::Tcp, Some((8443, 40000))),
        );
        assert_eq!(verdict(&c, &probe, true), Some(Admission::Admitted));
        // ICMP to web: no ports rule admits it.
        let ping = entry(
            tuple("10.0.1.2", "10.0.1.1", CtProto::Icmp, None),
            tuple("10.0.1.1", "10.0.1.2", CtProto::Icmp, None),
        );
        assert_eq!(verdict(&c, &ping, false), denied);
        // web's own egress (not isolated) and cli's traffic elsewhere: admitted.
        let out = entry(
            tuple("10.0.1.1", "8.8.8.8", CtProto::Udp, Some((40000, 53))),
            tuple("8.8.8.8", "192.168.0.1", CtProto::Udp, Some((53, 61000))),
        );
        assert_eq!(verdict(&c, &out, false), Some(Admission::Admitted));
        // Not a local address on either side: skipped before judging.
        let transit = entry(
            tuple("10.0.2.7", "8.8.8.8", CtProto::Tcp, Some((40000, 443))),
            tuple("8.8.8.8", "10.0.2.7", CtProto::Tcp, Some((443, 40000))),
        );
        assert_eq!(verdict(&c, &transit, false), None);
    }

    /// The kernel flushes the whole conntrack table on a DELETE that names no tuple: an entry whose
    /// original tuple the crate cannot parse (here a port two bytes short of the kernel's) gives
    /// no key at all, where a key of its zone and id alone would have flushed every flow.
    #[test]
    fn an_entry_whose_tuple_cannot_be_parsed_is_never_named_by_its_zone_alone() {
        let mut bytes = emitted(&entry(
            tuple("10.0.1.2", "10.0.1.1", CtProto::Tcp, None),
            tuple("10.0.1.1", "10.0.1.2", CtProto::Tcp, Some((80, 40000))),
        ));
        // The original tuple's protocol half, with a 1-byte destination port appended.
        let odd = [5u8, 0, 3, 0, 80, 0, 0, 0];
        let orig_len = u16::from_ne_bytes([bytes[0], bytes[1]]) as usize;
        let proto_at = 4 + u16::from_ne_bytes([bytes[4], bytes[5]]) as usize;
        for (at, grow) in [(0, 8u16), (proto_at, 8)] {
            let len = u16::from_ne_bytes([bytes[at], bytes[at + 1]]) + grow;
            bytes[at..at + 2].copy_from_slice(&len.to_ne_bytes());
        }
        bytes.splice(orig_len..orig_len, odd);
        let e = Entry::new(NetfilterProtoFamily::IPv4, &bytes);
        assert!(
            matches!(seen(&e), Ok(Seen::Judge(_))),
            "read in place: the entry is still judged ({:?})",
            seen(&e)
        );
        assert_eq!(delete_key(&e), None, "a delete without the original tuple");
        assert_eq!(
            comeback_key(&e).map(|k| k.0.len()),
            Some(2),
            "the reply tuple is fine"
        );
        assert_eq!(
            EntryKey::of(vec![ConntrackAttribute::Other(DefaultNla::new(
                CTA_ZONE,
                vec![0, 3]
            ))]),
            None
        );
    }

    #[test]
    fn a_delete_names_the_original_tuple_zone_and_id_only() {
        let e = entry(
            tuple("10.0.1.2", "10.0.1.1", CtProto::Tcp, Some((40000, 80))),
            tuple("10.0.1.1", "10.0.1.2", CtProto::Tcp, Some((80, 40000))),
        );
        let EntryKey(key) =
            delete_key(&Entry::new(NetfilterProtoFamily::IPv4, &emitted(&e))).unwrap();
        assert_eq!(key.len(), 3);
        assert!(matches!(key[0], ConntrackAttribute::CtaTupleOrig(_)));
        let kinds: Vec<u16> = key[1..].iter().map(|a| a.kind()).collect();
        assert_eq!(kinds, vec![CTA_ID, CTA_ZONE]);
    }
}
