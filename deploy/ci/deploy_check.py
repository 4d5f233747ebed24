#!/usr/bin/env python3
"""Offline checks of deploy/ (run by scripts/deploy-check.sh inside its venv).

1. kustomization: every resource exists, every manifest is listed; `kubectl kustomize` output when kubectl is there.
2. Every Kubernetes manifest against the Kubernetes JSON schemas (kubernetes-validate, strict).
3. The manifests keep their promises: ClusterRole read-only on five resources, the agent's capabilities,
   host paths, probes, env paths equal to the contract crate's constants, kind configs.
4. The init container's install script, run against a temp dir (atomic, executable result).
5. Containerfile: COPY sources exist, every workspace member is copied, cargo's -p names and the
   binaries copied out are the workspace's, Rust version, include_str! paths inside the copied tree.
6. checkov on the manifests and the Containerfile; every finding must be in deploy/ci/checkov-skips.txt.
Exits non-zero on the first failing section's end, after printing every problem found in it.
"""

from __future__ import annotations

import argparse
import atexit
import fnmatch
import ipaddress
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MANIFESTS = DEPLOY  # the install: the *.yaml at the top of deploy/ (kubectl apply -f deploy/)
CLEANUP = DEPLOY / "cleanup"
EXAMPLES = DEPLOY / "examples"
KIND = DEPLOY / "kind"
CONTAINERFILE = DEPLOY / "Containerfile"
SKIPS = DEPLOY / "ci" / "checkov-skips.txt"

AGENT_DS = ("DaemonSet", "palisade-system", "palisade-agent")
CLEANUP_DS = ("DaemonSet", "palisade-system", "palisade-cleanup")
AGENT_HOST_PATHS = {"/opt/cni/bin", "/etc/cni/net.d", "/var/lib/palisade"}
CLEANUP_HOST_PATHS = {"/opt/cni/bin", "/etc/cni/net.d"}
ROLE_RULES = {("", "pods"), ("", "namespaces"), ("", "nodes"), ("networking.k8s.io", "networkpolicies"),
              ("policy.networking.k8s.io", "clusternetworkpolicies")}
READ_VERBS = {"get", "list", "watch"}
AGENT_CAPS = {"NET_ADMIN"}

problems: list[str] = []


def fail(msg: str) -> None:
    problems.append(msg)
    print(f"  FAIL {msg}")


def ok(msg: str) -> None:
    print(f"  ok   {msg}")


def section(title: str) -> None:
    print(f"== {title}")


def end_section() -> None:
    if problems:
        print(f"deploy-check: {len(problems)} problem(s), see FAIL lines above", file=sys.stderr)
        sys.exit(1)


def rel(p: Path) -> str:
    try:
        return str(p.relative_to(ROOT))
    except ValueError:
        return str(p)


def load_docs(path: Path) -> list[dict]:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as e:
        fail(f"{rel(path)}: not valid YAML: {e}")
        return []
    for d in docs:
        if not isinstance(d, dict):
            fail(f"{rel(path)}: a document is not a mapping")
    return [d for d in docs if isinstance(d, dict)]


def key(doc: dict) -> tuple[str, str, str]:
    md = doc.get("metadata") or {}
    return (doc.get("kind", "?"), md.get("namespace", ""), md.get("name", "?"))


# ---------------------------------------------------------------- 1. kustomization


