//! The `palisade` binary exec'd exactly as a runtime does (env + stdin, chained, results cached
//! and replayed), inside a node namespace, with pods as namespaces. Must run as root.

use palisade_testkit::process::KillOnDrop;
use palisade_testkit::wait::wait_until;
use palisade_tests::*;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

/// One node: its namespace, its directories, and a runtime executing plugins in it.
struct Fixture {
    pods: Vec<Netns>,
    rt: Runtime,
    dir: TempDir,
    node: Netns,
}

impl Fixture {
    fn new() -> Self {
        let node = Netns::new("pn");
        let dir = temp_dir("palisade-cni-test-");
        let rt = Runtime::new(&node, &dir.path().join("results"));
        Fixture {
            pods: Vec::new(),
            rt,
            dir,
            node,
        }
    }

    fn with_table() -> Self {
        let f = Self::new();
        create_pending_table(&f.node);
        f
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn ipam_dir(&self) -> PathBuf {
        self.dir.path().join("ipam")
    }

    /// The palisade plugin config with the given ranges and extra keys.
    fn plugin(&self, ranges: Value, extra: Value) -> Value {
        let mut p = json!({
            "type": "palisade",
            "mtu": 1400,
            "stateDir": self.state_dir(),
            "ipam": { "type": "palisade", "dataDir": self.ipam_dir(), "ranges": ranges }
        });
        if let (Some(p), Some(e)) = (p.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                p.insert(k.clone(), v.clone());
            }
        }
        p
    }

    fn list(&self, version: &str, plugins: Vec<Value>) -> Value {
        json!({ "cniVersion": version, "name": "testnet", "plugins": plugins })
    }

    fn dual(&self) -> Value {
        self.list(
            "1.1.0",
            vec![self.plugin(
                json!([[{"subnet":"10.88.0.0/24"}],[{"subnet":"fd00:88::/64"}]]),
                json!({}),
            )],
        )
    }

    fn pod(&mut self) -> (String, usize) {
        let ns = Netns::new("pp");
        let path = ns.path().display().to_string();
        self.pods.push(ns);
        (path, self.pods.len() - 1)
    }

