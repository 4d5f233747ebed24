# Charts for the datapath bench: ratio to no policy of connection rate and throughput, per system,
# against the number of policies. Input: the samples JSON written by `datapath-bench run`.
# Prints the PNG file names it wrote (next to the JSON).
import json, os, statistics, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

path = sys.argv[1]
samples = [s for s in json.load(open(path)) if not s.get("error")]
base = os.path.splitext(path)[0]
order = ["none", "iptables-model", "naive-nft-model", "palisade", "palisade-no-source-guard", "palisade-no-counters"]

def metric(name):
    def f(s):
        if name == "crr":
            return s["crr"]["per_second"] if s.get("crr") else None
        if name == "rr_p99":
            return s["rr"]["p99_us"] if s.get("rr") else None
        if name == "iperf":
            return s.get("iperf_gbps")
    return f

def ratios(f):
    ref = {}
    for s in samples:
        if s["system"] == "none" and f(s) is not None:
            ref[(s["round"], s["policies"])] = f(s)
    out = {}
    for s in samples:
        v = f(s)
        r = ref.get((s["round"], s["policies"]))
        if v is None or not r:
            continue
        out.setdefault((s["system"], s["policies"]), []).append(v / r)
    return {k: statistics.median(v) for k, v in out.items()}

written = []
for name, title in [("crr", "New connections/s, ratio to no policy"),
                    ("iperf", "Bulk throughput (iperf3), ratio to no policy"),
                    ("rr_p99", "Request/response p99 latency, ratio to no policy")]:
    r = ratios(metric(name))
    if not r:
        continue
    fig, ax = plt.subplots(figsize=(7, 4))
    for system in order:
        pts = sorted((p, v) for (s, p), v in r.items() if s == system)
        if not pts:
            continue
        xs = [max(p, 1) for p, _ in pts]
        ax.plot(xs, [v for _, v in pts], marker="o", label=system)
    ax.set_xscale("log")
    ax.set_xlabel("policies loaded (0 drawn at 1)")
    ax.set_ylabel("ratio to no policy")
    ax.set_title(title)
    if name == "crr":
        ax.axhline(0.95, color="grey", linestyle="--", linewidth=0.8)
    ax.grid(True, alpha=0.3)
    ax.legend()
    out = f"{base}-{name}.png"
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    written.append(os.path.basename(out))
for w in written:
    print(w)
