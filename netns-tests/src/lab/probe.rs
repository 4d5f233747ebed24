//! Probing connectivity: `palisade-probe connect` batches from pods and nodes, the matrix records
//! they yield, and the ClusterIP stand-in probes go through.

use super::Lab;
use crate::error::{LabError, Result};
use crate::netns;
use crate::probe::{Outcome, Protocol, Target};
use crate::process;
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

/// Default probe timeout per connection.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_millis(400);

/// Address family of probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn pick(self, ips: &[IpAddr]) -> Option<IpAddr> {
        ips.iter()
            .copied()
            .find(|ip| ip.is_ipv4() == (self == Family::V4))
    }
}

impl Lab {
    /// Runs targets from inside one namespace with one `palisade-probe connect`.
    pub fn probe_from_netns(
        &self,
        netns: &str,
        targets: &[Target],
        timeout: Duration,
    ) -> Result<Vec<Outcome>> {
        let mut batch = self.spawn_probe(netns, targets, timeout)?;
        batch.finish()
    }

    fn spawn_probe(
        &self,
        netns: &str,
        targets: &[Target],
        timeout: Duration,
    ) -> Result<ProbeBatch> {
        use std::io::Write;
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", netns])
            .arg(self.state.bins.probe())
            .args(["connect", "--timeout-ms", &timeout.as_millis().to_string()])
            .env(process::MARKER_ENV, &self.state.name)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let what = format!("palisade-probe connect in {netns}");
        let mut child = cmd.spawn().map_err(|e| LabError::Command {
            what: what.clone(),
            detail: e.to_string(),
        })?;
        let input = serde_json::to_vec(targets).map_err(|e| LabError::Parse {
            what: what.clone(),
            detail: e.to_string(),
        })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(&input).map_err(|e| LabError::Command {
                what: what.clone(),
                detail: e.to_string(),
            })?;
        }
        Ok(ProbeBatch {
            child: Some(child),
            what,
        })
    }

    /// Targets for every pod (except `skip`) on each (port, protocol), ids `ns/name|port|proto`.
    fn pod_targets(
        &self,
        skip: Option<&str>,
        ports: &[(u16, Protocol)],
        family: Family,
    ) -> Vec<Target> {
        let mut out = Vec::new();
        for to in self.state.pods.values() {
            if Some(to.key().as_str()) == skip {
                continue;
            }
            let Some(ip) = family.pick(&to.ips) else {
                continue;
            };
            for &(port, protocol) in ports {
                out.push(Target {
                    id: format!("{}|{port}|{}", to.key(), protocol.as_str()),
                    addr: SocketAddr::new(ip, port),
                    protocol,
                });
            }
        }
        out
    }

    /// Probes every ordered pair of distinct pods on each (port, protocol): one probe process per
    /// source pod, all in parallel.
    pub fn probe_matrix(
        &self,
        ports: &[(u16, Protocol)],
        family: Family,
        timeout: Duration,
    ) -> Result<Vec<ProbeRecord>> {
        let mut batches = Vec::new();
        for from in self.state.pods.values() {
            let targets = self.pod_targets(Some(&from.key()), ports, family);
            batches.push((
                from.key(),
                self.spawn_probe(&from.netns, &targets, timeout)?,
            ));
        }
        let mut records = Vec::new();
        for (from, mut batch) in batches {
            for o in batch.finish()? {
                records.push(ProbeRecord::from_outcome(&from, &o));
            }
        }
        records.sort();
        Ok(records)
    }

    /// Probes every pod from a node's own namespace (what the kubelet's probes do).
    pub fn probe_from_node(
        &self,
        node: &str,
        ports: &[(u16, Protocol)],
        family: Family,
        timeout: Duration,
    ) -> Result<Vec<ProbeRecord>> {
        let n = self.node(node)?;
        let targets = self.pod_targets(None, ports, family);
        Ok(self
            .probe_from_netns(&n.netns, &targets, timeout)?
            .iter()
            .map(|o| ProbeRecord::from_outcome(node, o))
            .collect())
    }

    /// Installs a ClusterIP stand-in in a node's namespace: `vip:port` DNAT to the backend pod,
    /// and the backend reaching itself through the VIP masqueraded (kube-proxy's hairpin
    /// `KUBE-MARK-MASQ`: a pod drops a packet from its own address as a martian). This is what
    /// kube-proxy does around our chains: DNAT before them, SNAT after.
    pub fn add_cluster_ip(
        &self,
        node: &str,
        vip: Ipv4Addr,
        port: u16,
        protocol: Protocol,
        backend: &str,
    ) -> Result<()> {
        let n = self.node(node)?;
        let pod = self.pod(backend)?;
        let ip = Family::V4
            .pick(&pod.ips)
            .ok_or_else(|| LabError::Invalid(format!("pod {backend} has no IPv4")))?;
        let proto = protocol.as_str();
        let script = format!(
            "table ip pl_svc {{\n  chain svc_prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    ip daddr {vip} {proto} dport {port} dnat to {ip}:{port}\n  }}\n  chain svc_postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    ip saddr {ip} ip daddr {ip} masquerade\n  }}\n}}\n"
        );
        netns::nft(&n.netns, &script)
    }
}

/// One running `palisade-probe connect`.
struct ProbeBatch {
    child: Option<std::process::Child>,
    what: String,
}

impl ProbeBatch {
    fn finish(&mut self) -> Result<Vec<Outcome>> {
        let child = self
            .child
            .take()
            .ok_or_else(|| LabError::Invalid("probe already collected".into()))?;
        let out = child.wait_with_output().map_err(|e| LabError::Command {
            what: self.what.clone(),
            detail: e.to_string(),
        })?;
        if !out.status.success() {
            return Err(LabError::Command {
                what: self.what.clone(),
                detail: format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        serde_json::from_slice(&out.stdout).map_err(|e| LabError::Parse {
            what: self.what.clone(),
            detail: e.to_string(),
        })
    }
}

impl Drop for ProbeBatch {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One probe of a matrix, as printed by `probe --json` (schema in netns-tests/README.md).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ProbeRecord {
    pub from: String,
    pub to: String,
    pub port: u16,
    /// `TCP` or `UDP`.
    pub protocol: String,
    pub connected: bool,
}

impl ProbeRecord {
    fn from_outcome(from: &str, o: &Outcome) -> Self {
        let to = o.id.split('|').next().unwrap_or(&o.id).to_string();
        ProbeRecord {
            from: from.to_string(),
            to,
            port: o.addr.port(),
            protocol: o.protocol.to_string(),
            connected: o.connected,
        }
    }
}
