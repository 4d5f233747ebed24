//! Kubernetes objects in the lab's manifest directory (apply, delete, labels) and the pods behind
//! them: sandboxes wired by the CNI chain, their servers, their phases.

use super::{
    check_interrupted, node_underlay_v4, node_underlay_v6, Lab, LabState, NodeState, PodState,
};
use crate::cni;
use crate::error::{LabError, Result};
use crate::k8s::{self, LabelEdit, ObjKey};
use crate::netns;
use crate::process;
use serde_json::Value;
use std::net::IpAddr;

impl Lab {
    /// Applies objects as `kubectl apply` would: namespaces first, pods last. Pods that exist get
    /// their labels updated (a pod's spec is immutable); new pods are wired and started.
    pub fn apply(&mut self, objects: Vec<Value>) -> Result<()> {
        let mut objects = objects;
        objects.sort_by_key(|o| match o.get("kind").and_then(Value::as_str) {
            Some("Namespace") => 0,
            Some("Pod") => 2,
            _ => 1,
        });
        for obj in objects {
            check_interrupted()?;
            let key = k8s::key_of(&obj)?;
            match key.kind.as_str() {
                "Namespace" => {
                    let mut obj = obj;
                    // The API server sets this label on every namespace; policies select by it.
                    k8s::edit_labels(
                        &mut obj,
                        &[LabelEdit::Set(
                            k8s::NAMESPACE_NAME_LABEL.into(),
                            key.name.clone(),
                        )],
                    )?;
                    self.manifests.write(&obj)?;
                }
                "Pod" => self.apply_pod(obj, &key)?,
                "Node" => {
                    return Err(LabError::Invalid(format!(
                        "{key}: the lab owns Node objects; do not apply them"
                    )));
                }
                _ => {
                    self.require_namespace(&key)?;
                    self.manifests.write(&obj)?;
                }
            }
        }
        Ok(())
    }

    fn require_namespace(&self, key: &ObjKey) -> Result<()> {
        if key.namespace.is_empty()
            || self
                .read_object(&ObjKey::new("Namespace", "", &key.namespace))
                .is_ok()
        {
            Ok(())
        } else {
            Err(LabError::Invalid(format!(
                "{key}: namespace {:?} not found (apply the Namespace first)",
                key.namespace
            )))
        }
    }

    /// Reads an object back from the manifest directory.
    pub fn read_object(&self, key: &ObjKey) -> Result<Value> {
        let path = self.manifests.dir.join(key.file_name());
        let text = std::fs::read_to_string(&path)
            .map_err(|_| LabError::Invalid(format!("{key} not found")))?;
        crate::yaml::from_str(&text, &path.display().to_string())
    }

    fn apply_pod(&mut self, obj: Value, key: &ObjKey) -> Result<()> {
        self.require_namespace(key)?;
        let pod_key = format!("{}/{}", key.namespace, key.name);
        // A pod without a sandbox (Pending, terminated) exists as its object only.
        if self.state.pods.contains_key(&pod_key) || self.read_object(key).is_ok() {
            let mut current = self.read_object(key)?;
            let labels = obj
                .get("metadata")
                .and_then(|m| m.get("labels"))
                .cloned()
                .unwrap_or(Value::Null);
            k8s::set_path(&mut current, &["metadata", "labels"], labels)?;
            self.manifests.write(&current)?;
            return Ok(());
        }
        if k8s::requested_phase(&obj)? == Some(k8s::PodPhase::Pending) {
            return self.create_pending_pod(obj, key);
        }
        self.create_pod(obj, key)
    }

