//! One line per flow: a packet of a flow already logged within the window (a TCP SYN sent again, the
//! next datagram of a UDP exchange) is counted, not written again. Pure, with the time passed in.

use super::packet::PacketFacts;
use super::record::Kind;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long a flow counts as logged.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Most flows remembered: beyond, the oldest are forgotten (they may then be logged again). The
/// kernel's rate limit keeps far fewer than this within a window.
pub const CAPACITY: usize = 8192;

/// Flows logged within the window.
#[derive(Debug, Default)]
pub struct Dedup {
    seen: HashMap<(Kind, PacketFacts), Instant>,
}

impl Dedup {
    /// Whether this packet starts a flow not logged within the window (then it is remembered).
    pub fn first(&mut self, kind: Kind, facts: PacketFacts, now: Instant) -> bool {
        if let Some(at) = self.seen.get(&(kind, facts)) {
            if now.saturating_duration_since(*at) < WINDOW {
                return false;
            }
        }
        if self.seen.len() >= CAPACITY {
            self.seen
                .retain(|_, at| now.saturating_duration_since(*at) < WINDOW);
            if self.seen.len() >= CAPACITY {
                // Still full within one window: forget the older half.
                let mut times: Vec<Instant> = self.seen.values().copied().collect();
                times.sort();
                let cut = times[times.len() / 2];
                self.seen.retain(|_, at| *at > cut);
            }
        }
        self.seen.insert((kind, facts), now);
        true
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow_log::packet;

    fn facts(sport: u16) -> PacketFacts {
        PacketFacts {
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            proto: packet::TCP,
            ports: Some((sport, 80)),
        }
    }

    #[test]
    fn a_retransmitted_syn_is_one_line_and_a_new_connection_another() {
        let t0 = Instant::now();
        let mut d = Dedup::default();
        assert!(d.first(Kind::Dropped, facts(1000), t0));
        assert!(!d.first(Kind::Dropped, facts(1000), t0 + Duration::from_secs(1)));
        assert!(!d.first(Kind::Dropped, facts(1000), t0 + Duration::from_secs(3)));
        assert!(d.first(Kind::Dropped, facts(1001), t0 + Duration::from_secs(3)));
        assert!(
            d.first(Kind::Allowed, facts(1000), t0),
            "another verdict is another line"
        );
        assert!(d.first(Kind::Dropped, facts(1000), t0 + WINDOW));
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_new_flows() {
        let t0 = Instant::now();
        let mut d = Dedup::default();
        for i in 0..(3 * CAPACITY) {
            let f = PacketFacts {
                ports: Some(((i % 60000) as u16, (i / 60000) as u16)),
                ..facts(0)
            };
            assert!(d.first(Kind::Dropped, f, t0 + Duration::from_micros(i as u64)));
            assert!(d.len() <= CAPACITY);
        }
    }
}
