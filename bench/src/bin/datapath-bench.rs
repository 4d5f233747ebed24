//! datapath-bench: connection rate, request/response latency and throughput between two pods on two
//! lab nodes, for no policy, two baseline models and palisade, at several policy counts.
//!
//! `run` orchestrates everything (needs root; creates and deletes its own namespaces). `serve`, `crr`,
//! `rr` and `probe` are the traffic tools it runs inside the pod namespaces.

use clap::{Parser, Subcommand};
use palisade_bench::datapath::{report, rulesets, run, topo, traffic, workload};
use palisade_bench::{Error, Result};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Parser)]
#[command(about = "palisade datapath benchmark")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the matrix and write `bench/results/datapath-<stamp>.{json,md,png}`.
    Run {
        #[arg(long, value_delimiter = ',', default_value = "0,100,1000,10000")]
        policies: Vec<usize>,
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "none,iptables-model,naive-nft-model,palisade"
        )]
        systems: Vec<String>,
        #[arg(long, default_value_t = 16)]
        rounds: usize,
        /// Milliseconds of one connect/close or request/response slice (each round runs one slice of
        /// each per system, the systems one after the other).
        #[arg(long, default_value_t = 500)]
        slice_ms: u64,
        /// Seconds of one iperf3 run.
        #[arg(long, default_value_t = 1)]
        iperf_secs: u64,
        /// Seconds at the start of each iperf3 run left out of its figure (iperf3 `--omit`: TCP's
        /// slow start and first windows), run on top of `--iperf-secs`.
        #[arg(long, default_value_t = 0)]
        iperf_omit: u64,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long)]
        no_iperf: bool,
        /// Run iperf3 in every n-th round only.
        #[arg(long, default_value_t = 4)]
        iperf_every: usize,
        /// Directory for the results.
        #[arg(long, default_value = "bench/results")]
        out: PathBuf,
        /// Name stem of the results files (default: `datapath-<unix time>`).
        #[arg(long)]
        name: Option<String>,
        /// Directory with palisade's compiled rulesets as `nft -f` input, `<policies>-node-1.nft` and
        /// `<policies>-node-2.nft` (see `export-manifests`); default: palisade-policy compiles them in process.
        #[arg(long)]
        palisade_from: Option<PathBuf>,
        /// Underlays to measure every system on: `flat` (one link), `routed-direct` (two subnets
        /// behind a router that routes the pod CIDRs), `overlay` (the same, pod traffic over the
        /// agent's VXLAN devices); e.g. `--underlays routed-direct,overlay` for the overlay figure.
        #[arg(long, value_delimiter = ',', default_value = "flat")]
        underlays: Vec<String>,
        /// One lab for all systems, each slice loading its system's ruleset first (no lab-to-lab
        /// difference in the ratios; only for rulesets that load in well under a second).
        #[arg(long)]
        same_lab: bool,
        /// Exactly two systems, each in a lab of its own on every underlay: all their
        /// connect/close slices become one slice whose connections alternate between the labs,
        /// and every other round the two labs of an underlay trade rulesets (so a difference
        /// between labs cancels). Resolves a cost far below the drift between two slices (the
        /// source guard's, issue 11). In place of iperf3 (same rounds, `--iperf-secs` long), one
        /// TCP stream per lab sends 4 MiB chunks in turns, each acknowledged by the server
        /// (`stream-alternate`): bulk throughput with the labs' turns milliseconds apart.
        #[arg(long, conflicts_with = "same_lab")]
        alternate: bool,
        /// With `--alternate`: connections from one lab before the other's turn (1: each
        /// connection meets the caches the other lab left; more: its own, warm).
        #[arg(long, default_value_t = 1)]
        alternate_turn: usize,
        /// ClusterNetworkPolicies (Admin and Baseline) added to every cluster; `palisade-no-cnp`
        /// is palisade without them.
        #[arg(long, default_value_t = 0)]
        cluster_policies: usize,
    },
    /// Print one system's ruleset for one node of the synthetic cluster.
    Render {
        #[arg(long)]
        policies: usize,
        #[arg(long)]
        system: String,
        #[arg(long, default_value = "node-2")]
        node: String,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        #[arg(long, default_value_t = 0)]
        cluster_policies: usize,
        /// The underlay the table is for: flat, routed-direct or overlay (what the agent's table
        /// holds of the overlay differs).
        #[arg(long, default_value = "flat")]
        underlay: String,
    },
    /// Serve the connect/close and request/response protocols (inside the server pod).
    Serve {
        #[arg(long)]
        ip: String,
        #[arg(long)]
        crr_port: u16,
        #[arg(long)]
        rr_port: u16,
        /// Also serve the acknowledged stream of `stream-alternate` on this port.
        #[arg(long)]
        stream_port: Option<u16>,
        #[arg(long)]
        secs: u64,
        #[arg(long)]
        cpu: Option<usize>,
    },
    /// Connect/close loop; prints JSON.
    Crr {
        #[arg(long)]
        target: SocketAddr,
        /// Duration in milliseconds.
        #[arg(long)]
        ms: u64,
        #[arg(long)]
        cpu: Option<usize>,
    },
    /// Connect/close loop alternating connection by connection between the client pods of
    /// several labs (`--netns`, each an `ip netns` name, all serving `--target`); prints a JSON
    /// array, one result per namespace in the order given. Run from the host, not in a pod.
    CrrAlternate {
        #[arg(long, required = true, num_args = 1)]
        netns: Vec<String>,
        #[arg(long)]
        target: SocketAddr,
        /// Connections from one namespace before the next one's turn.
        #[arg(long, default_value_t = 1)]
        turn: usize,
        /// Duration in milliseconds.
        #[arg(long)]
        ms: u64,
        #[arg(long)]
        cpu: Option<usize>,
    },
    /// Bulk throughput in turns of acknowledged chunks over one connection per client pod of
    /// several labs (`--netns`, each an `ip netns` name, all serving the stream on `--target`);
    /// prints a JSON array, one result per namespace in the order given. Run from the host.
    StreamAlternate {
        #[arg(long, required = true, num_args = 1)]
        netns: Vec<String>,
        #[arg(long)]
        target: SocketAddr,
        /// Unmeasured turns per namespace first (slow start).
        #[arg(long, default_value_t = 10)]
        warmup: usize,
        /// Duration in milliseconds.
        #[arg(long)]
        ms: u64,
        #[arg(long)]
        cpu: Option<usize>,
    },
    /// Request/response on one connection; prints JSON.
    Rr {
        #[arg(long)]
        target: SocketAddr,
        /// Duration in milliseconds.
        #[arg(long)]
        ms: u64,
        #[arg(long)]
        cpu: Option<usize>,
    },
    /// One SYN probe; prints `open`, `refused` (RST: the path is open) or `blocked` (timeout).
    Probe {
        #[arg(long)]
        target: SocketAddr,
        #[arg(long, default_value_t = 200)]
        timeout_ms: u64,
    },
}