    fn create_pod(&mut self, mut obj: Value, key: &ObjKey) -> Result<()> {
        let node_name = match k8s::get_str(&obj, &["spec", "nodeName"]) {
            Some(n) => n.to_string(),
            None => {
                // Spread unscheduled pods round-robin, as a scheduler might.
                let n = &self.state.nodes[(self.state.counter as usize) % self.state.nodes.len()];
                let n = n.name.clone();
                k8s::set_path(&mut obj, &["spec", "nodeName"], Value::from(n.as_str()))?;
                n
            }
        };
        let node = self.node(&node_name)?.clone();
        self.state.counter += 1;
        let seq = self.state.counter;
        let uid = match k8s::get_str(&obj, &["metadata", "uid"]) {
            Some(u) => u.to_string(),
            None => {
                let u = pseudo_uid(&self.state.name, &key.namespace, &key.name, seq);
                k8s::set_path(&mut obj, &["metadata", "uid"], Value::from(u.as_str()))?;
                u
            }
        };
        if k8s::host_network(&obj) {
            return self.create_host_network_pod(obj, key, &node, uid);
        }
        let runtime_args = cni::RuntimeArgs {
            port_mappings: k8s::host_ports(&obj)?,
            ips: k8s::requested_ips(&obj)?,
        };
        let container_id = format!("pl{}{}", self.state.name, seq);
        let pod_ns = self.new_netns(&format!("p{seq}"))?;
        let pod_key = format!("{}/{}", key.namespace, key.name);
        self.state.pods.insert(
            pod_key.clone(),
            PodState {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                uid: uid.clone(),
                node: node.name.clone(),
                netns: pod_ns.clone(),
                container_id: container_id.clone(),
                ips: Vec::new(),
                cni_result: None,
                server_pid: None,
                host_network: false,
                runtime_args: runtime_args.clone(),
            },
        );
        self.state.save()?;
        let pod_netns_path = netns::path(&pod_ns);
        let inv = cni::Invocation {
            node_netns: &node.netns,
            container_id: &container_id,
            pod_netns_path: &pod_netns_path,
            pod_namespace: &key.namespace,
            pod_name: &key.name,
            pod_uid: &uid,
        };
        // The agent's whole conflist, as the runtime runs it. A failed ADD (or a result without
        // the addresses asked for) tears the sandbox down again, as a runtime does.
        let added = cni::read_conflist(&Self::conflist_path(&node))
            .and_then(|c| cni::Chain::from_conflist(&c))
            .and_then(|chain| {
                cni::add(
                    &chain,
                    &cni::cni_path(&self.state.bins.dir),
                    &runtime_args,
                    &inv,
                )
            })
            .and_then(|result| {
                let ips = cni::result_ips(&result);
                if ips.is_empty() {
                    return Err(LabError::Parse {
                        what: format!("CNI ADD result for pod {pod_key}"),
                        detail: format!("no ips: {result}"),
                    });
                }
                if let Some(ip) = runtime_args.ips.iter().find(|ip| !ips.contains(ip)) {
                    return Err(LabError::Invalid(format!(
                        "pod {pod_key} asked for {ip} ({}) and got {ips:?}: the address is taken or outside {}'s podCIDRs",
                        k8s::IPS_ANNOTATION,
                        node.name
                    )));
                }
                Ok(result)
            });
        let result = match added {
            Ok(r) => r,
            Err(e) => {
                let errors = self.discard_sandbox(&pod_key);
                return Err(if errors.is_empty() {
                    e
                } else {
                    LabError::Command {
                        what: format!("creating pod {pod_key}"),
                        detail: format!(
                            "{e}; then tearing its sandbox down: {}",
                            errors.join("; ")
                        ),
                    }
                });
            }
        };
        let ips = cni::result_ips(&result);
        if let Some(p) = self.state.pods.get_mut(&pod_key) {
            p.ips = ips.clone();
            p.cni_result = Some(result);
        }
        self.state.save()?;
        self.start_server(&pod_key, &obj, &pod_ns, &[])?;
        self.write_running(obj, &ips, &node)
    }

