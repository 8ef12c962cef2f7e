"""Usage: table.py RUNS NAME... (e.g. runs/v2r b8-swap b4-swap b2-swap-honest b8-recompute-honest).
Issue 25: README rows of the CPU grids with predictor v2, from summary.json (FCFS / policy,
TTFT, TRAIL's share) and results.parquet (sprpt / TRAIL, and honest TRAIL / clamped TRAIL where
the clamped twin ran: the leak's worth), paired 95 % request-bootstrap intervals."""
import json, os, random, sys
import pyarrow.parquet as pq

R = sys.argv[1]  # the folder holding the run folders cpu-sm-NAME
def load(d):
    s = json.load(open(f"{d}/summary.json"))
    by = {}
    for r in pq.read_table(f"{d}/results.parquet").to_pylist():
        if r["error"] is None:
            by.setdefault((r["load"], r["policy"]), {})[(r["seed"], r["index"])] = r["latency_s"]
    return s, by

def boot(num, den, n=1000, seed=0):
    keys = sorted(set(num) & set(den)); rng = random.Random(seed); k = len(keys)
    f = lambda idx: sum(num[keys[i]] for i in idx) / sum(den[keys[i]] for i in idx)
    rs = sorted(f([rng.randrange(k) for _ in range(k)]) for _ in range(n))
    return {"value": f(range(k)), "lo": rs[int(0.025 * n)], "hi": rs[int(0.975 * n) - 1]}

def iv(x):
    return "–" if x is None else f"{x['value']:.2f} [{x['lo']:.2f}, {x['hi']:.2f}]".replace("-", "−")

print("| grid | load | FCFS ÷ TRAIL | FCFS ÷ sprpt | FCFS ÷ oracle | sprpt ÷ TRAIL | TTFT: FCFS ÷ TRAIL | TRAIL's share of the oracle's gain | honest ÷ clamped TRAIL |")
print("|---|---|---|---|---|---|---|---|---|")
for name in sys.argv[2:]:
    d = f"{R}/cpu-sm-{name}"
    s, by = load(d)
    twin = None if d.endswith("-clamp") else d.replace("-honest", "") + "-clamp"
    cl = load(twin)[1] if twin and os.path.exists(f"{twin}/results.parquet") else None
    for c in sorted(s["summary"]["comparisons"], key=lambda c: c["load"]):
        L = c["load"]; lat, tt = c["fcfs_over_policy_mean_latency"], c["fcfs_over_policy_mean_ttft"]
        sp = boot(by[(L, "sprpt")], by[(L, "trail")])
        leak = boot(by[(L, "trail")], cl[(L, "trail")]) if cl else None
        print(f"| {name} ({s['saturation']['rps']:.3f} rps) | {L:.2f} | {iv(lat.get('trail'))} | {iv(lat.get('sprpt'))} | {iv(lat.get('oracle'))} | {iv(sp)} | {iv(tt.get('trail'))} | {iv(c.get('trail_share_of_oracle_gain'))} | {iv(leak)} |")
