//! `palisade-lab`: a multi-node Kubernetes-like lab in network namespaces, driving the real
//! `palisade-agent` and `palisade` CNI plugin. See netns-tests/README.md.

use clap::{Parser, Subcommand};
use palisade_netns_tests::demo;
use palisade_netns_tests::k8s::{self, LabelEdit, PodPhase};
use palisade_netns_tests::lab::{self, Bins, Family, Lab, LabOptions};
use palisade_netns_tests::matrix::Matrix;
use palisade_netns_tests::probe::Protocol;
use palisade_netns_tests::LabError;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// `print!` that ends the process quietly once stdout's reader is gone (`palisade-lab status |
/// head`), as a Unix tool does on SIGPIPE; Rust ignores SIGPIPE, and `print!` would panic.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = write!(std::io::stdout(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

/// `println!` as [`out!`] writes.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

#[derive(Parser)]
#[command(
    name = "palisade-lab",
    about = "A Kubernetes-like lab in network namespaces running the real palisade binaries"
)]
struct Cli {
    /// Lab name (1-16 of [a-z0-9]); several labs can run side by side.
    #[arg(long, global = true, default_value = "lab", env = "PALISADE_LAB_NAME")]
    name: String,
    /// Where labs keep their state.
    #[arg(long, global = true, default_value = lab::RUN_ROOT, env = "PALISADE_LAB_RUN_ROOT")]
    run_root: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Bring up a lab from a directory (or file) of Kubernetes YAML: Namespaces, Pods, NetworkPolicies.
    Up {
        path: PathBuf,
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Also put an external network (192.168.77.2, fd00:192:168:77::2) behind the nodes' router.
        #[arg(long)]
        external: bool,
        /// `flat`: one L2 segment. `routed`: nodes on two segments behind a router, no node address
        /// on-link to another's, so cross-node pod traffic goes through the agents' VXLAN overlay.
        #[arg(long, default_value = "flat")]
        topology: lab::Topology,
    },
    /// Apply objects to a running lab (`kubectl apply -f`).
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Delete objects from a running lab (`kubectl delete -f`).
    Delete {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
    },
    /// Change labels: `label pod NS/NAME k=v k2-` or `label ns NAME k=v`.
    Label {
        /// `pod` or `ns`.
        kind: String,
        target: String,
        #[arg(required = true)]
        edits: Vec<String>,
    },
    /// Probe every ordered pair of pods on the given ports and protocols.
    Probe {
        /// Port/protocol pairs like `80/TCP,81/udp` (protocol defaults to TCP); replaces
        /// --ports/--protocols when given.
        #[arg(long = "port", value_delimiter = ',')]
        port: Vec<String>,
        #[arg(long, value_delimiter = ',', default_value = "80")]
        ports: Vec<u16>,
        #[arg(long, value_delimiter = ',', default_value = "tcp")]
        protocols: Vec<Protocol>,
        /// Probe the pods' IPv6 addresses.
        #[arg(long)]
        ipv6: bool,
        /// One JSON object per probe: {from, to, port, protocol, connected}.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 400)]
        timeout_ms: u64,
    },
    /// Move a pod to a phase as the kubelet would: `Running` starts a Pending pod (its sandbox and
    /// the whole CNI chain); `Succeeded`/`Failed` stops a pod and removes its sandbox (CNI DEL: its
    /// address is free again) while its Pod object keeps status.podIPs. Phases never move back.
    Phase {
        /// `NAMESPACE/NAME`.
        target: String,
        /// Running, Succeeded or Failed.
        phase: String,
    },
    /// Show the lab's nodes, their agents (pid alive, /healthz) and pods; fails when an agent is not
    /// healthy.
    Status,
    /// Stop a node's agent (SIGTERM by its pid, SIGKILL after 1.5 s) and start it again with the same
    /// arguments; returns once it is ready. Rules stay in the kernel meanwhile (fail closed).
    RestartAgent {
        /// Node name, e.g. node1.
        node: String,
    },
    /// Tear a lab down (works from its state file, also after a crash).
    Down {
        /// Tear down every lab under the run root.
        #[arg(long)]
        all: bool,
    },
    /// Bring up a two-node lab from an example directory, show what policies change, tear down.
    Demo { path: PathBuf },
}