    /// Reservations in the IPAM store (files named by an address).
    fn reserved(&self) -> Vec<String> {
        std::fs::read_dir(self.ipam_dir().join("testnet"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_string))
                    .filter(|n| n.parse::<std::net::IpAddr>().is_ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn records(&self) -> Vec<palisade_contract::Attachment> {
        let (good, bad) = palisade_contract::read_attachments(&self.state_dir());
        assert!(bad.is_empty(), "unreadable records: {bad:?}");
        good
    }

    fn pal_links(&self) -> Vec<String> {
        self.node
            .links()
            .into_iter()
            .filter(|l| l.starts_with(palisade_contract::HOST_VETH_PREFIX))
            .collect()
    }

    fn pod_routes_on_node(&self) -> Vec<Value> {
        self.node
            .routes()
            .into_iter()
            .filter(|r| {
                r["dev"]
                    .as_str()
                    .is_some_and(|d| d.starts_with(palisade_contract::HOST_VETH_PREFIX))
            })
            .collect()
    }

    /// Host veths that are up.
    fn pal_links_up(&self) -> Vec<String> {
        self.node
            .exec(&["ip", "-o", "link", "show", "up"])
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with(palisade_contract::HOST_VETH_PREFIX))
            .collect()
    }

    /// Nothing of any attachment is left: no address, route, record or pending mark, no host veth
    /// up at once (DEL answers once the pod is off the network), and no host veth at all a moment
    /// later (its reaper deletes the pair after DEL answered).
    fn assert_clean(&self, ctx: &str) {
        assert_eq!(
            self.reserved(),
            Vec::<String>::new(),
            "{ctx}: addresses still reserved"
        );
        assert_eq!(
            self.pal_links_up(),
            Vec::<String>::new(),
            "{ctx}: host veths still up"
        );
        wait_until(std::time::Duration::from_secs(5), || {
            self.pal_links().is_empty()
        });
        assert_eq!(
            self.pal_links(),
            Vec::<String>::new(),
            "{ctx}: host veths left 5 s after DEL"
        );
        assert_eq!(
            self.pod_routes_on_node(),
            Vec::<Value>::new(),
            "{ctx}: node routes left"
        );
        assert_eq!(self.records().len(), 0, "{ctx}: attachment records left");
        assert_eq!(
            pending_elements(&self.node, "pending_v4"),
            Vec::<String>::new(),
            "{ctx}: v4 marks left"
        );
        assert_eq!(
            pending_elements(&self.node, "pending_v6"),
            Vec::<String>::new(),
            "{ctx}: v6 marks left"
        );
    }
}

fn v4_of(r: &Value) -> String {
    result_ips(r)
        .into_iter()
        .find(std::net::IpAddr::is_ipv4)
        .expect("an IPv4 address")
        .to_string()
}

fn v6_of(r: &Value) -> String {
    result_ips(r)
        .into_iter()
        .find(std::net::IpAddr::is_ipv6)
        .expect("an IPv6 address")
        .to_string()
}

#[test]
fn add_check_del_del_wires_records_marks_and_cleans_up_dual_stack() {
    let mut f = Fixture::with_table();
    let (netns, p) = f.pod();
    let list = f.dual();
    let att = Attachment::new("ctr-a1", &netns).pod("default", "web-0", "uid-1");
    let r = f.rt.add(&list, &att).unwrap_or_else(|e| panic!("{e}"));

    // Result: host interface then pod interface (with sandbox), /32 + /128 via link-local gateways.
    assert_eq!(r["cniVersion"], "1.1.0");
    let host_veth = palisade_contract::host_veth_name("ctr-a1", "eth0");
    assert_eq!(r["interfaces"][0]["name"], json!(host_veth));
    assert_eq!(r["interfaces"][1]["name"], "eth0");
    assert_eq!(r["interfaces"][1]["sandbox"], json!(netns));
    assert_eq!(r["interfaces"][1]["mac"].as_str().unwrap().len(), 17);
    assert_eq!(
        r["interfaces"][1]["mtu"], 1400,
        "spec 1.1.0 results carry the MTU"
    );
    let (v4, v6) = (v4_of(&r), v6_of(&r));
    assert!(r["ips"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["interface"] == 1));
    assert!(r["ips"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["address"] == json!(format!("{v4}/32")) && i["gateway"] == "169.254.1.1"));
    assert!(r["ips"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| i["address"] == json!(format!("{v6}/128")) && i["gateway"] == "fe80::1"));
    assert!(r["routes"]
        .as_array()
        .unwrap()
        .contains(&json!({"dst":"0.0.0.0/0","gw":"169.254.1.1"})));
    assert!(r["routes"]
        .as_array()
        .unwrap()
        .contains(&json!({"dst":"::/0","gw":"fe80::1"})));

    // Kernel state: pod addresses and MTU, node routes via the host veth, gateways on the host veth.
    let pod_addrs = f.pods[p].addresses("eth0");
    assert!(
        pod_addrs.contains(&v4) && pod_addrs.contains(&v6),
        "{pod_addrs:?}"
    );
    let mtu = f.pods[p].exec(&["cat", "/sys/class/net/eth0/mtu"]);
    assert_eq!(mtu.trim(), "1400");
    let host_addrs = f.node.addresses(&host_veth);
    assert!(
        host_addrs.contains(&"169.254.1.1".to_string())
            && host_addrs.contains(&"fe80::1".to_string()),
        "{host_addrs:?}"
    );
    let routes = f.pod_routes_on_node();
    assert!(
        routes
            .iter()
            .any(|r| r["dst"] == json!(v4) && r["dev"] == json!(host_veth)),
        "{routes:?}"
    );
    assert!(
        routes
            .iter()
            .any(|r| r["dst"] == json!(v6) && r["dev"] == json!(host_veth)),
        "{routes:?}"
    );
    assert_eq!(
        f.node
            .exec(&["cat", "/proc/sys/net/ipv4/ip_forward"])
            .trim(),
        "1"
    );

    // Node contract: record with the pod identity, pending marks.
    let recs = f.records();
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].pod_key().as_deref(), Some("default/web-0"));
    assert_eq!(recs[0].pod_uid.as_deref(), Some("uid-1"));
    assert_eq!(recs[0].host_veth, host_veth);
    assert_eq!(recs[0].netns, netns);
    assert!(recs[0].pending);
    assert_eq!(pending_elements(&f.node, "pending_v4"), vec![v4.clone()]);
    assert_eq!(pending_elements(&f.node, "pending_v6"), vec![v6.clone()]);
    // host-local layout
    let content = std::fs::read_to_string(f.ipam_dir().join("testnet").join(&v4)).unwrap();
    assert_eq!(content, "ctr-a1\r\neth0");

    f.rt.check(&list, &att)
        .unwrap_or_else(|e| panic!("CHECK after ADD: {e}"));
    f.rt.del(&list, &att).unwrap_or_else(|e| panic!("DEL: {e}"));
    f.assert_clean("after DEL");
    f.rt.del(&list, &att)
        .unwrap_or_else(|e| panic!("second DEL: {e}"));
    let mut no_netns = att.clone();
    no_netns.netns = None;
    f.rt.del(&list, &no_netns)
        .unwrap_or_else(|e| panic!("DEL without CNI_NETNS: {e}"));
    f.assert_clean("after repeated DELs");
}

#[test]
fn check_fails_when_the_node_route_is_gone() {
    let mut f = Fixture::with_table();
    let (netns, _) = f.pod();
    let list = f.dual();
    let att = Attachment::new("ctr-chk", &netns);
    let r = f.rt.add(&list, &att).unwrap_or_else(|e| panic!("{e}"));
    let v4 = v4_of(&r);
    f.node.exec(&["ip", "route", "del", &format!("{v4}/32")]);
    let err =
        f.rt.check(&list, &att)
            .expect_err("CHECK must notice the missing route");
    assert_eq!(err.code, 104, "{err}");
    assert!(err.msg.contains(&v4), "{err}");
    f.rt.del(&list, &att).unwrap();
    f.assert_clean("after DEL");
}

#[test]
fn del_succeeds_after_the_pod_netns_is_gone() {
    let mut f = Fixture::with_table();
    let (netns, p) = f.pod();
    let list = f.dual();
    let att = Attachment::new("ctr-gone", &netns).pod("ns", "gone", "u");
    f.rt.add(&list, &att).unwrap_or_else(|e| panic!("{e}"));
    let ns = f.pods.remove(p);
    drop(ns);
    f.rt.del(&list, &att)
        .unwrap_or_else(|e| panic!("DEL with the netns gone: {e}"));
    f.assert_clean("after DEL");
}