    /// `palisade-probe serve` in `netns` on the pod's declared TCP and UDP container ports.
    /// Starts the pod's server in `netns`; `udp_listen`: the addresses its UDP sockets bind (a
    /// hostNetwork pod's: its node's), empty for all.
    fn start_server(
        &mut self,
        pod_key: &str,
        obj: &Value,
        netns: &str,
        udp_listen: &[IpAddr],
    ) -> Result<()> {
        let pod_key = pod_key.to_string();
        let key = k8s::key_of(obj)?;
        let ports = k8s::container_ports(obj);
        let tcp: Vec<String> = ports
            .iter()
            .filter(|(_, p)| p == "TCP")
            .map(|(n, _)| n.to_string())
            .collect();
        let udp: Vec<String> = ports
            .iter()
            .filter(|(_, p)| p == "UDP")
            .map(|(n, _)| n.to_string())
            .collect();
        for (port, proto) in ports.iter().filter(|(_, p)| p != "TCP" && p != "UDP") {
            tracing::warn!(pod = %pod_key, port, protocol = %proto, "no server for this protocol (the kernel has no sockets for it)");
        }
        let mut args = vec!["serve".to_string(), "--name".to_string(), pod_key.clone()];
        if !tcp.is_empty() {
            args.extend(["--tcp".to_string(), tcp.join(",")]);
        }
        if !udp.is_empty() {
            args.extend(["--udp".to_string(), udp.join(",")]);
            if !udp_listen.is_empty() {
                let addrs: Vec<String> = udp_listen.iter().map(IpAddr::to_string).collect();
                args.extend(["--udp-listen".to_string(), addrs.join(",")]);
            }
        }
        let log = self
            .state
            .run_dir
            .join(format!("pod-{}-{}.log", key.namespace, key.name));
        let pid = process::spawn_in_netns(
            &self.state.name,
            netns,
            &self.state.bins.probe(),
            &args,
            &log,
        )?;
        if let Some(p) = self.state.pods.get_mut(&pod_key) {
            p.server_pid = Some(pid);
        }
        self.state.save()?;
        Ok(())
    }

    /// Writes the Pod object as the kubelet reports a started pod: Running, its addresses, hostIP.
    fn write_running(&mut self, mut obj: Value, ips: &[IpAddr], node: &NodeState) -> Result<()> {
        let first = ips
            .first()
            .ok_or_else(|| LabError::Invalid("a running pod needs an address".into()))?;
        // What the kubelet reports once the sandbox is up.
        let pod_ips: Vec<Value> = ips
            .iter()
            .map(|ip| {
                let mut m = serde_json::Map::new();
                m.insert("ip".into(), Value::from(ip.to_string()));
                Value::Object(m)
            })
            .collect();
        k8s::set_path(&mut obj, &["status", "phase"], Value::from("Running"))?;
        k8s::set_path(
            &mut obj,
            &["status", "podIP"],
            Value::from(first.to_string()),
        )?;
        k8s::set_path(&mut obj, &["status", "podIPs"], Value::Array(pod_ips))?;
        k8s::set_path(
            &mut obj,
            &["status", "hostIP"],
            Value::from(node_underlay_v4(node.index).to_string()),
        )?;
        self.manifests.write(&obj)?;
        Ok(())
    }

    /// A `hostNetwork: true` pod: no sandbox, no CNI; its server runs in the node's namespace and
    /// its status carries the node's addresses, as the kubelet reports them.
    fn create_host_network_pod(
        &mut self,
        obj: Value,
        key: &ObjKey,
        node: &NodeState,
        uid: String,
    ) -> Result<()> {
        if k8s::annotation(&obj, k8s::IPS_ANNOTATION).is_some() {
            return Err(LabError::Invalid(format!(
                "{key}: a hostNetwork pod has its node's addresses; drop {}",
                k8s::IPS_ANNOTATION
            )));
        }
        let pod_key = format!("{}/{}", key.namespace, key.name);
        let ips = vec![
            IpAddr::V4(node_underlay_v4(node.index)),
            IpAddr::V6(node_underlay_v6(node.index)),
        ];
        self.state.pods.insert(
            pod_key.clone(),
            PodState {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                uid,
                node: node.name.clone(),
                netns: node.netns.clone(),
                container_id: String::new(),
                ips: ips.clone(),
                cni_result: None,
                server_pid: None,
                host_network: true,
                runtime_args: cni::RuntimeArgs::default(),
            },
        );
        self.state.save()?;
        self.start_server(&pod_key, &obj, &node.netns, &ips)?;
        self.write_running(obj, &ips, node)
    }

