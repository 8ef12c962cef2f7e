"""Where a queue builds in the GPU regime: FCFS / policy in mean latency at 0.8 and 0.95 of each
running cap's own saturation, H100 Llama-3-8B step model, recompute, predictor v2, against the
running cap (4-32 here, 48 in ../h100-recompute). Reads the committed summary.json files; writes
slots.md (the table) and slots.png / slots.svg. Usage: python slots.py (from this folder)."""
import json, os
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

HERE = os.path.dirname(os.path.abspath(__file__))
CAPS = [4, 8, 16, 32, 48]
NAMES = {"trail": "TRAIL", "sprpt": "SPRPT", "oracle": "Oracle (true lengths)", "sjf-bert": "SJF (BERT)"}

def summary(cap):
    d = os.path.join(HERE, f"h100-recompute-{cap}") if cap != 48 else os.path.join(HERE, "..", "h100-recompute")
    return json.load(open(os.path.join(d, "summary.json")))

def iv(x):
    return "–" if x is None else f"{x['value']:.2f} [{x['lo']:.2f}, {x['hi']:.2f}]".replace("-", "−")

rows, points = [], {}
for cap in CAPS:
    s = summary(cap)
    for c in sorted(s["summary"]["comparisons"], key=lambda c: c["load"]):
        if c["load"] not in (0.8, 0.95):
            continue
        lat, tt = c["fcfs_over_policy_mean_latency"], c["fcfs_over_policy_mean_ttft"]
        rows.append(f"| {cap} | {s['saturation']['rps']:.2f} | {c['load']:.2f} | {iv(lat['trail'])} | {iv(lat['oracle'])} "
                    f"| {iv(lat['sjf-bert'])} | {iv(tt['trail'])} | {iv(c.get('trail_share_of_oracle_gain'))} |")
        for p in ("trail", "oracle"):
            points.setdefault((c["load"], p), []).append((cap, lat[p]))

with open(os.path.join(HERE, "slots.md"), "w") as f:
    f.write("| running cap | saturation (requests/s) | load | FCFS ÷ TRAIL | FCFS ÷ oracle | FCFS ÷ SJF (BERT) | TTFT: FCFS ÷ TRAIL | TRAIL's share of the oracle's gain |\n")
    f.write("|---|---|---|---|---|---|---|---|\n")
    f.write("\n".join(rows) + "\n")

fig, ax = plt.subplots(figsize=(7, 4.5))
styles = {("trail", 0.95): ("C0", "o", "-"), ("oracle", 0.95): ("C1", "s", "-"),
          ("trail", 0.8): ("C0", "o", "--"), ("oracle", 0.8): ("C1", "s", "--")}
for (load, p), pts in sorted(points.items()):
    color, marker, ls = styles[(p, load)]
    xs = [c for c, _ in pts]; ys = [x["value"] for _, x in pts]
    err = [[x["value"] - x["lo"] for _, x in pts], [x["hi"] - x["value"] for _, x in pts]]
    ax.errorbar(xs, ys, yerr=err, color=color, marker=marker, ls=ls, capsize=3,
                label=f"{NAMES[p]}, load {load:.2f}")
ax.axhline(1.0, color="grey", lw=0.8)
ax.axhspan(1.66, 2.01, color="C2", alpha=0.15, label="paper (vLLM, 48 running): 1.66–2.01×")
ax.set_xscale("log", base=2); ax.set_xticks(CAPS); ax.set_xticklabels([str(c) for c in CAPS])
ax.set_xlabel("running cap (requests in the batch)")
ax.set_ylabel("FCFS ÷ policy, mean latency (> 1: policy faster)")
ax.set_title("H100 Llama-3-8B step model, recompute, predictor v2")
ax.legend(fontsize=8, loc="upper right")
fig.tight_layout()
for ext in ("png", "svg"):
    fig.savefig(os.path.join(HERE, f"slots.{ext}"), dpi=150)