#[test]
fn no_pod_identity_means_no_pending_mark_but_a_record() {
    let mut f = Fixture::with_table();
    let (netns, _) = f.pod();
    let list = f.dual();
    let att = Attachment::new("ctr-plain", &netns);
    f.rt.add(&list, &att).unwrap_or_else(|e| panic!("{e}"));
    assert!(pending_elements(&f.node, "pending_v4").is_empty());
    let recs = f.records();
    assert_eq!(recs.len(), 1);
    assert!(!recs[0].pending);
    assert_eq!(recs[0].pod_key(), None);
    f.rt.del(&list, &att).unwrap();
    f.assert_clean("after DEL");
}

#[test]
fn missing_table_is_retry_later_unless_fail_open() {
    let mut f = Fixture::new();
    let (netns, _) = f.pod();
    let list = f.dual();
    let att = Attachment::new("ctr-notable", &netns).pod("ns", "p", "u");
    let err =
        f.rt.add(&list, &att)
            .expect_err("ADD must fail without the agent's table");
    assert_eq!(err.code, 11, "{err}");
    assert!(
        err.msg
            .contains("palisade-agent has not programmed this node"),
        "{err}"
    );
    f.assert_clean("after refused ADD");
    assert!(f.pods[0].addresses("eth0").is_empty());

    let open = f.list(
        "1.1.0",
        vec![f.plugin(
            json!([[{"subnet":"10.88.0.0/24"}]]),
            json!({"failOpen": true}),
        )],
    );
    f.rt.add(&open, &att)
        .unwrap_or_else(|e| panic!("failOpen ADD: {e}"));
    let recs = f.records();
    assert_eq!(recs.len(), 1);
    assert!(!recs[0].pending);
    f.rt.del(&open, &att).unwrap();
    f.assert_clean("after failOpen DEL");
}

#[test]
fn bad_input_returns_the_right_code_and_leaves_nothing_behind() {
    let mut f = Fixture::with_table();
    let (netns, p) = f.pod();
    let good = f.plugin(json!([[{"subnet":"10.88.0.0/24"}]]), json!({}));
    let conf = |v: &Value| {
        let mut c = v.clone();
        c["name"] = json!("testnet");
        c["cniVersion"] = json!("1.1.0");
        c.to_string()
    };
    let base_env = |cmd: &'static str, ns: String| -> Vec<(&'static str, String)> {
        vec![
            ("CNI_COMMAND", cmd.to_string()),
            ("CNI_CONTAINERID", "ctr-bad".to_string()),
            ("CNI_NETNS", ns),
            ("CNI_IFNAME", "eth0".to_string()),
            ("CNI_PATH", cni_path()),
            (
                "CNI_ARGS",
                "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p".to_string(),
            ),
        ]
    };
    let not_a_netns = f.dir.path().join("plain-file");
    std::fs::write(&not_a_netns, b"x").unwrap();
    let mut bad_version: Value = serde_json::from_str(&conf(&good)).unwrap();
    bad_version["cniVersion"] = json!("9.9.9");
    let mut bad_mtu = good.clone();
    bad_mtu["mtu"] = json!("big");
    let mut bad_subnet = good.clone();
    bad_subnet["ipam"]["ranges"] = json!([[{"subnet":"10.88.0.0/33"}]]);
    // (case, environment, stdin, expected code, what the message must name)
    type Case<'a> = (&'a str, Vec<(&'a str, String)>, String, u64, &'a str);
    let cases: Vec<Case> = vec![
        (
            "malformed JSON",
            base_env("ADD", netns.clone()),
            "{\"cniVersion\":".into(),
            6,
            "",
        ),
        (
            "unknown version",
            base_env("ADD", netns.clone()),
            bad_version.to_string(),
            1,
            "9.9.9",
        ),
        (
            "bad mtu",
            base_env("ADD", netns.clone()),
            conf(&bad_mtu),
            7,
            "mtu",
        ),
        (
            "bad subnet",
            base_env("ADD", netns.clone()),
            conf(&bad_subnet),
            7,
            "ipam.ranges[0][0].subnet",
        ),
        (
            "netns not a netns",
            base_env("ADD", not_a_netns.display().to_string()),
            conf(&good),
            4,
            "CNI_NETNS",
        ),
        (
            "netns missing",
            base_env("ADD", "/run/netns/does-not-exist".into()),
            conf(&good),
            4,
            "CNI_NETNS",
        ),
        (
            "missing container id",
            base_env("ADD", netns.clone())
                .into_iter()
                .filter(|(k, _)| *k != "CNI_CONTAINERID")
                .collect(),
            conf(&good),
            4,
            "CNI_CONTAINERID",
        ),
        (
            "unknown command",
            base_env("FROB", netns.clone()),
            conf(&good),
            4,
            "CNI_COMMAND",
        ),
        (
            "bad ifname",
            base_env("ADD", netns.clone())
                .into_iter()
                .map(|(k, v)| {
                    if k == "CNI_IFNAME" {
                        (k, "eth:0".into())
                    } else {
                        (k, v)
                    }
                })
                .collect(),
            conf(&good),
            4,
            "CNI_IFNAME",
        ),
    ];
    for (name, env, stdin, code, needle) in cases {
        let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let err = exec_raw(&f.node, &env_ref, stdin.as_bytes()).expect_err(name);
        assert_eq!(err.code, code, "{name}: {err}");
        assert!(
            err.msg.contains(needle),
            "{name}: message {:?} should name {needle:?}",
            err.msg
        );
        let out: Value = serde_json::from_str(&err.stdout)
            .unwrap_or_else(|e| panic!("{name}: stdout not JSON ({e}): {}", err.stdout));
        assert!(out["cniVersion"].is_string(), "{name}: {out}");
        f.assert_clean(name);
    }

    // An existing ifname in the pod: error, and the pod's own interface is untouched.
    f.pods[p].exec(&[
        "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "other0",
    ]);
    let env = base_env("ADD", netns.clone());
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let err = exec_raw(&f.node, &env_ref, conf(&good).as_bytes()).expect_err("existing ifname");
    assert_eq!(err.code, 102, "{err}");
    assert!(err.msg.contains("eth0"), "{err}");
    f.assert_clean("existing ifname");
    assert!(f.pods[p].links().contains(&"eth0".to_string()));
}

