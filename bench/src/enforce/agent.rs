//! The agent under test: its directories and `run` arguments, its record for the server pod, its
//! CPU and memory (/proc), and its metrics endpoint.

use super::*;

/// A resync period no benchmark run reaches: the agent's periodic full replace stays out of the
/// figures unless a run asks for it (`enforce-bench --resync-seconds`).
pub const NO_RESYNC: u64 = 3600;

/// CPU seconds (user + system, its own and its waited-for children's: the agent's `nft` listings)
/// and memory of a process, from /proc.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct ProcStats {
    pub cpu_seconds: f64,
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

pub fn proc_stats(pid: u32) -> Result<ProcStats> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(io_err(format!("reading /proc/{pid}/stat")))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime, stime, cutime, cstime are fields 14-17 of stat, i.e. 11-14 after the state field
    // (index 0). A child's time is in cutime/cstime once it has exited and been waited for.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(io_err(format!("reading /proc/{pid}/status")))?;
    let kib = |key: &str| {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(ProcStats {
        cpu_seconds: (ticks(11) + ticks(12) + ticks(13) + ticks(14)) / hz,
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
    })
}

/// Value of an unlabelled (or exactly labelled) sample in Prometheus text.
pub fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

pub(super) fn fetch_metrics(lab: &Lab, exe: &str) -> String {
    run_in(
        &lab.node2,
        exe,
        &["fetch-metrics", "--addr", "127.0.0.1:9799"],
        None,
    )
    .unwrap_or_default()
}

/// Sum of every sample of a metric family (any labels) in Prometheus text; `None` if it has none.
pub fn metric_sum(text: &str, family: &str) -> Option<f64> {
    let mut found = None;
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = l.strip_prefix(family) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        if let Some(v) = rest
            .rsplit_once(' ')
            .and_then(|(_, v)| v.trim().parse::<f64>().ok())
        {
            found = Some(found.unwrap_or(0.0) + v);
        }
    }
    found
}

/// `p` as a command-line argument.
pub fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| Error::Invalid(format!("path {} is not UTF-8", p.display())))
}

/// The directories of one benchmark agent under a work directory: manifests, state (attachment
/// records, node lock), CNI config and IPAM data.
pub struct AgentDirs {
    pub manifests: PathBuf,
    pub state: PathBuf,
    pub conf: PathBuf,
    pub ipam: PathBuf,
}

impl AgentDirs {
    /// Creates them under `work`.
    pub fn create(work: &Path) -> Result<AgentDirs> {
        let dirs = AgentDirs {
            manifests: work.join("manifests"),
            state: work.join("state"),
            conf: work.join("cni"),
            ipam: work.join("ipam"),
        };
        for d in [&dirs.manifests, &dirs.state, &dirs.conf, &dirs.ipam] {
            std::fs::create_dir_all(d).map_err(io_err(format!("creating {}", d.display())))?;
        }
        Ok(dirs)
    }

    /// `palisade-agent run` arguments of a benchmark's agent in node 2: `source` (its source flags,
    /// [`super::store::Store::agent_args`]), these directories, metrics on loopback, no routes, a
    /// resync every `resync_seconds` ([`NO_RESYNC`]: none during the run).
    /// Waits until the agent wrote its conflist (its first commit is done: it has synced), at most
    /// five minutes; `log` is named in the error. Returns how long it took.
    pub fn wait_conflist(&self, log: &Path) -> Result<Duration> {
        let started = Instant::now();
        let conflist = self.conf.join(palisade_contract::CONFLIST_FILE);
        while !conflist.exists() {
            if started.elapsed() > Duration::from_secs(300) {
                return Err(Error::Invalid(format!(
                    "agent wrote no conflist in 300 s; see {}",
                    log.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(started.elapsed())
    }

    pub fn run_args(&self, source: &[String], resync_seconds: u64) -> Result<Vec<String>> {
        let mut args: Vec<String> = ["run", "--node-name", AGENT_NODE]
            .into_iter()
            .map(String::from)
            .collect();
        args.extend(source.iter().cloned());
        for (flag, dir) in [
            ("--state-dir", &self.state),
            ("--cni-conf-dir", &self.conf),
            ("--ipam-data-dir", &self.ipam),
        ] {
            args.extend([flag.to_string(), path_str(dir)?.to_string()]);
        }
        args.extend(
            [
                "--listen",
                "127.0.0.1:9799",
                "--no-routes",
                "--resync-seconds",
            ]
            .map(String::from),
        );
        args.push(resync_seconds.to_string());
        Ok(args)
    }
}

/// The server pod's attachment record, as the plugin writes it on ADD: the source guard then admits
/// what the server's veth sends from its own address.
pub(super) fn write_server_record(state: &Path) -> Result<()> {
    let record = palisade_contract::Attachment {
        container_id: crate::datapath::topo::container_id("server"),
        ifname: crate::datapath::topo::POD_IFNAME.into(),
        netns: String::new(),
        host_veth: crate::datapath::topo::host_veth("server"),
        ips: vec![SERVER_IP
            .parse()
            .map_err(|e| Error::Invalid(format!("server address {SERVER_IP}: {e}")))?],
        pod_namespace: Some(crate::datapath::workload::BENCH_NS.into()),
        pod_name: Some("server".into()),
        pod_uid: None,
        pending: false,
    };
    let dir = palisade_contract::attachments_dir(state);
    std::fs::create_dir_all(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
    let path = palisade_contract::attachment_path(state, &record.container_id, &record.ifname);
    let text = serde_json::to_vec(&record).map_err(|e| Error::Parse {
        what: "attachment record".into(),
        detail: e.to_string(),
    })?;
    std::fs::write(&path, text).map_err(|source| Error::Write { path, source })
}

/// Fetches `path` from an HTTP/1.0 server (the agent's /metrics), inside whatever namespace we run in.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<String> {
    palisade_testkit::http::get(addr, path, Duration::from_secs(5))
        .map(|r| r.body)
        .map_err(|e| Error::Invalid(format!("GET {path}: {e}")))
}
