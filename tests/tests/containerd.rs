//! A real runtime: containerd 1.6 started inside a node network namespace with its own root,
//! state, socket and config, in a private mount namespace where /etc, /opt and /var/lib are
//! overlays (so /etc/cni/net.d, /opt/cni/bin and /var/lib/cni exist only there) and /run is a
//! tmpfs. `ctr run --cni` then gets its pod network from `palisade` (chained with portmap), and
//! one pod fetches a page from another. Must run as root.

use palisade_testkit::process::KillOnDrop;
use palisade_tests::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const IMAGE: &str = "docker.io/palisade/busybox:test";
const PAGE: &str = "palisade-ok";

fn sha256_hex(path: &Path) -> String {
    let out = must(Command::new("sha256sum").arg(path));
    out.split_whitespace()
        .next()
        .expect("sha256sum output")
        .to_string()
}

/// Builds an OCI image layout tar holding busybox-static, its applets and a web page.
fn build_image(dir: &Path) -> PathBuf {
    let rootfs = dir.join("rootfs");
    let bin = rootfs.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(rootfs.join("www")).unwrap();
    std::fs::create_dir_all(rootfs.join("tmp")).unwrap();
    std::fs::write(rootfs.join("www/index.html"), PAGE).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).expect("busybox-static is installed");
    for applet in ["sh", "sleep", "httpd", "wget", "ip", "cat", "ls"] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    let layout = dir.join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let layer = dir.join("layer.tar");
    must(
        Command::new("tar")
            .arg("-C")
            .arg(&rootfs)
            .arg("-cf")
            .arg(&layer)
            .arg("."),
    );
    let layer_digest = sha256_hex(&layer);
    let layer_size = std::fs::metadata(&layer).unwrap().len();
    std::fs::rename(&layer, blobs.join(&layer_digest)).unwrap();
    let config = json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]}
    })
    .to_string();
    let write_blob = |body: &str| -> (String, usize) {
        let tmp = dir.join("blob.tmp");
        std::fs::write(&tmp, body).unwrap();
        let d = sha256_hex(&tmp);
        std::fs::rename(&tmp, blobs.join(&d)).unwrap();
        (d, body.len())
    };
    let (config_digest, config_size) = write_blob(&config);
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{config_digest}"), "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{layer_digest}"), "size": layer_size}]
    })
    .to_string();
    let (manifest_digest, manifest_size) = write_blob(&manifest);
    let index = json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"), "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": IMAGE, "org.opencontainers.image.ref.name": "test"}
        }]
    });
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let tar = dir.join("image.tar");
    must(
        Command::new("tar")
            .arg("-C")
            .arg(&layout)
            .arg("-cf")
            .arg(&tar)
            .arg("."),
    );
    tar
}

/// The private world containerd and ctr live in: node netns + a private mount namespace.
struct World {
    holder: KillOnDrop,
    dir: PathBuf,
    sock: PathBuf,
    /// containerd namespace, unique per run (runc names its cgroups after it).
    namespace: String,
}

impl World {
    /// A command run inside the holder's mount and network namespaces.
    fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("nsenter");
        c.args([
            "-t",
            &self.holder.id().to_string(),
            "-m",
            "-n",
            "--",
            program,
        ]);
        c
    }

    fn ctr(&self, args: &[&str]) -> std::process::Output {
        let mut c = self.cmd("ctr");
        c.arg("--address")
            .arg(&self.sock)
            .args(["-n", &self.namespace])
            .args(args);
        run(&mut c)
    }

    fn must_ctr(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed: {}\n{}\ncontainerd log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout),
            std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Overlays `target` (which must exist) so writes under it land in our temp dir.
    fn overlay(&self, target: &str) {
        let base = self.dir.join(format!("ovl{}", target.replace('/', "_")));
        let (upper, work) = (base.join("upper"), base.join("work"));
        std::fs::create_dir_all(&upper).unwrap();
        std::fs::create_dir_all(&work).unwrap();
        let opts = format!(
            "lowerdir={target},upperdir={},workdir={}",
            upper.display(),
            work.display()
        );
        must(
            self.cmd("mount")
                .args(["-t", "overlay", "overlay", "-o", &opts, target]),
        );
    }
}