#[test]
fn exhausted_range_errors_without_reserving_and_frees_on_del() {
    let mut f = Fixture::with_table();
    let list = f.list(
        "1.1.0",
        vec![f.plugin(json!([[{"subnet":"10.89.0.0/30"}]]), json!({}))],
    );
    let (ns1, _) = f.pod();
    let (ns2, _) = f.pod();
    let a1 = Attachment::new("ctr-e1", &ns1).pod("ns", "a", "1");
    let a2 = Attachment::new("ctr-e2", &ns2).pod("ns", "b", "2");
    let r = f.rt.add(&list, &a1).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(v4_of(&r), "10.89.0.2");
    let err =
        f.rt.add(&list, &a2)
            .expect_err("the /30 has one usable address");
    assert_eq!(err.code, 101, "{err}");
    assert!(err.msg.contains("no IP addresses available"), "{err}");
    assert_eq!(f.reserved(), vec!["10.89.0.2".to_string()]);
    assert_eq!(f.records().len(), 1);
    assert_eq!(f.pal_links().len(), 1);
    assert!(f.pods[1].addresses("eth0").is_empty());
    f.rt.del(&list, &a2).unwrap();
    f.rt.del(&list, &a1).unwrap();
    f.assert_clean("after DELs");
}

#[test]
fn fifty_parallel_adds_get_distinct_ips_and_fifty_dels_leave_nothing() {
    const N: usize = 50;
    let mut f = Fixture::with_table();
    let list = f.dual();
    let atts: Vec<Attachment> = (0..N)
        .map(|i| {
            let (ns, _) = f.pod();
            Attachment::new(&format!("ctr-par-{i}"), &ns).pod(
                "par",
                &format!("p{i}"),
                &format!("u{i}"),
            )
        })
        .collect();
    let results: Vec<Value> = std::thread::scope(|s| {
        let hs: Vec<_> = atts
            .iter()
            .map(|a| s.spawn(|| f.rt.add(&list, a)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap().unwrap_or_else(|e| panic!("{e}")))
            .collect()
    });
    let v4: HashSet<String> = results.iter().map(v4_of).collect();
    let v6: HashSet<String> = results.iter().map(v6_of).collect();
    assert_eq!(v4.len(), N, "IPv4 addresses must be distinct");
    assert_eq!(v6.len(), N, "IPv6 addresses must be distinct");
    assert_eq!(f.pal_links().len(), N);
    assert_eq!(f.records().len(), N);
    assert_eq!(pending_elements(&f.node, "pending_v4").len(), N);
    assert_eq!(f.reserved().len(), 2 * N);
    std::thread::scope(|s| {
        let hs: Vec<_> = atts
            .iter()
            .map(|a| s.spawn(|| f.rt.del(&list, a)))
            .collect();
        for h in hs {
            h.join().unwrap().unwrap_or_else(|e| panic!("{e}"));
        }
    });
    f.assert_clean("after 50 DELs");
}

#[test]
fn gc_removes_attachments_not_in_the_valid_list() {
    let mut f = Fixture::with_table();
    let list = f.dual();
    let atts: Vec<Attachment> = (0..3)
        .map(|i| {
            let (ns, _) = f.pod();
            Attachment::new(&format!("ctr-gc-{i}"), &ns).pod("gc", &format!("p{i}"), "u")
        })
        .collect();
    let results: Vec<Value> = atts
        .iter()
        .map(|a| f.rt.add(&list, a).unwrap_or_else(|e| panic!("{e}")))
        .collect();
    // A reservation without any record (e.g. a crash between IPAM and the record) is also collected.
    std::fs::write(
        f.ipam_dir().join("testnet").join("10.88.0.250"),
        "ctr-crashed\r\neth0",
    )
    .unwrap();
    f.rt.gc(&list, &[("ctr-gc-0", "eth0")])
        .unwrap_or_else(|e| panic!("GC: {e}"));
    let recs = f.records();
    assert_eq!(
        recs.iter()
            .map(|r| r.container_id.as_str())
            .collect::<Vec<_>>(),
        vec!["ctr-gc-0"]
    );
    assert_eq!(
        f.pal_links(),
        vec![palisade_contract::host_veth_name("ctr-gc-0", "eth0")]
    );
    let mut kept = f.reserved();
    kept.sort();
    let mut want = vec![v4_of(&results[0]), v6_of(&results[0])];
    want.sort();
    assert_eq!(kept, want);
    assert_eq!(
        pending_elements(&f.node, "pending_v4"),
        vec![v4_of(&results[0])]
    );
    f.rt.check(&list, &atts[0])
        .unwrap_or_else(|e| panic!("survivor CHECK: {e}"));
    f.rt.gc(&list, &[]).unwrap();
    f.assert_clean("after GC of everything");
}

/// A python3 server in a namespace that answers one TCP or UDP exchange; killed on drop.
struct Server {
    _process: KillOnDrop,
}

impl Server {
    fn start(ns: &Netns, proto: &str, port: u16, v6: bool) -> Self {
        const SRV: &str = r#"
import socket, sys
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
fam = socket.AF_INET6 if ':' in host else socket.AF_INET
if proto == 'tcp':
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port)); s.listen(4); s.settimeout(20)
    print('ready', flush=True)
    c, _ = s.accept(); c.sendall(b'echo:' + c.recv(100)); c.close()
else:
    s = socket.socket(fam, socket.SOCK_DGRAM); s.bind((host, port)); s.settimeout(20)
    print('ready', flush=True)
    d, a = s.recvfrom(100); s.sendto(b'echo:' + d, a)
"#;
        let host = if v6 { "::" } else { "0.0.0.0" };
        let mut child = ns
            .command("python3")
            .args(["-c", SRV, proto, host, &port.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start python3 server");
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "server did not start");
        Server {
            _process: child.into(),
        }
    }
}

