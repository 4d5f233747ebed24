//! What the subcommands do. `run` wires the edges together; the others are one-shot.

use crate::attachments;
use crate::cli::{CleanupArgs, CompileArgs, ExplainArgs, FlowsArgs, RunArgs, SourceArgs};
use crate::cniconf;
use crate::compiled;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::nft::Nft;
use crate::reconcile::{self, Config, Engine, Msg};
use crate::route_sync::RouteSync;
use crate::routes::Routes;
use crate::server;
use crate::source::kube::KubeSource;
use crate::source::manifests::ManifestSource;
use crate::source::SourceEvent;
use palisade_policy::model::{Change, ClusterState};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

/// Capacity of the channel `list_once` reads (backpressure on a burst of watch events).
const SOURCE_CHANNEL: usize = 512;

/// Starts the configured source, sending into `tx`; the task ends with the source.
async fn start_source<T: From<SourceEvent> + Send + 'static>(
    args: &SourceArgs,
    tx: mpsc::Sender<T>,
) -> Result<tokio::task::JoinHandle<Result<()>>> {
    let src_err = Error::Source;
    Ok(if let Some(dir) = &args.manifests {
        info!(dir = %dir.display(), "source: manifest directory");
        let s = ManifestSource::new(dir.clone());
        tokio::spawn(async move { s.run(tx).await.map_err(src_err) })
    } else {
        let s = match &args.kubeconfig {
            Some(path) => {
                info!(kubeconfig = %path.display(), "source: kubernetes API");
                KubeSource::from_kubeconfig(path).await.map_err(src_err)?
            }
            None => {
                info!("source: kubernetes API (in-cluster config)");
                KubeSource::in_cluster().map_err(src_err)?
            }
        };
        tokio::spawn(async move { s.run(tx).await.map_err(src_err) })
    })
}

/// `palisade-agent run`.
pub async fn run(args: RunArgs) -> Result<()> {
    if args.node_name.is_empty() {
        return Err(Error::Usage(
            "--node-name (PALISADE_NODE_NAME) must not be empty".into(),
        ));
    }
    let cluster_cidrs = crate::routes::cluster_cidrs(&args.cluster_cidrs)?;
    let metrics = Arc::new(Metrics::default());
    let nft = Nft::new(args.nft_backend);
    info!(backend = ?nft.backend(), "nft backend");
    // One channel into the engine: the source, the attachment watch, the drift monitor, the
    // snapshot reader, the flow log and the metrics scrape all send here (the threads with
    // `blocking_send`).
    let (tx, rx) = mpsc::channel::<Msg>(reconcile::CHANNEL);
    let listener = server::bind(&args.listen).await?;
    info!(listen = %args.listen, "serving /healthz, /readyz, /metrics");
    let policies = crate::policy_metrics::PolicyMetrics::new(tx.clone(), nft.counters().clone());
    tokio::spawn(server::serve(
        listener,
        metrics.clone(),
        Some(Arc::new(policies)),
    ));
    let wake = tx.clone();
    let lost = tx.clone();
    let poll_attachments = match attachments::watch(
        &args.state_dir,
        move || wake.blocking_send(Msg::AttachmentsChanged).is_ok(),
        move || {
            let _ = lost.blocking_send(Msg::AttachmentWatchLost);
        },
    ) {
        Ok(()) => false,
        Err(e) => {
            warn!(error = %e, "cannot watch attachment records; polling them instead");
            true
        }
    };

    // Opened before the first commit, in the node's namespace: no change behind our back is missed.
    let drift_wake = tx.clone();
    if args.no_drift_watch {
        warn!(
            "--no-drift-watch: changes to our table by other processes are undone at resync only"
        );
    } else if let Err(e) = crate::nft::watch_drift(nft.monitor_switch(), move |drift| {
        drift_wake
            .blocking_send(Msg::Drift {
                what: drift.to_string(),
                touched: drift.touched,
            })
            .is_ok()
    }) {
        warn!(error = %e, "cannot watch our table for changes; changes behind our back are undone at resync only (--resync-seconds); the agent needs CAP_NET_ADMIN");
    }

    let cfg = Config {
        node_name: args.node_name.clone(),
        state_dir: args.state_dir.clone(),
        cni_conf_dir: args.cni_conf_dir.clone(),
        ipam_data_dir: args.ipam_data_dir.clone(),
        mtu: args.mtu,
        fail_open: args.fail_open,
        resync: Duration::from_secs(args.resync_seconds.max(1)),
        debounce: Duration::from_millis(args.debounce_ms),
        cluster_cidrs: cluster_cidrs.clone(),
        masquerade: args.masquerade,
        no_masquerade_cidrs: args.no_masquerade_cidrs.clone(),
        poll_attachments,
    };
    let rt = tokio::runtime::Handle::current();
    let mut engine = Engine::new(cfg, nft, metrics.clone())
        .with_snapshot_reader(tx.clone())?
        .with_policy_limits(palisade_policy::model::PolicyLimits {
            pod_peers: args.max_policy_pod_peers,
            peer_pods: args.max_policy_peer_pods,
        });
    if !args.no_routes {
        info!(
            mode = args.encapsulation.label(),
            vni = crate::overlay::VNI,
            port = crate::overlay::PORT,
            "encapsulation"
        );
        let sync = RouteSync::new(
            Routes::new()?,
            args.node_name.clone(),
            args.encapsulation,
            rt.clone(),
        )
        .with_overlay(crate::overlay::Overlay::new()?);
        engine = engine.with_routes(sync);
    }
    match crate::conntrack::Revoker::new(&rt) {
        Ok(r) => engine = engine.with_revoker(r),
        Err(e) => {
            warn!(error = %e, "cannot open conntrack; established flows are not cut when a policy revokes them or their pod goes away (is nf_conntrack_netlink available?)")
        }
    }
    engine = engine.with_bindings_left();
    if args.keep_established_flows {
        info!("--keep-established-flows: connections stay up when a policy revokes them (a deleted pod's still end with it)");
        engine = engine.keep_established_flows();
    }
    if !args.restore_lockdown {
        info!("--restore-lockdown=false: after our table is deleted or flushed behind our back, pods' new connections pass unchecked until the full table is restored");
        engine = engine.without_restore_lockdown();
    }
    if let Some(output) = &args.flow_log {
        engine = start_flow_log(&args, output, engine, &metrics, tx.clone()).await?;
    }
    let engine_rt = rt.clone();
    let engine_thread = std::thread::Builder::new()
        .name("reconcile".into())
        .spawn(move || engine.run(rx, engine_rt))
        .map_err(|e| Error::io("spawn reconcile thread", "reconcile", e))?;

    // The source converts objects into model changes and sends them to the engine directly.
    let mut source = start_source(&args.source, tx.clone()).await?;

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| Error::io("install SIGTERM handler", "signal", e))?;
    let result = tokio::select! {
        _ = term.recv() => { info!("SIGTERM: exiting; rules stay in the kernel, new pods stay pending"); Ok(()) }
        _ = tokio::signal::ctrl_c() => { info!("SIGINT: exiting; rules stay in the kernel"); Ok(()) }
        r = &mut source => match r {
            Ok(Ok(())) => Err(Error::SourceEnded { when: "while running" }),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(Error::SourceTask(e)),
        },
    };
    source.abort();
    let _ = tx.send(Msg::Stop).await;
    let _ = tokio::task::spawn_blocking(move || engine_thread.join()).await;
    result
}