fn run(cli: Cli) -> Result<(), LabError> {
    let opts = || {
        let mut o = LabOptions::new(&cli.name);
        o.run_root = cli.run_root.clone();
        o.bins = Bins::from_env();
        o
    };
    match &cli.command {
        Command::Up {
            path,
            nodes,
            external,
            topology,
        } => {
            let objects = k8s::read_path(path)?;
            let mut o = opts();
            o.nodes = *nodes;
            o.external = *external;
            o.topology = *topology;
            let mut lab = Lab::up(&o)?;
            lab.apply(objects)?;
            lab.wait_pods_ready(Duration::from_secs(20))?;
            out!("{}", demo::describe_lab(&lab));
            outln!(
                "lab {} is up; `palisade-lab --name {} down` removes it",
                lab.name(),
                lab.name()
            );
            lab.detach();
            Ok(())
        }
        Command::Apply { file } => {
            let mut lab = Lab::open(&cli.run_root, &cli.name)?;
            let objects = k8s::read_path(file)?;
            let n = objects.len();
            lab.apply(objects)?;
            lab.wait_pods_ready(Duration::from_secs(20))?;
            outln!("applied {n} object(s)");
            Ok(())
        }
        Command::Delete { file } => {
            let mut lab = Lab::open(&cli.run_root, &cli.name)?;
            let objects = k8s::read_path(file)?;
            let n = objects.len();
            lab.delete(objects)?;
            outln!("deleted {n} object(s)");
            Ok(())
        }
        Command::Label {
            kind,
            target,
            edits,
        } => {
            let mut lab = Lab::open(&cli.run_root, &cli.name)?;
            let edits: Vec<LabelEdit> =
                edits.iter().map(|e| e.parse()).collect::<Result<_, _>>()?;
            match kind.as_str() {
                "pod" | "pods" | "po" => {
                    let (ns, name) = target.split_once('/').ok_or_else(|| {
                        LabError::Invalid(format!("pod {target:?}: write NAMESPACE/NAME"))
                    })?;
                    lab.label_pod(ns, name, &edits)?;
                }
                "ns" | "namespace" | "namespaces" => lab.label_namespace(target, &edits)?,
                other => {
                    return Err(LabError::Invalid(format!(
                        "label {other:?}: expected pod or ns"
                    )))
                }
            }
            outln!("labelled {kind} {target}");
            Ok(())
        }
        Command::Probe {
            port,
            ports,
            protocols,
            ipv6,
            json,
            timeout_ms,
        } => {
            let lab = Lab::open(&cli.run_root, &cli.name)?;
            let pp: Vec<(u16, Protocol)> = if port.is_empty() {
                protocols
                    .iter()
                    .flat_map(|pr| ports.iter().map(move |p| (*p, *pr)))
                    .collect()
            } else {
                port.iter()
                    .map(|p| parse_port(p))
                    .collect::<Result<_, _>>()?
            };
            let family = if *ipv6 { Family::V6 } else { Family::V4 };
            let records = lab.probe_matrix(&pp, family, Duration::from_millis(*timeout_ms))?;
            if *json {
                for r in &records {
                    outln!(
                        "{}",
                        serde_json::to_string(r).map_err(|e| LabError::Parse {
                            what: "probe record".into(),
                            detail: e.to_string()
                        })?
                    );
                }
            } else {
                let pods: Vec<String> = lab.pods().map(|p| p.key()).collect();
                out!(
                    "{}",
                    Matrix::from_records(pods, &records).render(None, false)
                );
            }
            Ok(())
        }
        Command::Phase { target, phase } => {
            let mut lab = Lab::open(&cli.run_root, &cli.name)?;
            let (ns, name) = target.split_once('/').ok_or_else(|| {
                LabError::Invalid(format!("pod {target:?}: write NAMESPACE/NAME"))
            })?;
            let phase: PodPhase = phase.parse()?;
            lab.set_pod_phase(ns, name, phase)?;
            if phase == PodPhase::Running {
                lab.wait_pods_ready(Duration::from_secs(20))?;
            }
            outln!("pod {target} is {phase}");
            Ok(())
        }
        Command::Status => {
            let lab = Lab::open(&cli.run_root, &cli.name)?;
            outln!("Topology: {}", lab.state().topology);
            out!("{}", demo::describe_lab(&lab));
            let parked = lab.pods_without_sandbox()?;
            if !parked.is_empty() {
                outln!("Pods without a sandbox (objects only):");
                for (pod, phase, ips) in parked {
                    outln!("  {pod:<16} {phase:<10} {}", ips.join(" "));
                }
            }
            outln!("Agents:");
            let mut unhealthy = Vec::new();
            for n in &lab.state().nodes {
                let h = lab.agent_health(&n.name)?;
                outln!("{h}");
                if !h.healthy() {
                    unhealthy.push(n.name.clone());
                }
            }
            if unhealthy.is_empty() {
                Ok(())
            } else {
                Err(LabError::Invalid(format!(
                    "agent not healthy on {}; `palisade-lab restart-agent NODE` restarts one",
                    unhealthy.join(", ")
                )))
            }
        }
        Command::RestartAgent { node } => {
            let mut lab = Lab::open(&cli.run_root, &cli.name)?;
            let start = std::time::Instant::now();
            let (old, new) = lab.restart_agent(node)?;
            let old = old.map_or_else(|| "none".to_string(), |p| p.to_string());
            outln!(
                "{node}: agent restarted (pid {old} -> {new}), ready after {:?}",
                start.elapsed()
            );
            Ok(())
        }
        Command::Down { all } => {
            let dirs = if *all {
                lab::list_labs(&cli.run_root)
            } else {
                vec![Lab::run_dir_of(&cli.run_root, &cli.name)]
            };
            let mut errors = Vec::new();
            for d in dirs {
                match lab::down_run_dir(&d) {
                    Ok(()) => outln!("lab at {} removed", d.display()),
                    Err(e) => errors.push(format!("{}: {e}", d.display())),
                }
            }
            if errors.is_empty() {
                Ok(())
            } else {
                Err(LabError::Teardown(errors))
            }
        }
        Command::Demo { path } => {
            let mut o = opts();
            if cli.name == "lab" {
                o.name = "demo".into();
            }
            demo::run(
                &o,
                path,
                std::io::IsTerminal::is_terminal(&std::io::stdout()),
            )
        }
    }
}