/// Sends one message from `ns` to `ip:port` and returns the reply.
fn exchange(ns_cmd: Command, proto: &str, ip: &str, port: u16) -> String {
    const CLI: &str = r#"
import socket, sys
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
fam = socket.AF_INET6 if ':' in host else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM if proto == 'tcp' else socket.SOCK_DGRAM); s.settimeout(5)
if proto == 'tcp':
    s.connect((host, port)); s.sendall(b'hi'); print(s.recv(100).decode())
else:
    s.sendto(b'hi', (host, port)); print(s.recvfrom(100)[0].decode())
"#;
    let mut cmd = ns_cmd;
    cmd.args(["-c", CLI, proto, ip, &port.to_string()]);
    let out = run(&mut cmd);
    assert!(
        out.status.success(),
        "{proto} to {ip}:{port} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn probe(from: &Netns, to: &Netns, proto: &str, ip: &str, port: u16) {
    let server = Server::start(to, proto, port, ip.contains(':'));
    assert_eq!(
        exchange(from.command("python3"), proto, ip, port),
        "echo:hi",
        "{proto} {ip}:{port}"
    );
    drop(server);
}

#[test]
fn tcp_and_udp_flow_between_pods_and_from_the_node_over_v4_and_v6() {
    let mut f = Fixture::with_table();
    let list = f.dual();
    let (na, _) = f.pod();
    let (nb, _) = f.pod();
    let ra =
        f.rt.add(&list, &Attachment::new("ctr-ta", &na))
            .unwrap_or_else(|e| panic!("{e}"));
    let rb =
        f.rt.add(&list, &Attachment::new("ctr-tb", &nb))
            .unwrap_or_else(|e| panic!("{e}"));
    let (a, b) = (&f.pods[0], &f.pods[1]);
    probe(a, b, "tcp", &v4_of(&rb), 8080);
    probe(a, b, "udp", &v4_of(&rb), 8081);
    probe(b, a, "tcp", &v6_of(&ra), 8082);
    probe(b, a, "udp", &v6_of(&ra), 8083);
    probe(&f.node, a, "tcp", &v4_of(&ra), 8084);
    probe(&f.node, b, "tcp", &v6_of(&rb), 8085);
    f.rt.del(&list, &Attachment::new("ctr-ta", &na)).unwrap();
    f.rt.del(&list, &Attachment::new("ctr-tb", &nb)).unwrap();
    f.assert_clean("after DELs");
}

#[test]
fn ipv6_only_network_gets_only_a_128_and_a_v6_default_route() {
    let mut f = Fixture::with_table();
    let list = f.list(
        "1.1.0",
        vec![f.plugin(json!([[{"subnet":"fd00:99::/120"}]]), json!({}))],
    );
    let (na, _) = f.pod();
    let (nb, _) = f.pod();
    let ra =
        f.rt.add(&list, &Attachment::new("ctr-6a", &na).pod("v6", "a", "1"))
            .unwrap_or_else(|e| panic!("{e}"));
    let rb =
        f.rt.add(&list, &Attachment::new("ctr-6b", &nb))
            .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(result_ips(&ra).len(), 1);
    assert_eq!(ra["routes"], json!([{"dst":"::/0","gw":"fe80::1"}]));
    assert_eq!(pending_elements(&f.node, "pending_v6"), vec![v6_of(&ra)]);
    let v4_routes = f.pods[0].exec(&["ip", "-4", "route", "show"]);
    assert!(v4_routes.trim().is_empty(), "{v4_routes}");
    probe(&f.pods[0], &f.pods[1], "tcp", &v6_of(&rb), 9000);
    f.rt.del(&list, &Attachment::new("ctr-6a", &na)).unwrap();
    f.rt.del(&list, &Attachment::new("ctr-6b", &nb)).unwrap();
    f.assert_clean("after DELs");
}

