# Charts for enforce-bench: p50 and p99 enforcement latency (grant and revoke) per change kind and
# cluster size, one panel per churn rate. Input: the JSON written by `enforce-bench run`.
# Prints the PNG file names it wrote (next to the JSON).
import json, math, os, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

path = sys.argv[1]
data = json.load(open(path))
scen = data.get("run", {}).get("scenarios", [])
base = os.path.splitext(path)[0]

def q(v, p):
    v = sorted(x for x in v if x is not None and math.isfinite(x))
    if not v:
        return float("nan")
    return v[max(1, math.ceil(p * len(v))) - 1]

rates = sorted({s["churn_per_second"] for s in scen})
written = []
if scen:
    fig, axes = plt.subplots(1, len(rates), figsize=(5 * len(rates), 4.2), squeeze=False, sharey=True)
    kinds = ["Policy", "Label", "Pod"]
    for ax, rate in zip(axes[0], rates):
        rows = [s for s in scen if s["churn_per_second"] == rate]
        sizes = sorted({s["pods"] for s in rows})
        labels, p50g, p99g, p50r, p99r = [], [], [], [], []
        for size in sizes:
            for k in kinds:
                r = [s for s in rows if s["pods"] == size and s["scenario"] == k]
                if not r:
                    continue
                r = r[0]
                labels.append(f"{k.lower()}\n{size} pods")
                p50g.append(q(r["grant_ms"], 0.5)); p99g.append(q(r["grant_ms"], 0.99))
                p50r.append(q(r["revoke_ms"], 0.5)); p99r.append(q(r["revoke_ms"], 0.99))
        x = range(len(labels))
        w = 0.2
        ax.bar([i - 1.5 * w for i in x], p50g, w, label="grant p50")
        ax.bar([i - 0.5 * w for i in x], p99g, w, label="grant p99")
        ax.bar([i + 0.5 * w for i in x], p50r, w, label="revoke p50")
        ax.bar([i + 1.5 * w for i in x], p99r, w, label="revoke p99")
        ax.axhline(100, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xticks(list(x)); ax.set_xticklabels(labels, fontsize=7)
        ax.set_title(f"churn {rate}/s")
        ax.set_ylabel("ms from write to probe flip")
        ax.grid(True, axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("palisade enforcement latency (dashed: 100 ms target)")
    fig.tight_layout()
    out = f"{base}-latency.png"
    fig.savefig(out, dpi=100)
    written.append(os.path.basename(out))
for w in written:
    print(w)