/// `--flow-log`: binds the NFLOG group (in this namespace, before the first commit puts the log
/// rules in), starts the writer and the reader thread. A group another process holds is an error
/// at start, not a silent gap.
async fn start_flow_log(
    args: &RunArgs,
    output: &str,
    engine: Engine,
    metrics: &Arc<Metrics>,
    tx: mpsc::Sender<Msg>,
) -> Result<Engine> {
    use crate::flow_log::{nflog::NflogSocket, writer, FlowLog};
    let cfg = palisade_policy::model::FlowLog {
        group: args.flow_log_group,
        rate: args.flow_log_rate,
        burst: args.flow_log_burst,
        allowed: args.flow_log_allowed,
    };
    let mut socket = NflogSocket::bind(cfg.group)?;
    let (lines, rx) = mpsc::channel(crate::flow_log::QUEUE);
    let writing = writer::start(writer::Output::parse(output), &args.state_dir, rx).await?;
    tokio::spawn(writing);
    std::thread::Builder::new()
        .name("flow-log".into())
        .spawn(move || loop {
            match socket.read() {
                Ok(read) => {
                    let empty = read.packets.is_empty() && read.unreadable == 0 && !read.overflowed;
                    if !empty && tx.blocking_send(Msg::Flows(read)).is_err() {
                        return; // the engine is gone
                    }
                }
                Err(e) => {
                    warn!(error = %e, "flow log stopped: cannot read its NFLOG socket; restart the agent to log again");
                    return;
                }
            }
        })
        .map_err(|e| Error::io("spawn flow log thread", "flow-log", e))?;
    info!(
        output,
        group = cfg.group,
        rate = cfg.rate,
        burst = cfg.burst,
        allowed = cfg.allowed,
        socket = %args.state_dir.join(writer::SOCKET).display(),
        "flow log on"
    );
    Ok(engine.with_flow_log(cfg, FlowLog::new(&args.node_name, lines, metrics.clone())))
}