#[test]
fn chained_with_the_real_portmap_a_host_port_reaches_the_pod() {
    let mut f = Fixture::with_table();
    // Debian's portmap speaks spec <= 1.0.0, so this chain is a 1.0.0 conflist.
    let list = f.list(
        "1.0.0",
        vec![
            f.plugin(json!([[{"subnet":"10.90.0.0/24"}]]), json!({})),
            json!({"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}),
        ],
    );
    let (na, _) = f.pod();
    let (nb, _) = f.pod();
    let mut att = Attachment::new("ctr-pm", &na).pod("pm", "web", "u");
    att.capability_args =
        json!({"portMappings": [{"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]});
    let r = f.rt.add(&list, &att).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r["cniVersion"], "1.0.0");
    assert!(
        r["interfaces"][1].get("mtu").is_none(),
        "no 1.1.0-only fields in a 1.0.0 result: {r}"
    );
    let other = Attachment::new("ctr-pm-client", &nb);
    f.rt.add(&list, &other).unwrap_or_else(|e| panic!("{e}"));
    // CHECK our link of the chain with the chain's final result as prevResult. (Debian's portmap
    // 1.1.1 fails its own CHECK: it looks for its IPv4 DNAT rules in the IPv6 table.)
    f.rt.check_only(&list, &att, "palisade")
        .unwrap_or_else(|e| panic!("chained CHECK: {e}"));
    let nat = f.node.exec(&["iptables-save", "-t", "nat"]);
    assert!(nat.contains("18080"), "portmap rules missing:\n{nat}");
    // The client pod dials the node's address on the host port; portmap DNATs it to the pod.
    let server = Server::start(&f.pods[0], "tcp", 80, false);
    assert_eq!(
        exchange(f.pods[1].command("python3"), "tcp", "169.254.1.1", 18080),
        "echo:hi"
    );
    drop(server);
    f.rt.del(&list, &att)
        .unwrap_or_else(|e| panic!("chained DEL: {e}"));
    f.rt.del(&list, &other).unwrap();
    let nat = f.node.exec(&["iptables-save", "-t", "nat"]);
    assert!(!nat.contains("18080"), "portmap rules left:\n{nat}");
    f.assert_clean("after chained DELs");
}

#[test]
fn delegates_ipam_to_the_real_host_local() {
    let mut f = Fixture::with_table();
    let hl_dir = f.dir.path().join("host-local");
    let mut plugin = f.plugin(json!([]), json!({}));
    plugin["ipam"] = json!({"type": "host-local", "dataDir": hl_dir, "ranges": [[{"subnet": "10.91.0.0/24"}]],
                            "routes": [{"dst": "192.0.2.0/24"}]});
    let list = f.list("1.0.0", vec![plugin]);
    let (na, _) = f.pod();
    let att = Attachment::new("ctr-hl", &na).pod("hl", "p", "u");
    let r = f.rt.add(&list, &att).unwrap_or_else(|e| panic!("{e}"));
    let v4 = v4_of(&r);
    assert_eq!(v4, "10.91.0.2");
    assert_eq!(r["ips"][0]["address"], "10.91.0.2/32");
    assert!(
        r["routes"]
            .as_array()
            .unwrap()
            .contains(&json!({"dst":"192.0.2.0/24","gw":"169.254.1.1"})),
        "{r}"
    );
    let reserved = hl_dir.join("testnet").join(&v4);
    assert_eq!(
        std::fs::read_to_string(&reserved).unwrap(),
        "ctr-hl\r\neth0"
    );
    assert!(f.pods[0].addresses("eth0").contains(&v4));
    assert_eq!(pending_elements(&f.node, "pending_v4"), vec![v4.clone()]);
    f.rt.check(&list, &att)
        .unwrap_or_else(|e| panic!("CHECK with delegate: {e}"));
    f.rt.del(&list, &att)
        .unwrap_or_else(|e| panic!("DEL with delegate: {e}"));
    assert!(!reserved.exists(), "host-local reservation left");
    f.assert_clean("after DEL");
}

#[test]
fn version_and_status_follow_the_spec() {
    let f = Fixture::with_table();
    let v = exec_raw(
        &f.node,
        &[
            ("CNI_COMMAND", "VERSION"),
            ("CNI_NETNS", "dummy"),
            ("CNI_IFNAME", "dummy"),
        ],
        br#"{"cniVersion":"1.0.0"}"#,
    )
    .unwrap_or_else(|e| panic!("{e}"))
    .unwrap();
    assert_eq!(v["cniVersion"], "1.0.0");
    assert_eq!(v["supportedVersions"], json!(["1.0.0", "1.1.0"]));
    let list = f.dual();
    f.rt.status(&list)
        .unwrap_or_else(|e| panic!("STATUS with the table: {e}"));
    let old = f.list(
        "1.0.0",
        vec![f.plugin(json!([[{"subnet":"10.88.0.0/24"}]]), json!({}))],
    );
    assert_eq!(f.rt.status(&old).expect_err("STATUS needs 1.1.0").code, 1);
    f.node.exec(&["nft", "delete", "table", "inet", "palisade"]);
    let err =
        f.rt.status(&list)
            .expect_err("STATUS without the agent's table");
    assert_eq!(err.code, 50, "{err}");
    let open = f.list(
        "1.1.0",
        vec![f.plugin(
            json!([[{"subnet":"10.88.0.0/24"}]]),
            json!({"failOpen": true}),
        )],
    );
    f.rt.status(&open)
        .unwrap_or_else(|e| panic!("STATUS failOpen: {e}"));
}

#[test]
fn concurrent_adds_across_processes_and_restarts_keep_the_store_consistent() {
    // The store survives "restarts" (each ADD is a new process) and round-robins.
    let mut f = Fixture::with_table();
    let list = f.list(
        "1.1.0",
        vec![f.plugin(json!([[{"subnet":"10.92.0.0/24"}]]), json!({}))],
    );
    let (n1, _) = f.pod();
    let (n2, _) = f.pod();
    let a1 = Attachment::new("ctr-rr1", &n1);
    let a2 = Attachment::new("ctr-rr2", &n2);
    assert_eq!(v4_of(&f.rt.add(&list, &a1).unwrap()), "10.92.0.2");
    f.rt.del(&list, &a1).unwrap();
    assert_eq!(
        v4_of(&f.rt.add(&list, &a2).unwrap()),
        "10.92.0.3",
        "round robin after release"
    );
    let mut req = Attachment::new("ctr-rr1", &n1);
    req.args = vec![("IP".into(), "10.92.0.77".into())];
    assert_eq!(
        v4_of(&f.rt.add(&list, &req).unwrap()),
        "10.92.0.77",
        "requested IP"
    );
    f.rt.del(&list, &req).unwrap();
    f.rt.del(&list, &a2).unwrap();
    f.assert_clean("after DELs");
}

#[test]
fn builtin_allocator_and_host_local_share_one_store() {
    let mut f = Fixture::with_table();
    let list = f.list(
        "1.0.0",
        vec![f.plugin(json!([[{"subnet":"10.93.0.0/24"}]]), json!({}))],
    );
    let hl_conf = json!({"cniVersion": "1.0.0", "name": "testnet",
        "ipam": {"type": "host-local", "dataDir": f.ipam_dir(), "ranges": [[{"subnet": "10.93.0.0/24"}]]}})
    .to_string();
    let (n1, _) = f.pod();
    let (n2, _) = f.pod();
    let hl1 = Attachment::new("ctr-hl-1", &n1);
    let r =
        f.rt.exec("host-local", "ADD", Some(&hl1), hl_conf.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap();
    assert_eq!(v4_of(&r), "10.93.0.2");
    // palisade sees host-local's reservation and its round-robin cursor.
    let pal = Attachment::new("ctr-pal", &n2);
    assert_eq!(
        v4_of(&f.rt.add(&list, &pal).unwrap_or_else(|e| panic!("{e}"))),
        "10.93.0.3"
    );
    // host-local sees ours.
    let hl2 = Attachment::new("ctr-hl-2", &n1);
    let r =
        f.rt.exec("host-local", "ADD", Some(&hl2), hl_conf.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"))
            .unwrap();
    assert_eq!(v4_of(&r), "10.93.0.4");
    for a in [&hl1, &hl2] {
        f.rt.exec("host-local", "DEL", Some(a), hl_conf.as_bytes())
            .unwrap_or_else(|e| panic!("{e}"));
    }
    f.rt.del(&list, &pal).unwrap();
    f.assert_clean("after DELs");
}

/// Tries one TCP exchange; true when it got the echo.
fn tcp_works(from: &Netns, to: &Netns, ip: &str, port: u16) -> bool {
    let server = Server::start(to, "tcp", port, ip.contains(':'));
    const CLI: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET); s.settimeout(1.5)
try:
    s.connect((sys.argv[1], int(sys.argv[2]))); s.sendall(b'hi'); print(s.recv(100).decode())
except OSError:
    print('blocked')
"#;
    let out = run(from
        .command("python3")
        .args(["-c", CLI, ip, &port.to_string()]));
    drop(server);
    String::from_utf8_lossy(&out.stdout).trim() == "echo:hi"
}

#[test]
fn a_new_pod_is_isolated_by_its_pending_mark_until_the_agent_clears_it() {
    let mut f = Fixture::with_table();
    // What the agent's base chains do with pending addresses (ARCHITECTURE.md "The ruleset").
    f.node.exec(&[
        "nft",
        "add chain inet palisade guard { type filter hook forward priority 0; }; \
         add rule inet palisade guard ip saddr @pending_v4 drop; add rule inet palisade guard ip daddr @pending_v4 drop",
    ]);
    let list = f.list(
        "1.1.0",
        vec![f.plugin(json!([[{"subnet":"10.94.0.0/24"}]]), json!({}))],
    );
    let (na, _) = f.pod();
    let (nb, _) = f.pod();
    let plain = Attachment::new("ctr-iso-a", &na); // no pod identity: never pending
    let pod = Attachment::new("ctr-iso-b", &nb).pod("iso", "b", "u");
    f.rt.add(&list, &plain).unwrap_or_else(|e| panic!("{e}"));
    let rb = f.rt.add(&list, &pod).unwrap_or_else(|e| panic!("{e}"));
    let ip_b = v4_of(&rb);
    assert!(
        !tcp_works(&f.pods[0], &f.pods[1], &ip_b, 7000),
        "a pending pod must not be reachable"
    );
    // The agent compiles the pod's policy and clears the mark in the same transaction.
    f.node.exec(&[
        "nft",
        "delete",
        "element",
        "inet",
        "palisade",
        "pending_v4",
        &format!("{{ {ip_b} }}"),
    ]);
    assert!(
        tcp_works(&f.pods[0], &f.pods[1], &ip_b, 7001),
        "cleared pod must be reachable"
    );
    // DEL of a pod whose mark the agent already removed still succeeds.
    f.rt.del(&list, &pod).unwrap_or_else(|e| panic!("{e}"));
    f.rt.del(&list, &plain).unwrap();
    f.assert_clean("after DELs");
}

/// Issue 11 item 5: GC (and DEL) deleted whatever link an attachment record named; `hostVeth` was
/// read from disk unchecked.
#[test]
fn gc_and_del_refuse_a_record_naming_a_link_the_plugin_could_not_have_made() {
    let mut f = Fixture::with_table();
    let list = f.dual();
    let (ns, _) = f.pod();
    let att = Attachment::new("ctr-foreign", &ns).pod("fg", "p", "u");
    f.rt.add(&list, &att).unwrap_or_else(|e| panic!("ADD: {e}"));
    let ours = palisade_contract::host_veth_name("ctr-foreign", "eth0");
    // A link of someone else's (a veth: this kernel may have no dummy driver).
    f.node.exec(&[
        "ip", "link", "add", "eth9", "type", "veth", "peer", "name", "eth9p",
    ]);
    let path = palisade_contract::attachment_path(&f.state_dir(), "ctr-foreign", "eth0");
    let original = std::fs::read_to_string(&path).unwrap();
    let mut rec: palisade_contract::Attachment = serde_json::from_str(&original).unwrap();
    rec.host_veth = "eth9".into();
    std::fs::write(&path, serde_json::to_vec(&rec).unwrap()).unwrap();
    // A second stale record, of a container that never ran, naming the loopback.
    let lo_path = palisade_contract::attachment_path(&f.state_dir(), "ctr-lo", "eth0");
    let lo = palisade_contract::Attachment {
        container_id: "ctr-lo".into(),
        ifname: "eth0".into(),
        host_veth: "lo".into(),
        ..rec.clone()
    };
    std::fs::write(&lo_path, serde_json::to_vec(&lo).unwrap()).unwrap();

    let e =
        f.rt.gc(&list, &[])
            .expect_err("GC must refuse foreign records");
    assert_eq!(e.code, 107, "{e}");
    for p in [&path, &lo_path] {
        assert!(e.msg.contains(&p.display().to_string()), "{e}");
        assert!(p.exists(), "GC removed the refused record {}", p.display());
    }
    assert_eq!(
        f.reserved().len(),
        2,
        "GC released the addresses of a refused record"
    );
    let e =
        f.rt.del(&list, &att)
            .expect_err("DEL must refuse a foreign record");
    assert_eq!(e.code, 107, "{e}");
    assert!(e.msg.contains(&path.display().to_string()), "{e}");
    let links = f.node.links();
    for l in ["eth9", "lo", ours.as_str()] {
        assert!(links.iter().any(|x| x == l), "{l} was deleted: {links:?}");
    }
    assert_eq!(
        pending_elements(&f.node, "pending_v4").len(),
        1,
        "a refused DEL removed the pending mark"
    );

    // Once the records are what the plugin wrote, DEL and GC clean up as always.
    std::fs::write(&path, original).unwrap();
    std::fs::remove_file(&lo_path).unwrap();
    f.rt.del(&list, &att).unwrap_or_else(|e| panic!("DEL: {e}"));
    f.rt.gc(&list, &[]).unwrap_or_else(|e| panic!("GC: {e}"));
    f.assert_clean("after DEL of the repaired record");
    assert!(f.node.links().iter().any(|x| x == "eth9"), "eth9 deleted");
}

/// DEL leaves the veth pair's deletion to a reaper; an ADD of the same attachment that comes before
/// the reaper (or after one that never ran) finds the derived host veth down and without a record,
/// deletes it and goes on. With a record (a live attachment) the same ADD is refused.
#[test]
fn add_replaces_a_host_veth_left_without_a_record_and_refuses_a_live_one() {
    let mut f = Fixture::with_table();
    let list = f.dual();
    let (ns, _) = f.pod();
    let att = Attachment::new("ctr-again", &ns).pod("default", "again", "uid-again");
    let host_veth = palisade_contract::host_veth_name("ctr-again", "eth0");
    // What a DEL whose reaper has not run yet leaves: the derived host veth, down, no record.
    f.node.exec(&[
        "ip",
        "link",
        "add",
        &host_veth,
        "type",
        "veth",
        "peer",
        "name",
        "stale-peer",
    ]);
    let r =
        f.rt.add(&list, &att)
            .unwrap_or_else(|e| panic!("ADD over a reaped-later veth: {e}"));
    assert_eq!(r["interfaces"][0]["name"], json!(host_veth));
    assert!(
        !f.node.links().iter().any(|l| l == "stale-peer"),
        "the stale pair was not deleted"
    );
    assert_eq!(f.pal_links_up(), vec![host_veth.clone()]);
    // A second ADD of the live attachment is refused and changes nothing.
    let e = f.rt.add(&list, &att).expect_err("ADD of a live attachment");
    assert_eq!(e.code, 102, "{e}");
    assert_eq!(f.pal_links_up(), vec![host_veth.clone()]);
    assert_eq!(f.records().len(), 1);
    f.rt.del(&list, &att).unwrap_or_else(|e| panic!("DEL: {e}"));
    f.assert_clean("after DEL");
}

/// DEL answers before the pair is deleted, but the pod is off the network by then, and an ADD of the
/// same attachment right after DEL works (however far its reaper got).
#[test]
fn add_right_after_del_of_the_same_attachment_works() {
    let mut f = Fixture::with_table();
    let list = f.dual();
    let (ns, _) = f.pod();
    let att = Attachment::new("ctr-quick", &ns).pod("default", "quick", "uid-quick");
    for round in 0..10 {
        f.rt.add(&list, &att)
            .unwrap_or_else(|e| panic!("ADD {round}: {e}"));
        f.rt.del(&list, &att)
            .unwrap_or_else(|e| panic!("DEL {round}: {e}"));
        assert_eq!(f.pal_links_up(), Vec::<String>::new(), "round {round}");
        assert_eq!(f.pod_routes_on_node(), Vec::<Value>::new(), "round {round}");
    }
    f.assert_clean("after ten ADD/DEL rounds");
}