fn main() {
    palisade_bench::init_logging();
    if let Err(e) = real_main(Cli::parse()) {
        tracing::error!(error = %e, "datapath-bench failed");
        std::process::exit(1);
    }
}

/// Prints a traffic tool's result as one line of JSON (what `run` reads back).
fn print_json(what: &str, v: &impl serde::Serialize) -> Result<()> {
    let line = serde_json::to_string(v).map_err(|e| Error::Parse {
        what: what.into(),
        detail: e.to_string(),
    })?;
    println!("{line}");
    Ok(())
}

/// An alternating client's sides: each client pod's namespace (opened) with the one target all
/// serve; pinned to `cpu` first, as the clients in the pods are.
fn alternate_sides(
    netns: &[String],
    target: SocketAddr,
    cpu: Option<usize>,
) -> Result<Vec<(std::fs::File, SocketAddr)>> {
    if let Some(c) = cpu {
        traffic::pin_to_cpu(c);
    }
    netns
        .iter()
        .map(|ns| traffic::open_netns(ns).map(|f| (f, target)))
        .collect()
}

fn real_main(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve {
            ip,
            crr_port,
            rr_port,
            stream_port,
            secs,
            cpu,
        } => {
            if let Some(c) = cpu {
                traffic::pin_to_cpu(c);
            }
            traffic::serve(
                &ip,
                crr_port,
                rr_port,
                stream_port,
                Duration::from_secs(secs),
            )
        }
        Command::Crr { target, ms, cpu } => {
            if let Some(c) = cpu {
                traffic::pin_to_cpu(c);
            }
            let r = traffic::crr(target, Duration::from_millis(ms))?;
            print_json("crr result", &r)
        }
        Command::CrrAlternate {
            netns,
            target,
            turn,
            ms,
            cpu,
        } => {
            let sides = alternate_sides(&netns, target, cpu)?;
            let r = traffic::crr_alternate(&sides, turn, Duration::from_millis(ms))?;
            print_json("crr-alternate result", &r)
        }
        Command::StreamAlternate {
            netns,
            target,
            warmup,
            ms,
            cpu,
        } => {
            let sides = alternate_sides(&netns, target, cpu)?;
            let r = traffic::stream_alternate(&sides, warmup, Duration::from_millis(ms))?;
            print_json("stream-alternate result", &r)
        }
        Command::Rr { target, ms, cpu } => {
            if let Some(c) = cpu {
                traffic::pin_to_cpu(c);
            }
            let r = traffic::rr(target, Duration::from_millis(ms))?;
            print_json("rr result", &r)
        }
        Command::Probe { target, timeout_ms } => {
            let outcome = traffic::probe_once(target, Duration::from_millis(timeout_ms));
            println!("{}", outcome.name());
            Ok(())
        }
        Command::Render {
            policies,
            system,
            node,
            seed,
            cluster_policies,
            underlay,
        } => {
            let sys = rulesets::System::parse(&system)
                .ok_or_else(|| Error::Invalid(format!("unknown system {system}")))?;
            let underlay = topo::Underlay::parse(&underlay)
                .ok_or_else(|| Error::Invalid(format!("unknown underlay {underlay}")))?;
            let cluster = workload::Cluster::generate(policies, seed)?
                .with_cluster_policies(cluster_policies);
            let r = rulesets::render(sys, &cluster, &node, underlay)?;
            for part in [r.ipset, r.iptables, r.nft, r.nft_json]
                .into_iter()
                .flatten()
            {
                print!("{part}");
            }
            eprintln!("rules {} elements {}", r.rules, r.elements);
            Ok(())
        }
        Command::Run {
            policies,
            systems,
            rounds,
            slice_ms,
            iperf_secs,
            iperf_omit,
            seed,
            no_iperf,
            iperf_every,
            out,
            name,
            palisade_from,
            underlays,
            same_lab,
            alternate,
            alternate_turn,
            cluster_policies,
        } => {
            let underlays = underlays
                .iter()
                .map(|u| {
                    topo::Underlay::parse(u).ok_or_else(|| {
                        Error::Invalid(format!(
                            "unknown underlay {u}: want flat, routed-direct or overlay"
                        ))
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let systems = systems
                .iter()
                .map(|s| {
                    rulesets::System::parse(s)
                        .ok_or_else(|| Error::Invalid(format!("unknown system {s}")))
                })
                .collect::<Result<Vec<_>>>()?;
            let mut palisade_override = BTreeMap::new();
            if let Some(dir) = &palisade_from {
                for &p in &policies {
                    let read = |node: &str| {
                        let path = dir.join(format!("{p}-{node}.nft"));
                        std::fs::read_to_string(&path).map_err(palisade_bench::io_err_pub(format!(
                            "reading {}",
                            path.display()
                        )))
                    };
                    palisade_override.insert(p, (read("node-1")?, read("node-2")?));
                }
            }
            let exe = std::env::current_exe()
                .map_err(palisade_bench::io_err_pub("finding this binary"))?;
            let cfg = run::Config {
                policies,
                systems,
                rounds,
                slice_ms,
                iperf_secs,
                iperf_omit,
                seed,
                iperf: !no_iperf,
                iperf_every,
                exe,
                palisade_override,
                underlays,
                same_lab,
                alternate,
                alternate_turn,
                cluster_policies,
            };
            let command: String = std::env::args().collect::<Vec<_>>().join(" ");
            let started = palisade_bench::utc_now();
            let before = report::machine();
            let samples = run::run(&cfg)?;
            let after = report::machine();
            let stem = name.unwrap_or_else(|| format!("datapath-{}", palisade_bench::unix_now()));
            let charts = report::write_results(&out, &stem, &samples, report::Charts::Datapath)?;
            let mut md = report::markdown(&samples, &command, &before, &after, &started, &charts);
            md.push_str(&report::underlay_summary(&samples));
            let md_path = out.join(format!("{stem}.md"));
            std::fs::write(&md_path, md).map_err(|source| Error::Write {
                path: md_path.clone(),
                source,
            })?;
            println!("{}", md_path.display());
            Ok(())
        }
    }
}