/// `80/TCP`, `81/udp` or `80` (TCP).
fn parse_port(s: &str) -> Result<(u16, Protocol), LabError> {
    let (port, proto) = s.split_once('/').unwrap_or((s, "tcp"));
    let port = port.parse().map_err(|_| {
        LabError::Invalid(format!("--port {s:?}: expected PORT/PROTOCOL, e.g. 80/TCP"))
    })?;
    let proto = proto.parse().map_err(LabError::Invalid)?;
    Ok((port, proto))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PALISADE_LAB_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("palisade-lab: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent_and_parses_the_documented_forms() {
        Cli::command().debug_assert();
        for args in [
            &["palisade-lab", "up", "examples/demo"][..],
            &["palisade-lab", "--name", "x1", "apply", "-f", "p.yaml"],
            &["palisade-lab", "label", "pod", "x/a", "k=v", "k2-"],
            &["palisade-lab", "label", "ns", "y", "ns2=updated"],
            &["palisade-lab", "probe", "--port", "80/TCP,81/udp", "--json"],
            &[
                "palisade-lab",
                "probe",
                "--ports",
                "80,81",
                "--protocols",
                "tcp,udp",
                "--ipv6",
            ],
            &["palisade-lab", "down", "--all"],
            &["palisade-lab", "restart-agent", "node2"],
            &["palisade-lab", "status"],
            &["palisade-lab", "phase", "x/a", "Succeeded"],
            &["palisade-lab", "demo", "examples/demo"],
        ] {
            assert!(Cli::try_parse_from(args).is_ok(), "{args:?}");
        }
        assert!(Cli::try_parse_from(["palisade-lab", "label", "pod", "x/a"]).is_err());
    }

    #[test]
    fn port_flags_parse_with_tcp_as_the_default_protocol() {
        assert_eq!(parse_port("80/TCP").unwrap(), (80, Protocol::Tcp));
        assert_eq!(parse_port("81/udp").unwrap(), (81, Protocol::Udp));
        assert_eq!(parse_port("80").unwrap(), (80, Protocol::Tcp));
        assert!(parse_port("80/sctp").is_err());
        assert!(parse_port("http").is_err());
    }
}
