//! Times the crate's kernel paths in a fresh process: `setelem` add batches and probes, and the lib
//! backend (libnftables load, one-element JSON transactions). Prints figures only; compare them
//! between builds on the same machine (e.g. run the binary of two commits one after the other).
//!
//! Needs root: it moves itself into a network namespace of its own first (the host's ruleset is
//! never touched; the namespace dies with the process).
//!
//! ```sh
//! cargo build --release -p palisade-nft --example nft_timing
//! sudo target/release/examples/nft_timing [ROUNDS]
//! ```

use palisade_nft::setelem::{self, SetOp};
use palisade_nft::{Backend, Nft};
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

const TABLE: &str = r#"{"nftables":[{"add":{"table":{"family":"inet","name":"palisade"}}},{"add":{"set":{"family":"inet","table":"palisade","name":"pending_v4","type":"ipv4_addr"}}},{"add":{"set":{"family":"inet","table":"palisade","name":"peers","type":"ipv4_addr"}}}]}"#;

fn addr(i: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | i))
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.4} ms", d.as_secs_f64() * 1e3)
}

/// Times `n` calls of `f(i)`: (first call, median of the rest).
fn time(n: u32, mut f: impl FnMut(u32)) -> (Duration, Duration) {
    let t = Instant::now();
    f(0);
    let first = t.elapsed();
    let rest = (1..n)
        .map(|i| {
            let t = Instant::now();
            f(i);
            t.elapsed()
        })
        .collect();
    (first, median(rest))
}

fn main() {
    let rounds: u32 = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("ROUNDS is a number"))
        .unwrap_or(2000);
    palisade_testkit::netns::enter_private_netns();

    // setelem first, before libnftables is loaded into this process.
    let exec = Nft::new(Backend::Exec);
    exec.apply(TABLE).expect("nft must be installed");
    let (first, add) = time(rounds, |i| {
        setelem::apply(
            "inet",
            "palisade",
            &[(SetOp::Add, "pending_v4", addr(i).into())],
        )
        .unwrap()
    });
    println!(
        "setelem add batch (1 element): first {}, median {}",
        ms(first),
        ms(add)
    );
    let (first, getset) = time(rounds, |_| {
        assert!(setelem::set_exists("inet", "palisade", "pending_v4").unwrap())
    });
    println!(
        "setelem GETSET probe: first {}, median {}",
        ms(first),
        ms(getset)
    );
    let (first, getelem) = time(rounds, |i| {
        assert!(setelem::element_exists("inet", "palisade", "pending_v4", addr(i)).unwrap())
    });
    println!(
        "setelem GETSETELEM probe: first {}, median {}",
        ms(first),
        ms(getelem)
    );

    let t = Instant::now();
    let lib = Nft::new(Backend::Lib);
    let open = t.elapsed();
    assert_eq!(lib.backend(), Backend::Lib, "libnftables must load");
    let (first, tx) = time(rounds.min(500), |i| {
        lib.apply(&format!(
            r#"{{"nftables":[{{"add":{{"element":{{"family":"inet","table":"palisade","name":"peers","elem":["{}"]}}}}}}]}}"#,
            addr(i)
        ))
        .unwrap()
    });
    println!(
        "libnftables: open {}, one-element transaction: first {}, median {}",
        ms(open),
        ms(first),
        ms(tx)
    );
}