#[test]
fn containerd_ctr_run_with_cni_gets_a_working_pod_network_from_palisade() {
    require_root();
    let node = Netns::new("pcd");
    create_pending_table(&node);
    let tmp = temp_dir("palisade-containerd-");
    let dir = tmp.path().to_path_buf();

    // CNI: our plugin and the reference plugins in one bin dir, our conflist in a conf dir.
    let bin_dir = dir.join("cni-bin");
    let conf_dir = dir.join("cni-conf");
    std::fs::create_dir_all(&bin_dir).unwrap();
    std::fs::create_dir_all(&conf_dir).unwrap();
    std::fs::copy(palisade_bin(), bin_dir.join("palisade")).unwrap();
    for p in ["portmap", "loopback", "host-local"] {
        std::fs::copy(Path::new(REFERENCE_PLUGIN_DIR).join(p), bin_dir.join(p)).unwrap();
    }
    let state_dir = dir.join("palisade-state");
    // containerd 1.6 vendors a libcni that speaks CNI <= 1.0.0, like Debian's portmap.
    let conflist = json!({
        "cniVersion": "1.0.0", "name": "palisade",
        "plugins": [
            {"type": "palisade", "mtu": 1500, "stateDir": state_dir,
             "ipam": {"type": "palisade", "dataDir": dir.join("ipam"), "ranges": [[{"subnet": "10.95.0.0/24"}]]}},
            {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}
        ]
    });
    std::fs::write(
        conf_dir.join(palisade_contract::CONFLIST_FILE),
        conflist.to_string(),
    )
    .unwrap();

    // containerd's own root, state, socket and config.
    let sock = dir.join("containerd.sock");
    let config = format!(
        "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
         [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n[debug]\n  address = \"\"\n",
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        sock = sock.display()
    );
    std::fs::write(dir.join("config.toml"), config).unwrap();
    let image = build_image(&dir.join("image"));

    // A holder process in the node netns and a new private mount namespace. nsenter (not
    // `ip netns exec`) so /sys, and with it the cgroup mounts runc needs, stays as it is.
    let holder = Command::new("nsenter")
        .arg(format!("--net={}", node.path().display()))
        .args([
            "--",
            "unshare",
            "-m",
            "--propagation",
            "private",
            "--",
            "sleep",
            "3600",
        ])
        .spawn()
        .expect("start the namespace holder");
    let world = World {
        holder: holder.into(),
        dir: dir.clone(),
        sock: sock.clone(),
        namespace: unique("palisade-test-"),
    };
    let self_mnt = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::read_link(format!("/proc/{}/ns/mnt", world.holder.id()))
        .ok()
        .as_ref()
        == Some(&self_mnt)
    {
        assert!(
            Instant::now() < deadline,
            "holder never entered its mount namespace"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for target in ["/etc", "/opt", "/var/lib"] {
        world.overlay(target);
    }
    must(world.cmd("mount").args(["-t", "tmpfs", "tmpfs", "/run"]));
    must(
        world
            .cmd("mkdir")
            .args(["-p", "/etc/cni/net.d", "/opt/cni/bin"]),
    );
    must(
        world
            .cmd("mount")
            .arg("--bind")
            .arg(&conf_dir)
            .arg("/etc/cni/net.d"),
    );
    must(
        world
            .cmd("mount")
            .arg("--bind")
            .arg(&bin_dir)
            .arg("/opt/cni/bin"),
    );

    let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
    let containerd = world
        .cmd("containerd")
        .arg("--config")
        .arg(dir.join("config.toml"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start containerd");
    let containerd = KillOnDrop::from(containerd);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !world.ctr(&["version"]).status.success() {
        assert!(
            Instant::now() < deadline,
            "containerd did not come up:\n{}",
            std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let cleanup = Cleanup { world: &world };

    world.must_ctr(&["image", "import", image.to_str().unwrap()]);
    let images = world.must_ctr(&["image", "ls", "-q"]);
    assert!(images.contains(IMAGE), "image not imported: {images}");

    // Pod A serves a page; pod B fetches it over the pod network.
    world.must_ctr(&[
        "run",
        "-d",
        "--cni",
        IMAGE,
        "pod-a",
        "/bin/httpd",
        "-f",
        "-p",
        "8080",
        "-h",
        "/www",
    ]);
    let recs = palisade_contract::read_attachments(&state_dir).0;
    assert_eq!(
        recs.len(),
        1,
        "one attachment record after the first ctr run: {recs:?}"
    );
    let ip_a = recs[0].ips[0].to_string();
    assert!(ip_a.starts_with("10.95.0."), "{ip_a}");
    let url = format!("http://{ip_a}:8080/index.html");
    // Pod B (its own netns, wired by palisade) fetches the page; retried while httpd starts.
    world.must_ctr(&["run", "-d", "--cni", IMAGE, "pod-b", "/bin/sleep", "600"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut attempt = 0;
    let fetched = loop {
        attempt += 1;
        let out = world.ctr(&[
            "task",
            "exec",
            "--exec-id",
            &format!("wget{attempt}"),
            "pod-b",
            "/bin/busybox",
            "wget",
            "-O",
            "-",
            &url,
        ]);
        if out.status.success() {
            break String::from_utf8_lossy(&out.stdout).into_owned();
        }
        if Instant::now() > deadline {
            let mut diag = String::new();
            for (i, (task, argv)) in [
                ("pod-a", vec!["/bin/busybox", "ip", "addr"]),
                ("pod-a", vec!["/bin/busybox", "ip", "route"]),
                ("pod-a", vec!["/bin/busybox", "netstat", "-ltn"]),
                ("pod-b", vec!["/bin/busybox", "ip", "addr"]),
                ("pod-b", vec!["/bin/busybox", "ping", "-c1", "-W1", &ip_a]),
                ("pod-b", vec!["/bin/busybox", "wget", "-O", "-", &url]),
                (
                    "pod-a",
                    vec![
                        "/bin/busybox",
                        "wget",
                        "-O",
                        "-",
                        "http://127.0.0.1:8080/index.html",
                    ],
                ),
                ("pod-a", vec!["/bin/busybox", "ls", "-la", "/www", "/bin"]),
                (
                    "pod-b",
                    vec!["/bin/busybox", "ping", "-c1", "-W1", "169.254.1.1"],
                ),
            ]
            .into_iter()
            .enumerate()
            {
                let mut args = vec!["task", "exec", "--exec-id"];
                let id = format!("diag{i}");
                args.push(&id);
                args.push(task);
                args.extend(argv.iter().copied());
                let o = world.ctr(&args);
                diag += &format!(
                    "{task} {argv:?} ({}): {}{}\n",
                    o.status,
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            for argv in [
                vec!["ip", "addr"],
                vec!["ip", "route"],
                vec!["iptables-save"],
                vec!["sysctl", "net.ipv4.ip_forward"],
            ] {
                let o = world.cmd(argv[0]).args(&argv[1..]).output().unwrap();
                diag += &format!(
                    "node {argv:?}: {}{}\n",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            panic!(
                "pod-b could not fetch {url}: {}{}\n{diag}\ntasks: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&world.ctr(&["task", "ls"]).stdout)
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(fetched.trim(), PAGE, "pod-b fetched {fetched:?} from {url}");
    assert_eq!(palisade_contract::read_attachments(&state_dir).0.len(), 2);
    // A pod run with --rm: ctr deletes its network (CNI DEL through the chain) when it exits.
    let out = world.must_ctr(&[
        "run",
        "--rm",
        "--cni",
        IMAGE,
        "pod-c",
        "/bin/busybox",
        "wget",
        "-O",
        "-",
        &url,
    ]);
    assert_eq!(out.trim(), PAGE, "pod-c fetched {out:?} from {url}");
    let recs = palisade_contract::read_attachments(&state_dir).0;
    assert_eq!(
        recs.len(),
        2,
        "pod-c's attachment should be gone after --rm: {recs:?}"
    );

    drop(cleanup);
    drop(containerd);
    drop(world);
    drop(node);
}

/// Kills and deletes our containers before containerd goes away (shims outlive containerd).
struct Cleanup<'a> {
    world: &'a World,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for id in ["pod-a", "pod-b", "pod-c"] {
            let _ = self.world.ctr(&["task", "kill", "-s", "SIGKILL", id]);
            let deadline = Instant::now() + Duration::from_secs(10);
            while !self.world.ctr(&["task", "delete", id]).status.success()
                && Instant::now() < deadline
            {
                let list = self.world.ctr(&["task", "ls", "-q"]);
                if !String::from_utf8_lossy(&list.stdout).contains(id) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = self.world.ctr(&["container", "delete", id]);
        }
        // runc leaves the (now empty) per-namespace cgroup directories behind.
        if let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") {
            for c in controllers.flatten() {
                let _ = std::fs::remove_dir(c.path().join(&self.world.namespace));
            }
        }
    }
}