    /// A Pod that is scheduled but not started (`palisade-lab/phase: Pending`): its object says
    /// Pending and has no address; no sandbox exists until `set_pod_phase(.., Running)`.
    fn create_pending_pod(&mut self, mut obj: Value, key: &ObjKey) -> Result<()> {
        // Refuse now what would fail at start.
        k8s::host_ports(&obj)?;
        k8s::requested_ips(&obj)?;
        let node = match k8s::get_str(&obj, &["spec", "nodeName"]) {
            Some(n) => n.to_string(),
            None => {
                let n = self.state.nodes[(self.state.counter as usize) % self.state.nodes.len()]
                    .name
                    .clone();
                k8s::set_path(&mut obj, &["spec", "nodeName"], Value::from(n.as_str()))?;
                n
            }
        };
        self.node(&node)?;
        self.state.counter += 1;
        if k8s::get_str(&obj, &["metadata", "uid"]).is_none() {
            let u = pseudo_uid(
                &self.state.name,
                &key.namespace,
                &key.name,
                self.state.counter,
            );
            k8s::set_path(&mut obj, &["metadata", "uid"], Value::from(u.as_str()))?;
        }
        let mut status = serde_json::Map::new();
        status.insert("phase".into(), Value::from("Pending"));
        k8s::set_path(&mut obj, &["status"], Value::Object(status))?;
        self.state.save()?;
        self.manifests.write(&obj).map(|_| ())
    }

    /// Moves a pod on as the kubelet would: Pending → Running creates its sandbox (the whole CNI
    /// chain) and starts it; Pending or Running → Succeeded/Failed stops it and removes its
    /// sandbox (CNI DEL: its address goes back to IPAM, free for a new pod) while the Pod object
    /// keeps `status.podIPs`, as a terminated pod's does. Phases never move back.
    pub fn set_pod_phase(
        &mut self,
        namespace: &str,
        name: &str,
        phase: k8s::PodPhase,
    ) -> Result<()> {
        use k8s::PodPhase::{Failed, Pending, Running, Succeeded};
        let key = ObjKey::new("Pod", namespace, name);
        let pod_key = format!("{namespace}/{name}");
        let mut obj = self.read_object(&key)?;
        let running = self.state.pods.contains_key(&pod_key);
        let current = if running {
            Running
        } else {
            k8s::phase(&obj).unwrap_or(Pending)
        };
        match (current, phase) {
            (from, to) if from == to => Ok(()),
            (Pending, Running) => {
                k8s::remove_annotation(&mut obj, k8s::PHASE_ANNOTATION);
                if let Some(m) = obj.as_object_mut() {
                    m.remove("status");
                }
                self.create_pod(obj, &key)
            }
            (Pending | Running, Succeeded | Failed) => {
                k8s::set_path(&mut obj, &["status", "phase"], Value::from(phase.as_str()))?;
                self.manifests.write(&obj)?;
                let errors = self.discard_sandbox(&pod_key);
                if errors.is_empty() {
                    Ok(())
                } else {
                    Err(LabError::Teardown(errors))
                }
            }
            (from, to) => Err(LabError::Invalid(format!(
                "pod {pod_key} is {from}; a phase moves only Pending -> Running -> Succeeded/Failed, never to {to}"
            ))),
        }
    }

