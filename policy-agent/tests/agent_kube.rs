//! `palisade-agent run --kubeconfig` and `explain --kubeconfig` end to end against the in-test API
//! server (palisade-testkit's `apiserver`). The test thread moves into a network namespace of its own
//! (unshare; it dies with the thread): the API server binds its 127.0.0.1 and the agent, spawned from
//! this thread, runs there too, so nothing touches the host's namespace. Root required.

mod support;

use palisade_testkit::apiserver::ApiServer;
use serde_json::json;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Command;

const AGENT_LISTEN: &str = "127.0.0.1:9799";

async fn table() -> Option<String> {
    let out = Command::new("nft")
        .args(["-j", "list", "table", "inet", "palisade"])
        .output()
        .await
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

async fn readyz() -> Option<String> {
    let mut s = tokio::net::TcpStream::connect(AGENT_LISTEN).await.ok()?;
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

async fn wait_for(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn agent_enforces_what_the_api_server_says_and_explain_reads_it_too() {
    palisade_testkit::netns::enter_private_netns();
    let lo = std::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .expect("ip");
    assert!(lo.success());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let api = ApiServer::start().await;
        api.apply(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
            "spec": {"podCIDRs": ["10.244.1.0/24"]},
            "status": {"addresses": [{"type": "InternalIP", "address": "192.168.0.1"}]}}));
        api.apply(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": "demo", "labels": {"kubernetes.io/metadata.name": "demo"}}}));
        for (name, ip) in [("target", "10.244.1.10"), ("client", "10.244.1.11")] {
            api.apply(json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "demo", "labels": {"app": name}},
                "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "x"}]},
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}}));
        }
        api.apply(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "deny", "namespace": "demo"},
            "spec": {"podSelector": {"matchLabels": {"app": "target"}}, "policyTypes": ["Ingress"]}}));

        // Removed on drop, also when an assertion fails.
        let tmp = palisade_testkit::temp::temp_dir("pa-kube-");
        let dir = tmp.path().to_path_buf();
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            palisade_testkit::kubeconfig(&api.url()),
        )
        .expect("kubeconfig");
        let bin = env!("CARGO_BIN_EXE_palisade-agent");
        let d = |s: &str| dir.join(s).to_str().expect("utf8").to_string();
        let mut agent = Command::new(bin)
            .args(["run", "--node-name", "n1", "--kubeconfig", kubeconfig.to_str().unwrap()])
            .args(["--state-dir", &d("state"), "--cni-conf-dir", &d("net.d"), "--ipam-data-dir", &d("ipam")])
            .args(["--listen", AGENT_LISTEN, "--no-routes"])
            .env_remove("PALISADE_MANIFESTS")
            .kill_on_drop(true)
            .spawn()
            .expect("start agent");

        wait_for("readiness", async || readyz().await.is_some_and(|r| r.starts_with("HTTP/1.1 200"))).await;
        let deny = "ingress of pods selected by demo/deny";
        assert!(table().await.is_some_and(|t| t.contains(deny)), "deny policy not in the table");
        // Ready means pods can start here: the conflist is written before /readyz says 200.
        let conflist = dir.join("net.d").join(palisade_contract::CONFLIST_FILE);
        assert!(conflist.exists(), "/readyz said 200 before the conflist was written");

        let explain = |port: &'static str| {
            let kc = kubeconfig.clone();
            async move {
                let out = Command::new(bin)
                    .args(["explain", "--kubeconfig", kc.to_str().unwrap()])
                    .args(["--from", "demo/client", "--to", "demo/target", "--port", port])
                    .env_remove("PALISADE_MANIFESTS")
                    .output()
                    .await
                    .expect("explain");
                assert!(out.status.success(), "explain failed: {}", String::from_utf8_lossy(&out.stderr));
                String::from_utf8_lossy(&out.stdout).into_owned()
            }
        };
        let text = explain("80/TCP").await;
        assert!(text.contains("DENIED") && text.contains("demo/deny"), "{text}");

        // The policy goes away in the API: its chain leaves the table, explain says allowed.
        api.delete("NetworkPolicy", "demo", "deny");
        wait_for("the deleted policy to leave the table", async || table().await.is_some_and(|t| !t.contains(deny))).await;
        let text = explain("80/TCP").await;
        assert!(text.contains("ALLOWED"), "{text}");

        agent.start_kill().expect("kill agent");
        let _ = agent.wait().await;
        drop(tmp);
    });
}
