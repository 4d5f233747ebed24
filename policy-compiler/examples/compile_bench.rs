//! Compile benchmark on a synthetic cluster: 10k pods on 100 nodes, 500 namespaces, 1k policies.
//!
//! `cargo run --release -p palisade-policy --example compile_bench [seed]`
//!
//! Prints compile time, ruleset size and full-replace bytes for one node, then for three single
//! changes (pod add, label change, policy change) the incremental diff beside a full replace of
//! the same new ruleset, in one run.

use palisade_policy::model::{Change, ClusterState, Peer, PortMatch, PortSpec, Protocol, Rule};
use palisade_policy::synth::{self, Rng, SynthConfig};
use palisade_policy::{compile, diff, Ruleset};
use std::time::{Duration, Instant};

const NODE: &str = "n0";

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// With `PALISADE_BENCH_DUMP=<dir>`, each batch is also written there, to time `nft -j -f` on it.
fn dump(file: &str, json: &str) {
    if let Some(dir) = std::env::var_os("PALISADE_BENCH_DUMP") {
        let path = std::path::Path::new(&dir).join(file);
        if let Err(e) = std::fs::write(&path, json) {
            eprintln!("cannot write {}: {e}", path.display());
        }
    }
}

fn measure(name: &str, st: &ClusterState, last: &Ruleset) -> Ruleset {
    let t = Instant::now();
    let next = compile(st, NODE).ruleset;
    let compile_t = t.elapsed();
    let t = Instant::now();
    let d = diff(last, &next);
    let diff_t = t.elapsed();
    let t = Instant::now();
    let full = next.full_replace();
    let full_t = t.elapsed();
    let slug: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    dump(&format!("diff_{slug}.json"), &d.to_json_string());
    println!(
        "{name:<14} compile {:>10} | diff {:>9}, {:>4} cmds, {:>8} bytes | full replace {:>9}, {:>6} cmds, {:>9} bytes | {:.0}x fewer bytes",
        ms(compile_t),
        ms(diff_t),
        d.commands,
        d.bytes,
        ms(full_t),
        full.commands,
        full.bytes,
        full.bytes as f64 / d.bytes.max(1) as f64
    );
    next
}

fn main() {
    let seed = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(42);
    let cfg = SynthConfig::large(seed);
    let t = Instant::now();
    let mut st = synth::cluster(&cfg);
    println!(
        "synthetic cluster (seed {seed}): {} pods, {} nodes, {} namespaces, {} policies, dual stack; generated in {}",
        st.pods.len(),
        st.nodes.len(),
        st.namespaces.len(),
        st.policies.len(),
        ms(t.elapsed())
    );
    let t = Instant::now();
    let c = compile(&st, NODE);
    let compile_t = t.elapsed();
    let s = c.ruleset.stats();
    let t = Instant::now();
    let full = c.ruleset.full_replace();
    let render_t = t.elapsed();
    dump("full.json", &full.to_json_string());
    println!(
        "node {NODE}: {} local pods, {} policies select them; compile {}",
        c.pods.len(),
        c.policies.len(),
        ms(compile_t)
    );
    println!(
        "ruleset: {} chains, {} rules, {} sets/maps, {} elements; full replace {} cmds, {} bytes JSON, rendered in {}",
        s.chains,
        s.rules,
        s.sets,
        s.elements,
        full.commands,
        full.bytes,
        ms(render_t)
    );
    // Average compile over all nodes (the whole cluster's work, one node at a time).
    let t = Instant::now();
    let mut total = 0usize;
    for n in st.nodes.keys().take(10) {
        total += compile(&st, n).ruleset.stats().elements;
    }
    println!(
        "compile of 10 nodes: {} total ({} per node, {total} elements)",
        ms(t.elapsed()),
        ms(t.elapsed() / 10)
    );
    println!();
    let mut last = c.ruleset;
    let mut rng = Rng::new(seed + 1);

    // 1. one pod added on this node (labels like its neighbours)
    let mut p = synth::make_pod(&cfg, &mut rng, cfg.pods + 1);
    p.node_name = Some(NODE.into());
    st.apply(Change::UpsertPod(p.clone()));
    last = measure("pod add", &st, &last);

    // 2. one label change on a local pod that a policy selects
    let key = c
        .pods
        .values()
        .find(|lp| !lp.ingress.is_empty())
        .map(|lp| lp.key.clone())
        .unwrap_or(p.key());
    let mut pod = st.pods[&key].clone();
    pod.labels.insert("tier".into(), "db".into());
    pod.labels.insert("env".into(), "prod".into());
    st.apply(Change::UpsertPod(pod));
    last = measure("label change", &st, &last);

    // 3. one policy selecting local pods changes its spec: a port added to its first rule
    //    (elements only), then a new rule with an ipBlock (its chain is flushed and refilled)
    let pkey = c.policies.keys().next().cloned().unwrap_or_default();
    if let Some(mut pol) = st.policies.get(&pkey).cloned() {
        let rules = pol.ingress.get_or_insert_with(Vec::new);
        if rules.is_empty() {
            rules.push(Rule {
                peers: vec![],
                ports: vec![PortSpec {
                    protocol: Protocol::Tcp,
                    port: PortMatch::Range(80, 80),
                }],
            });
        }
        rules[0].ports.push(PortSpec {
            protocol: Protocol::Tcp,
            port: PortMatch::Range(8443, 8443),
        });
        st.apply(Change::UpsertPolicy(pol.clone()));
        last = measure("policy: +port", &st, &last);
        pol.ingress.get_or_insert_with(Vec::new).push(Rule {
            peers: vec![Peer::IpBlock {
                cidr: "203.0.113.0/24".parse().unwrap_or_default(),
                except: vec![],
            }],
            ports: vec![PortSpec {
                protocol: Protocol::Udp,
                port: PortMatch::Range(5000, 5010),
            }],
        });
        st.apply(Change::UpsertPolicy(pol));
        measure("policy: +rule", &st, &last);
    }
}