    /// Stops a pod, removes its sandbox (CNI DEL of the whole chain, its namespace; nothing for a
    /// hostNetwork pod but its process) and forgets it; returns what failed along the way.
    fn discard_sandbox(&mut self, pod_key: &str) -> Vec<String> {
        let mut errors = Vec::new();
        let Some(pod) = self.state.pods.remove(pod_key) else {
            return errors;
        };
        teardown_pod(&self.state, &pod, &mut errors);
        if !pod.host_network {
            self.state.netns.retain(|n| *n != pod.netns);
        }
        if let Err(e) = self.state.save() {
            errors.push(e.to_string());
        }
        errors
    }

    /// Pods that exist as objects only (Pending, Succeeded, Failed): `(namespace/name, phase,
    /// status.podIPs)`, sorted.
    pub fn pods_without_sandbox(&self) -> Result<Vec<(String, String, Vec<String>)>> {
        let mut out = Vec::new();
        for obj in k8s::read_path(&self.manifests.dir)? {
            let key = k8s::key_of(&obj)?;
            let pod_key = format!("{}/{}", key.namespace, key.name);
            if key.kind != "Pod" || self.state.pods.contains_key(&pod_key) {
                continue;
            }
            let phase = k8s::get_str(&obj, &["status", "phase"])
                .unwrap_or("Pending")
                .to_string();
            let ips = obj
                .get("status")
                .and_then(|s| s.get("podIPs"))
                .and_then(Value::as_array)
                .map(|l| {
                    l.iter()
                        .filter_map(|i| i.get("ip").and_then(Value::as_str).map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            out.push((pod_key, phase, ips));
        }
        out.sort();
        Ok(out)
    }

    /// Deletes objects as `kubectl delete` would; deleting a namespace deletes what lives in it.
    pub fn delete(&mut self, objects: Vec<Value>) -> Result<()> {
        for obj in objects {
            let key = k8s::key_of(&obj)?;
            self.delete_key(&key)?;
        }
        Ok(())
    }

    /// Deletes one object by key.
    pub fn delete_key(&mut self, key: &ObjKey) -> Result<()> {
        match key.kind.as_str() {
            "Pod" => self.delete_pod(&key.namespace, &key.name),
            "Namespace" => {
                let pods: Vec<String> = self
                    .state
                    .pods
                    .values()
                    .filter(|p| p.namespace == key.name)
                    .map(|p| p.name.clone())
                    .collect();
                for p in pods {
                    self.delete_pod(&key.name, &p)?;
                }
                for other in self.objects_in(&key.name)? {
                    self.manifests.remove(&other)?;
                }
                self.manifests.remove(key)
            }
            "Node" => Err(LabError::Invalid(format!(
                "{key}: the lab owns Node objects"
            ))),
            _ => self.manifests.remove(key),
        }
    }

    /// Keys of the objects in the manifest directory.
    pub fn objects(&self) -> Result<Vec<ObjKey>> {
        let mut out = Vec::new();
        for v in k8s::read_path(&self.manifests.dir)? {
            out.push(k8s::key_of(&v)?);
        }
        Ok(out)
    }

    fn objects_in(&self, namespace: &str) -> Result<Vec<ObjKey>> {
        Ok(self
            .objects()?
            .into_iter()
            .filter(|k| k.namespace == namespace)
            .collect())
    }

    /// Deletes every NetworkPolicy in every namespace, and every ClusterNetworkPolicy.
    pub fn delete_all_policies(&mut self) -> Result<()> {
        for k in self
            .objects()?
            .into_iter()
            .filter(|k| k.kind == "NetworkPolicy" || k.kind == "ClusterNetworkPolicy")
        {
            self.manifests.remove(&k)?;
        }
        Ok(())
    }

    fn delete_pod(&mut self, namespace: &str, name: &str) -> Result<()> {
        let pod_key = format!("{namespace}/{name}");
        let obj_key = ObjKey::new("Pod", namespace, name);
        if !self.state.pods.contains_key(&pod_key) {
            // A pod without a sandbox (Pending, Succeeded, Failed) is only its object.
            self.read_object(&obj_key).map_err(|_| {
                LabError::Invalid(format!("no pod {pod_key} in lab {}", self.state.name))
            })?;
            return self.manifests.remove(&obj_key);
        }
        self.manifests.remove(&obj_key)?;
        let errors = self.discard_sandbox(&pod_key);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(LabError::Teardown(errors))
        }
    }

    /// `label pod ns/name k=v k-`.
    pub fn label_pod(&mut self, namespace: &str, name: &str, edits: &[LabelEdit]) -> Result<()> {
        let key = ObjKey::new("Pod", namespace, name);
        let mut obj = self.read_object(&key)?;
        k8s::edit_labels(&mut obj, edits)?;
        self.manifests.write(&obj).map(|_| ())
    }

    /// Replaces an object's labels wholesale (reverting label changes).
    pub fn restore_labels(&mut self, key: &ObjKey, labels: Value) -> Result<()> {
        let mut obj = self.read_object(key)?;
        k8s::set_path(&mut obj, &["metadata", "labels"], labels)?;
        self.manifests.write(&obj).map(|_| ())
    }

    /// `label ns name k=v k-` (the `kubernetes.io/metadata.name` label is the API server's).
    pub fn label_namespace(&mut self, name: &str, edits: &[LabelEdit]) -> Result<()> {
        let touches_name_label = edits.iter().any(|e| match e {
            LabelEdit::Set(k, _) | LabelEdit::Remove(k) => k == k8s::NAMESPACE_NAME_LABEL,
        });
        if touches_name_label {
            return Err(LabError::Invalid(format!(
                "{} is set by the API server and cannot be changed",
                k8s::NAMESPACE_NAME_LABEL
            )));
        }
        let key = ObjKey::new("Namespace", "", name);
        let mut obj = self.read_object(&key)?;
        k8s::edit_labels(&mut obj, edits)?;
        self.manifests.write(&obj).map(|_| ())
    }
}

/// A stable, UUID-shaped id for a pod without `metadata.uid`.
fn pseudo_uid(lab: &str, ns: &str, name: &str, seq: u64) -> String {
    let mut h: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    for b in format!("{lab}/{ns}/{name}/{seq}").bytes() {
        h ^= u128::from(b);
        h = h.wrapping_mul(0x0000_0000_0100_0000_0000_0000_0000_013b);
    }
    let s = format!("{h:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &s[0..8],
        &s[8..12],
        &s[12..16],
        &s[16..20],
        &s[20..32]
    )
}

pub(super) fn teardown_pod(state: &LabState, pod: &PodState, errors: &mut Vec<String>) {
    if let Some(pid) = pod.server_pid {
        process::stop(pid, &state.name);
    }
    // A hostNetwork pod is a process in its node's namespace: nothing else is its own.
    if pod.host_network {
        return;
    }
    if let Some(node) = state.nodes.iter().find(|n| n.name == pod.node) {
        let conflist = Lab::conflist_path(node);
        if netns::exists(&node.netns) && conflist.is_file() {
            let pod_netns_path = netns::path(&pod.netns);
            let inv = cni::Invocation {
                node_netns: &node.netns,
                container_id: &pod.container_id,
                pod_netns_path: &pod_netns_path,
                pod_namespace: &pod.namespace,
                pod_name: &pod.name,
                pod_uid: &pod.uid,
            };
            let res = cni::read_conflist(&conflist)
                .and_then(|c| cni::Chain::from_conflist(&c))
                .and_then(|chain| {
                    cni::del(
                        &chain,
                        &cni::cni_path(&state.bins.dir),
                        &pod.runtime_args,
                        pod.cni_result.as_ref(),
                        &inv,
                    )
                });
            if let Err(e) = res {
                errors.push(e.to_string());
            }
        }
    }
    if let Err(e) = netns::delete(&pod.netns) {
        errors.push(e.to_string());
    }
}