def check_kustomization() -> list[Path]:
    section("kustomization")
    kfile = DEPLOY / "Kustomization"
    k = yaml.safe_load(kfile.read_text()) or {}
    resources = k.get("resources") or []
    paths = []
    for r in resources:
        p = DEPLOY / r
        if not p.is_file():
            fail(f"Kustomization lists {r}, which does not exist")
        paths.append(p)
    if len(set(resources)) != len(resources):
        fail("Kustomization lists a resource twice")
    for m in sorted(MANIFESTS.glob("*.y*ml")):
        if m not in paths:
            fail(f"{rel(m)} is not listed in deploy/Kustomization (kubectl apply -k would not install it)")
    if not problems:
        ok(f"{len(resources)} resources listed, all present, none missing")
    kubectl = shutil.which("kubectl")
    if kubectl:
        r = subprocess.run([kubectl, "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            fail(f"kubectl kustomize deploy/ failed: {r.stderr.strip()}")
        else:
            built = [d for d in yaml.safe_load_all(r.stdout) if d]
            ok(f"kubectl kustomize deploy/ builds {len(built)} objects")
            built_dir = tempfile.mkdtemp(prefix="palisade-kustomize-")
            atexit.register(shutil.rmtree, built_dir, True)  # removed when the check ends
            out = Path(built_dir) / "built.yaml"
            out.write_text(r.stdout)
            paths.append(out)
    else:
        print("  note kubectl not found: kustomize build skipped (the listed files are validated directly)")
    end_section()
    return paths


# ---------------------------------------------------------------- 2. schemas


def check_schemas(files: list[Path], version: str) -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import VersionNotSupportedError

    section(f"Kubernetes schemas (kubernetes-validate {kubernetes_validate.version.__version__}, "
            f"Kubernetes {version}, strict)")
    count = 0
    for f in files:
        for doc in load_docs(f):
            k = key(doc)
            try:
                kubernetes_validate.validate(doc, version, strict=True)
                count += 1
            except VersionNotSupportedError:
                fail(f"kubernetes-validate has no schemas for Kubernetes {version}")
                end_section()
            except kubernetes_validate.SchemaNotFoundError as e:
                fail(f"{rel(f)}: {k}: no schema (unknown apiVersion/kind?): {e}")
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                fail(f"{rel(f)}: {k}: {path}: {e.message}")
            except kubernetes_validate.InvalidSchemaError as e:
                fail(f"{rel(f)}: {k}: invalid schema: {e}")
    if count == 0:
        fail("no manifest was validated")
    if not problems:
        ok(f"{count} objects in {len(files)} files valid")
    end_section()


# ---------------------------------------------------------------- 3. promises


def contract_consts() -> dict[str, str]:
    src = (ROOT / "contract" / "src" / "lib.rs").read_text()
    return dict(re.findall(r'pub const (\w+): &str = "([^"]*)";', src))


def default_listen() -> str | None:
    cli = ROOT / "policy-agent" / "src" / "cli.rs"
    if not cli.is_file():
        return None
    m = re.search(r'DEFAULT_LISTEN: &str = "([^"]*:\d+)"', cli.read_text())
    return m.group(1) if m else None


def split_listen(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]"), int(port)


def containers(ds: dict) -> list[dict]:
    spec = ds["spec"]["template"]["spec"]
    return (spec.get("initContainers") or []) + (spec.get("containers") or [])


def check_pod_basics(ds: dict, name: str, host_paths: set[str]) -> None:
    spec = ds["spec"]["template"]["spec"]
    if spec.get("hostNetwork") is not True:
        fail(f"{name}: hostNetwork must be true")
    if spec.get("priorityClassName") != "system-node-critical":
        fail(f"{name}: priorityClassName must be system-node-critical")
    if {"operator": "Exists"} not in (spec.get("tolerations") or []):
        fail(f"{name}: must tolerate every taint (a toleration with only operator: Exists)")
    got = {v["hostPath"]["path"] for v in spec.get("volumes") or [] if "hostPath" in v}
    if got != host_paths:
        fail(f"{name}: host paths {sorted(got)}, want exactly {sorted(host_paths)}")
    for c in containers(ds):
        sc = c.get("securityContext") or {}
        cn = f"{name}/{c['name']}"
        if sc.get("privileged"):
            fail(f"{cn}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            fail(f"{cn}: allowPrivilegeEscalation must be false")
        if sc.get("readOnlyRootFilesystem") is not True:
            fail(f"{cn}: readOnlyRootFilesystem must be true")
        caps = sc.get("capabilities") or {}
        if caps.get("drop") != ["ALL"]:
            fail(f"{cn}: must drop ALL capabilities")
        extra = set(caps.get("add") or []) - AGENT_CAPS
        if extra:
            fail(f"{cn}: capabilities {sorted(extra)} added beyond {sorted(AGENT_CAPS)}")
        res = c.get("resources") or {}
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in (res.get(kind) or {}):
                    fail(f"{cn}: resources.{kind}.{r} missing")


def check_promises(objs: dict[tuple, dict]) -> None:
    section("manifests keep their promises")
    consts = contract_consts()
    role = objs.get(("ClusterRole", "", "palisade-agent"))
    if not role:
        fail("ClusterRole palisade-agent missing")
    else:
        got = set()
        for rule in role.get("rules") or []:
            if set(rule.get("verbs") or []) != READ_VERBS:
                fail(f"ClusterRole rule {rule} has verbs other than get/list/watch")
            if rule.get("resourceNames") or rule.get("nonResourceURLs"):
                fail(f"ClusterRole rule {rule}: unexpected resourceNames/nonResourceURLs")
            for g in rule.get("apiGroups") or []:
                for r in rule.get("resources") or []:
                    got.add((g, r))
        if got != ROLE_RULES:
            fail(f"ClusterRole covers {sorted(got)}, want exactly {sorted(ROLE_RULES)}")
        else:
            ok("ClusterRole: get/list/watch on pods, namespaces, nodes, networkpolicies, "
               "clusternetworkpolicies, nothing more")
    binding = objs.get(("ClusterRoleBinding", "", "palisade-agent"))
    sa = objs.get(("ServiceAccount", "palisade-system", "palisade-agent"))
    if not binding or not sa:
        fail("ServiceAccount or ClusterRoleBinding palisade-agent missing")
    elif binding["subjects"] != [{"kind": "ServiceAccount", "name": "palisade-agent",
                                  "namespace": "palisade-system"}]:
        fail("ClusterRoleBinding must bind exactly the palisade-agent ServiceAccount")

    ds = objs.get(AGENT_DS)
    if not ds:
        fail("DaemonSet palisade-system/palisade-agent missing")
        end_section()
        return
    check_pod_basics(ds, "palisade-agent", AGENT_HOST_PATHS)
    spec = ds["spec"]["template"]["spec"]
    if spec.get("serviceAccountName") != "palisade-agent":
        fail("palisade-agent: serviceAccountName must be palisade-agent")
    agent = next((c for c in spec["containers"] if c["name"] == "agent"), None)
    init = next((c for c in spec.get("initContainers") or [] if c["name"] == "install-cni"), None)
    if not agent or not init:
        fail("palisade-agent: containers 'agent' and init container 'install-cni' expected")
        end_section()
        return
    if agent.get("command") != ["/usr/local/bin/palisade-agent", "run"]:
        fail(f"agent command {agent.get('command')}, want palisade-agent run")
    if set((agent["securityContext"].get("capabilities") or {}).get("add") or []) != AGENT_CAPS:
        fail("agent: capabilities.add must be exactly NET_ADMIN")
    env = {e["name"]: e for e in agent.get("env") or []}
    node = env.get("PALISADE_NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
    if node != "spec.nodeName":
        fail("agent: PALISADE_NODE_NAME must come from the downward API (spec.nodeName)")
    mounts = {m["mountPath"] for m in agent.get("volumeMounts") or []}
    for var, const in (("PALISADE_STATE_DIR", "DEFAULT_STATE_DIR"),
                       ("PALISADE_CNI_CONF_DIR", "DEFAULT_CNI_CONF_DIR"),
                       ("PALISADE_IPAM_DATA_DIR", "DEFAULT_IPAM_DATA_DIR")):
        val = env.get(var, {}).get("value")
        if val != consts.get(const):
            fail(f"agent: {var}={val!r}, but contract::{const} is {consts.get(const)!r}")
        if var != "PALISADE_IPAM_DATA_DIR" and val not in mounts:
            fail(f"agent: {var}={val} is not mounted")
    listen = env.get("PALISADE_LISTEN", {}).get("value") or default_listen()
    host, port = split_listen(listen) if listen else (None, None)
    if host in ("0.0.0.0", "::", ""):
        fail(f"agent: listens on {listen}: every address of the node (hostNetwork); "
             "use 127.0.0.1 or $(HOST_IP), see deploy/README.md")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = (agent.get(probe) or {}).get("httpGet") or {}
        if get.get("path") != path:
            fail(f"agent: {probe} must GET {path}")
        if port is not None and get.get("port") != port:
            fail(f"agent: {probe} port {get.get('port')}, but the agent listens on {listen}")
        # kubelet probes a hostNetwork pod at the node IP unless httpGet.host says otherwise.
        want_host = host if host in ("127.0.0.1", "::1") else None
        if get.get("host") != want_host:
            fail(f"agent: {probe} host {get.get('host')!r}, but the agent listens on {listen} "
                 f"(want host {want_host!r})")
    if not problems:
        ok(f"agent DaemonSet: NET_ADMIN only, read-only root, host paths {sorted(AGENT_HOST_PATHS)}, "
           f"paths = contract constants, listens on {listen}, probes reach it")

    cds = objs.get(CLEANUP_DS)
    if not cds:
        fail("deploy/cleanup: DaemonSet palisade-system/palisade-cleanup missing")
    else:
        check_pod_basics(cds, "palisade-cleanup", CLEANUP_HOST_PATHS)
        cmds = [c.get("command") for c in cds["spec"]["template"]["spec"].get("initContainers") or []]
        if ["/usr/local/bin/palisade-agent", "cleanup"] not in cmds:
            fail("palisade-cleanup: an init container must run `palisade-agent cleanup`")
        if not problems:
            ok("cleanup DaemonSet: runs palisade-agent cleanup, same confinement")
    end_section()


def check_kind() -> None:
    section("kind configs")
    files = sorted(KIND.glob("*.y*ml"))
    if not files:
        fail("deploy/kind/ has no config")
    allowed = {"ipFamily", "disableDefaultCNI", "podSubnet", "serviceSubnet", "apiServerAddress",
               "apiServerPort", "kubeProxyMode", "dnsSearch"}
    for f in files:
        for doc in load_docs(f):
            name = rel(f)
            if doc.get("apiVersion") != "kind.x-k8s.io/v1alpha4" or doc.get("kind") != "Cluster":
                fail(f"{name}: want apiVersion kind.x-k8s.io/v1alpha4, kind Cluster")
                continue
            net = doc.get("networking") or {}
            if net.get("disableDefaultCNI") is not True:
                fail(f"{name}: networking.disableDefaultCNI must be true (else kindnet is installed)")
            if set(net) - allowed:
                fail(f"{name}: unknown networking keys {sorted(set(net) - allowed)}")
            for field in ("podSubnet", "serviceSubnet"):
                for cidr in str(net.get(field, "")).split(","):
                    try:
                        ipaddress.ip_network(cidr.strip())
                    except ValueError:
                        fail(f"{name}: networking.{field} {cidr!r} is not a CIDR")
            fams = {ipaddress.ip_network(c.strip()).version for c in str(net.get("podSubnet", "")).split(",")
                    if c.strip() and _is_net(c)}
            want = {"ipv4": {4}, "ipv6": {6}, "dual": {4, 6}}.get(net.get("ipFamily", "ipv4"))
            if fams != want:
                fail(f"{name}: podSubnet families {sorted(fams)} do not match ipFamily {net.get('ipFamily', 'ipv4')}")
            for n in doc.get("nodes") or []:
                if n.get("role") not in ("control-plane", "worker"):
                    fail(f"{name}: node role {n.get('role')!r}")
    if not problems:
        ok(f"{len(files)} kind configs: default CNI disabled, subnets valid")
    end_section()


def _is_net(c: str) -> bool:
    try:
        ipaddress.ip_network(c.strip())
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------- 4. the init container's script


def check_install_script(objs: dict[tuple, dict]) -> None:
    section("install-cni script, run against a temp dir")
    spec = objs[AGENT_DS]["spec"]["template"]["spec"]
    init = next(c for c in spec["initContainers"] if c["name"] == "install-cni")
    cmd = init["command"] + init.get("args", [])
    if cmd[:2] != ["/bin/sh", "-c"] or len(cmd) != 3:
        fail(f"install-cni: expected [/bin/sh, -c, SCRIPT], got {cmd}")
        end_section()
        return
    script = cmd[2]
    with tempfile.TemporaryDirectory(prefix="palisade-install-") as tmp:
        t = Path(tmp)
        (t / "host/opt/cni/bin").mkdir(parents=True)
        (t / "usr/local/bin").mkdir(parents=True)
        new = b"#!/bin/sh\necho new palisade\n"
        (t / "usr/local/bin/palisade").write_bytes(new)
        old = t / "host/opt/cni/bin/palisade"
        old.write_bytes(b"old")
        old_ino = old.stat().st_ino
        local = script.replace("/host/opt/cni/bin", f"{t}/host/opt/cni/bin") \
                      .replace("/usr/local/bin/palisade", f"{t}/usr/local/bin/palisade")
        r = subprocess.run(["/bin/sh", "-c", local], capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            fail(f"install-cni script failed: {r.stderr.strip()}")
        else:
            st = old.stat()
            if old.read_bytes() != new:
                fail("install-cni: /opt/cni/bin/palisade does not hold the new binary")
            if stat.S_IMODE(st.st_mode) != 0o755:
                fail(f"install-cni: mode {oct(stat.S_IMODE(st.st_mode))}, want 0755")
            if st.st_ino == old_ino:
                fail("install-cni: the old file was overwritten in place, not replaced by rename")
            left = sorted(p.name for p in (t / "host/opt/cni/bin").iterdir())
            if left != ["palisade"]:
                fail(f"install-cni left {left} in /opt/cni/bin")
    if not problems:
        ok("installs by rename, mode 0755, leaves no temp file")
    end_section()


# ---------------------------------------------------------------- 5. Containerfile


def containerfile_instructions() -> list[tuple[str, str]]:
    lines, cur = [], ""
    for raw in CONTAINERFILE.read_text().splitlines():
        s = raw.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if cur and s.startswith("#"):
            continue
        if s.endswith("\\"):
            cur += s[:-1] + " "
            continue
        cur += s
        word, _, rest = cur.partition(" ")
        lines.append((word.upper(), rest.strip()))
        cur = ""
    return lines


def workspace() -> tuple[list[str], dict[str, dict], str]:
    ws = tomllib.loads((ROOT / "Cargo.toml").read_text())
    members = ws["workspace"]["members"]
    pkgs = {}
    for m in members:
        man = tomllib.loads((ROOT / m / "Cargo.toml").read_text())
        name = man["package"]["name"]
        bins = [b["name"] for b in man.get("bin", [])]
        if not bins and (ROOT / m / "src" / "main.rs").is_file():
            bins = [name]
        pkgs[name] = {"dir": m, "bins": bins}
    return members, pkgs, ws["workspace"].get("package", {}).get("rust-version", "0")


def vtuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def check_containerfile() -> None:
    section("Containerfile (no build: paths, names, versions)")
    ins = containerfile_instructions()
    members, pkgs, rust_version = workspace()
    args = {}
    for word, rest in ins:
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k.strip()] = v.strip()

    def expand(s: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), s)

    stages, workdir, copied = {}, None, []
    built: list[str] = []
    for word, rest in ins:
        if word == "FROM":
            parts = expand(rest).split()
            image = parts[0]
            if "${" in image:
                fail(f"FROM {rest}: ARG without default")
            tag = image.rsplit(":", 1)[1] if ":" in image.rsplit("/", 1)[-1] else ""
            if not tag or tag == "latest":
                fail(f"FROM {image}: pin a tag (not latest)")
            if len(parts) >= 3 and parts[1].upper() == "AS":
                stages[parts[2]] = image
            m = re.match(r".*/rust:([\d.]+)", image)
            if m and vtuple(m.group(1)) < vtuple(rust_version):
                fail(f"{image}: Rust {m.group(1)} is older than the workspace's rust-version {rust_version}")
        elif word == "WORKDIR":
            workdir = rest
        elif word == "COPY":
            toks = rest.split()
            flags = [t for t in toks if t.startswith("--")]
            srcs = [t for t in toks if not t.startswith("--")][:-1]
            src_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
            if src_stage is None:
                for s in srcs:
                    if not (ROOT / s).exists():
                        fail(f"COPY {s}: no such path in the workspace root (the build context)")
                    copied.append(s.rstrip("/"))
            else:
                if src_stage not in stages:
                    fail(f"COPY --from={src_stage}: no such stage")
                for s in srcs:
                    m = re.fullmatch(re.escape(f"{workdir}/target/release/") + r"([\w-]+)", s)
                    if not m:
                        fail(f"COPY --from {s}: expected {workdir}/target/release/<binary>")
                    else:
                        built_bins = {b for p in built for b in pkgs.get(p, {}).get("bins", [])}
                        if m.group(1) not in built_bins:
                            fail(f"COPY --from {s}: {m.group(1)} is not a binary of {sorted(built)}")
        elif word == "RUN" and "cargo build" in rest:
            toks = rest.split()
            for flag in ("--release", "--locked"):
                if flag not in toks:
                    fail(f"cargo build without {flag}")
            built = [toks[i + 1] for i, t in enumerate(toks) if t == "-p"]
            for p in built:
                if p not in pkgs:
                    fail(f"cargo build -p {p}: no such package in the workspace ({sorted(pkgs)})")
            if set(built) != {"palisade-cni", "palisade-agent"}:
                fail(f"cargo build packages {built}, want palisade-cni and palisade-agent")
    for need in ["Cargo.toml", "Cargo.lock", *members]:
        if need not in copied:
            fail(f"Containerfile does not COPY {need} (cargo needs every workspace member)")
    # include_str!/include_bytes! must resolve inside what was copied.
    for m in members:
        for rs in (ROOT / m).rglob("*.rs"):
            for inc in re.findall(r'include_(?:str|bytes)!\(\s*"([^"]+)"', rs.read_text(errors="replace")):
                target = (rs.parent / inc).resolve()
                tops = [(ROOT / c).resolve() for c in copied]
                if not any(target == t or t in target.parents for t in tops):
                    fail(f"{rel(rs)} includes {inc}, which the Containerfile does not copy")
                elif not target.exists():
                    fail(f"{rel(rs)} includes {inc}, which does not exist")
    # Binaries the manifests exec must be installed by the image.
    installed = set()
    for word, rest in ins:
        if word == "COPY" and "--from=" in rest:
            installed.add(rest.split()[-1])
    for f in [*MANIFESTS.glob("*.yaml"), *CLEANUP.glob("*.yaml")]:
        for doc in load_docs(f):
            if doc.get("kind") != "DaemonSet":
                continue
            for c in containers(doc):
                exe = (c.get("command") or [""])[0]
                if exe.startswith("/usr/local/bin/") and exe not in installed:
                    fail(f"{rel(f)}: {c['name']} runs {exe}, which the Containerfile does not install")
    ignore = DEPLOY / "Containerfile.dockerignore"
    if ignore.is_file():
        pats = [l.strip().rstrip("/") for l in ignore.read_text().splitlines()
                if l.strip() and not l.startswith("#") and not l.startswith("!")]
        for c in copied:
            for pat in pats:
                if fnmatch.fnmatch(c, pat):
                    fail(f"Containerfile.dockerignore pattern {pat!r} excludes {c}, which the build copies")
    cargo = shutil.which("cargo")
    if cargo:
        r = subprocess.run([cargo, "metadata", "--locked", "--format-version", "1"], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            fail(f"cargo metadata --locked: Cargo.lock is not in sync ({r.stderr.strip()[-300:]})")
        else:
            ok("Cargo.lock in sync with the manifests (cargo metadata --locked)")
    else:
        print("  note cargo not found: Cargo.lock sync not checked")
    if not problems:
        ok(f"COPY sources exist; all {len(members)} members copied; -p {sorted(built)} and the copied "
           f"binaries are the workspace's; Rust >= {rust_version}")
    end_section()


# ---------------------------------------------------------------- 6. checkov


def load_skips() -> list[tuple[str, str, str]]:
    skips = []
    for n, line in enumerate(SKIPS.read_text().splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        m = re.fullmatch(r"(CKV2?_[A-Z0-9_]+)\s+(\S+?):\s+(.+)", s)
        if not m or len(m.group(3)) < 20:
            fail(f"checkov-skips.txt:{n}: want 'CHECK_ID RESOURCE: justification', got {s!r}")
            continue
        skips.append(m.groups())
    return skips


def run_checkov(checkov: str, scan_dir: Path) -> tuple[list[dict], int]:
    env = dict(os.environ, BC_SKIP_MAPPING="TRUE", CHECKOV_NO_OUTPUT_COLOR="1", ANSI_COLORS_DISABLED="1",
               LOG_LEVEL="ERROR")
    r = subprocess.run([checkov, "-d", str(scan_dir), "--framework", "kubernetes", "dockerfile",
                        "-o", "json", "--skip-download", "--quiet", "--compact"],
                       capture_output=True, text=True, timeout=600, env=env)
    if r.returncode not in (0, 1):
        fail(f"checkov exited {r.returncode}: {r.stderr.strip()[-500:]}")
        return [], 0
    try:
        out = json.loads(r.stdout)
    except json.JSONDecodeError:
        fail(f"checkov output is not JSON: {r.stdout[:300]} {r.stderr[-300:]}")
        return [], 0
    reports = out if isinstance(out, list) else [out]
    failed, passed = [], 0
    for rep in reports:
        if isinstance(rep, dict) and "results" in rep:
            failed += rep["results"].get("failed_checks", [])
            summary = rep.get("summary", {})
            passed += summary.get("passed", 0)
            print(f"  ran  checkov {rep.get('check_type')} on {scan_dir.name}: {summary.get('passed', 0)} "
                  f"passed, {summary.get('failed', 0)} failed")
        elif isinstance(rep, dict) and "passed" in rep:
            # --quiet with no finding at all: checkov prints only this summary.
            passed += rep["passed"]
            print(f"  ran  checkov on {scan_dir.name}: {rep['passed']} passed, {rep['failed']} failed, "
                  f"{rep.get('resource_count', 0)} resources with applicable checks")
        else:
            fail(f"checkov output not understood: {str(rep)[:300]}")
    return failed, passed


def check_checkov(checkov: str) -> None:
    section("checkov security lint")
    skips = load_skips()
    used = set()
    findings = []
    with tempfile.TemporaryDirectory(prefix="palisade-checkov-") as tmp:
        # The agent's objects with the Containerfile (checkov knows it only by the name Dockerfile), then
        # the examples on their own (a policy there must not hide a finding on ours).
        agent, examples = Path(tmp, "agent"), Path(tmp, "examples")
        agent.mkdir()
        for f in [*MANIFESTS.glob("*.yaml"), *CLEANUP.glob("*.yaml")]:
            shutil.copy(f, agent / f.name)
        shutil.copy(CONTAINERFILE, agent / "Dockerfile")
        shutil.copytree(EXAMPLES, examples)
        for d in (agent, examples):
            failed, passed = run_checkov(checkov, d)
            findings += failed
            if d is agent and passed == 0:
                fail("checkov passed no check on the agent's manifests: it did not scan them")
    for f in findings:
        cid, res = f.get("check_id"), f.get("resource")
        hit = [i for i, (sc, pat, _) in enumerate(skips) if sc == cid and fnmatch.fnmatchcase(res, pat)]
        if hit:
            used.update(hit)
            print(f"  skip {cid} {res}: listed in checkov-skips.txt")
        else:
            fail(f"checkov {cid} ({f.get('check_name')}) on {res} in {Path(f.get('file_path', '')).name}: "
                 "fix it or list it with a justification in deploy/ci/checkov-skips.txt")
    for i, (cid, pat, _) in enumerate(skips):
        if i not in used:
            fail(f"checkov-skips.txt: {cid} {pat} matches no finding any more: remove it")
    if not problems:
        ok(f"{len(findings)} findings, every one listed and justified; no stale entries")
    end_section()


def main() -> None:
    sys.stdout.reconfigure(line_buffering=True)
    ap = argparse.ArgumentParser()
    ap.add_argument("--k8s-version", required=True)
    ap.add_argument("--checkov", required=True)
    a = ap.parse_args()

    files = check_kustomization()
    files += sorted(CLEANUP.glob("*.y*ml")) + sorted(EXAMPLES.glob("*.y*ml"))
    check_schemas(files, a.k8s_version)
    objs = {}
    for f in [*MANIFESTS.glob("*.y*ml"), *CLEANUP.glob("*.y*ml")]:
        for d in load_docs(f):
            objs[key(d)] = d
    check_promises(objs)
    check_kind()
    check_install_script(objs)
    check_containerfile()
    check_checkov(a.checkov)
    print("deploy-check: all checks passed")


if __name__ == "__main__":
    main()