/// `palisade-agent flows`: this node's recent flow-log lines, and with `--follow` every new one.
pub async fn flows(args: FlowsArgs) -> Result<()> {
    crate::flow_log::writer::read(&args.state_dir, args.follow).await
}

/// `palisade-agent cleanup`: our table, our routes, our conflist. Keeps going past failures and
/// reports them all.
pub async fn cleanup(args: CleanupArgs) -> Result<()> {
    let mut errors = Vec::new();
    match Nft::new(crate::nft::Backend::Lib).delete_table() {
        Ok(true) => info!("table inet palisade removed"),
        Ok(false) => info!("table inet palisade was not there"),
        Err(e) => errors.push(e.to_string()),
    }
    if !args.no_routes {
        match Routes::new() {
            Ok(r) => match r.remove_all().await {
                Ok(n) => info!(removed = n, "pod routes removed"),
                Err(e) => errors.push(e.to_string()),
            },
            Err(e) => errors.push(e.to_string()),
        }
        match crate::overlay::Overlay::new() {
            Ok(o) => match o.remove_all().await {
                Ok(n) => info!(
                    removed = n,
                    "overlay devices removed (with their FDB and neighbour entries)"
                ),
                Err(e) => errors.push(e.to_string()),
            },
            Err(e) => errors.push(e.to_string()),
        }
    }
    match cniconf::remove(&args.cni_conf_dir) {
        Ok(true) => info!(dir = %args.cni_conf_dir.display(), "conflist removed"),
        Ok(false) => info!(dir = %args.cni_conf_dir.display(), "no conflist to remove"),
        Err(e) => errors.push(e.to_string()),
    }
    match crate::flow_log::writer::remove_socket(&args.state_dir) {
        Ok(true) => info!(dir = %args.state_dir.display(), "flow log socket removed"),
        Ok(false) => {}
        Err(e) => errors.push(e.to_string()),
    }
    if errors.is_empty() {
        Ok(())
    } else {
        for e in &errors {
            error!("{e}");
        }
        Err(Error::Usage(format!(
            "cleanup incomplete: {}",
            errors.join("; ")
        )))
    }
}

/// Lists every object once (until the source's `Synced`) into a state.
pub async fn list_once(args: &SourceArgs) -> Result<ClusterState> {
    let (tx, mut rx) = mpsc::channel::<SourceEvent>(SOURCE_CHANNEL);
    let task = start_source(args, tx).await?;
    let mut st = ClusterState::default();
    while let Some(ev) = rx.recv().await {
        match ev {
            SourceEvent::Changed { change, .. } => {
                st.apply(change);
            }
            SourceEvent::Rejected { object, error } => {
                warn!(%object, %error, "skipping invalid object")
            }
            SourceEvent::Synced => {
                task.abort();
                return Ok(st);
            }
        }
    }
    match task.await {
        Ok(Err(e)) => Err(e),
        Ok(Ok(())) => Err(Error::SourceEnded {
            when: "before its initial list completed",
        }),
        Err(e) => Err(Error::SourceTask(e)),
    }
}

/// `palisade-agent compile`: prints the full-replace transaction of one node.
pub async fn compile(args: CompileArgs) -> Result<()> {
    let src = SourceArgs {
        kubeconfig: None,
        manifests: Some(args.manifests.clone()),
    };
    let mut st = list_once(&src).await?;
    if let Some(dir) = &args.state_dir {
        let (good, bad) = palisade_contract::read_attachments(dir);
        for (p, e) in bad {
            warn!(record = %p.display(), error = %e, "skipping unreadable attachment record");
        }
        st.apply(Change::SetAttachments(good));
    }
    let d = compiled::compile(&st, &args.node_name)?;
    for w in d.warnings() {
        warn!("{w}");
    }
    print_out(&compiled::full_replace(&d))
}

/// Writes `text` and a newline to stdout; a reader that went away (`| head`) is no error.
fn print_out(text: &str) -> Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Error::io("write stdout", "-", e))
        }
        _ => Ok(()),
    }
}

/// `palisade-agent explain`.
pub async fn explain(args: ExplainArgs) -> Result<()> {
    let st = list_once(&args.source).await?;
    let text = match (&args.matrix, &args.from, &args.to) {
        (Some(namespaces), _, _) => {
            let m = compiled::explain_matrix(&st, namespaces, &args.port)?;
            if args.output == "json" {
                serde_json::to_string_pretty(&m.to_json())
                    .map_err(|e| Error::Usage(format!("--output json: {e}")))?
            } else {
                m.to_string()
            }
        }
        (None, Some(from), Some(to)) => compiled::explain(&st, from, to, &args.port)?,
        _ => return Err(Error::Usage("--from and --to, or --matrix".into())),
    };
    print_out(&text)
}
