"""Paired ratios of the peer run (run.sh): per round and pooled over rounds, with 95 % percentile
bootstrap intervals over requests (resampled within each round, the same requests for every
system, so each ratio is paired). Writes results.json and results.md beside the cells.

Usage: python analyze.py OUT   (needs numpy and pyarrow)
"""
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

SYSTEMS = ["llama-server", "trail-fcfs", "trail-trail"]
PAIRS = [("llama-server", "trail-fcfs"), ("llama-server", "trail-trail"), ("trail-fcfs", "trail-trail")]
METRICS = {"mean_latency_s": "latency_s", "mean_ttft_s": "ttft_s", "mean_tpot_s": "tpot_s"}
RESAMPLES, SEED = 2000, 0


def load(out):
    """{round: {system: {column: array indexed by request index}}}"""
    rounds = {}
    for rdir in sorted((out / "cells").glob("round*")):
        r = int(rdir.name[5:])
        per = {}
        for s in SYSTEMS:
            t = pq.read_table(rdir / s / "results.parquet").to_pydict()
            order = np.argsort(t["index"])
            failed = [e for e in t["error"] if e]
            assert not failed, f"{rdir / s}: {len(failed)} failed requests: {failed[:3]}"
            per[s] = {c: np.array([t[c][i] for i in order], dtype=float) for c in METRICS.values()}
            per[s]["output_tokens"] = np.array([t["output_tokens"][i] for i in order], dtype=float)
        n = {len(v["latency_s"]) for v in per.values()}
        assert len(n) == 1, f"{rdir}: systems served different request counts {n}"
        for s in SYSTEMS[1:]:
            assert (per[s]["output_tokens"] == per[SYSTEMS[0]]["output_tokens"]).all(), \
                f"{rdir}: {s} generated other lengths than {SYSTEMS[0]}"
        rounds[r] = per
    return rounds


def ratio(rounds, a, b, col, idx=None):
    """mean over the pooled requests of a ÷ that of b (idx: per round, the resampled indices)"""
    xa, xb = [], []
    for r, per in rounds.items():
        i = slice(None) if idx is None else idx[r]
        xa.append(per[a][col][i]); xb.append(per[b][col][i])
    xa, xb = np.concatenate(xa), np.concatenate(xb)
    ok = ~(np.isnan(xa) | np.isnan(xb))
    return xa[ok].mean() / xb[ok].mean()


def main(out):
    rounds = load(out)
    rng = np.random.default_rng(SEED)
    n = {r: len(p[SYSTEMS[0]]["latency_s"]) for r, p in rounds.items()}
    boots = [{r: rng.integers(0, n[r], n[r]) for r in rounds}
             for _ in range(RESAMPLES)]
    res = {"rounds": sorted(rounds), "requests_per_round": len(next(iter(rounds.values()))["trail-fcfs"]["latency_s"]),
           "bootstrap": {"resamples": RESAMPLES, "seed": SEED}, "means": {}, "ratios": {}}
    for s in SYSTEMS:
        res["means"][s] = {m: float(np.nanmean(np.concatenate([p[s][c] for p in rounds.values()])))
                           for m, c in METRICS.items()}
    for a, b in PAIRS:
        key = f"{a}_over_{b}"
        res["ratios"][key] = {}
        for m, c in METRICS.items():
            vals = [ratio(rounds, a, b, c, idx) for idx in boots]
            lo, hi = np.quantile(vals, [0.025, 0.975])
            res["ratios"][key][m] = {
                "value": float(ratio(rounds, a, b, c)), "lo": float(lo), "hi": float(hi),
                "per_round": {str(r): float(ratio({r: rounds[r]}, a, b, c)) for r in rounds}}
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    md = ["| system | mean latency, s | mean TTFT, s | mean TPOT, ms |", "|---|---|---|---|"]
    for s in SYSTEMS:
        m = res["means"][s]
        md.append(f"| {s} | {m['mean_latency_s']:.2f} | {m['mean_ttft_s']:.2f} | {1000 * m['mean_tpot_s']:.1f} |")
    md += ["", "| ratio (paired) | mean latency | mean TTFT | mean TPOT | per round (latency) |", "|---|---|---|---|---|"]
    for key, r in res["ratios"].items():
        cells = [f"{r[m]['value']:.2f} [{r[m]['lo']:.2f}, {r[m]['hi']:.2f}]" for m in METRICS]
        per = ", ".join(f"{v:.2f}" for v in r["mean_latency_s"]["per_round"].values())
        md.append(f"| {key.replace('_over_', ' ÷ ')} | " + " | ".join(cells) + f" | {per} |")
    (out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
