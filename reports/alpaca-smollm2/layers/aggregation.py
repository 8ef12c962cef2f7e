"""Layer aggregation for the token probe (issue 24): one layer, the concatenation of three, the
element-wise mean (= sum, see below) over a band of layers, and a learned mixing over the band.

Every variant trains predictor v2's token probe the way `trail train` does (standardized input
-> 512 -> ReLU -> k + 1 with the "runs to the cap" class; Adam, batch 256, cosine over 12
epochs, weight decay 0.01, the best validation epoch kept; seed 0) on the same (request, g)
rows, and is scored on validation (the selection criterion) and test: the probe alone, and
refined by the paper's filter started from the train split's label distribution at g = 0 (not
from a prompt predictor, so the refined column is not `metrics.json`'s `refined`; the variants
compare among themselves). No calibration, no g input: the aggregation is the only change.

The probe standardizes its input per feature, so the sum over a band is the mean times a
constant and trains identically (up to the 1e-6 added to the deviation): one row covers both.
The learned mixing standardizes each layer, then mixes them with softmax weights trained
jointly with the probe (the weights start equal); the weights are printed.

usage: python3 aggregation.py RUN_DIR SINGLE CONCAT BAND [BAND2]
  e.g. python3 aggregation.py runs/alpaca-r 16 16,17,19 12-22 14-20   (needs numpy, polars)
"""
import glob
import os
import sys

import numpy as np
import polars as pl

MAX_NEW, K_BINS = 512, 10


def layer_list(s):
    if "-" in s:
        a, b = s.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(x) for x in s.split(",")]


RUN = sys.argv[1]
SINGLE = int(sys.argv[2])
CONCAT = layer_list(sys.argv[3])
BANDS = [layer_list(s) for s in sys.argv[4:]]
LAYERS = sorted({SINGLE, *CONCAT, *[l for b in BANDS for l in b]})

req = pl.read_parquet(f"{RUN}/requests.parquet").select(["request_id", "split", "output_tokens"])


def load(layer):
    files = sorted(glob.glob(f"{RUN}/embeddings/layer={layer}/*.parquet"))
    e = pl.concat([pl.read_parquet(f, columns=["request_id", "kind", "g", "remaining", "embedding"])
                   for f in files])
    return e.filter(pl.col("kind") == "token").sort(["request_id", "g"])


first = load(LAYERS[0]).join(req, on="request_id")
g = first["g"].to_numpy().astype(np.int64)
rem = first["remaining"].to_numpy().astype(np.int64)
split = first["split"].to_numpy()
rid = first["request_id"].to_numpy()
capped = first["output_tokens"].to_numpy() >= MAX_NEW
tr, va, te = (split == "train"), (split == "val"), (split == "test")
keys = first.select(["request_id", "g"])
H = {}
for l in LAYERS:
    e = first if l == LAYERS[0] else load(l)
    assert e.select(["request_id", "g"]).equals(keys), f"layer {l}: rows differ"
    H[l] = e["embedding"].to_numpy().astype(np.float32)
    print(f"layer {l}: {H[l].shape}", file=sys.stderr, flush=True)
del first

y = np.where(capped, K_BINS, np.minimum(rem // (MAX_NEW / K_BINS), K_BINS - 1)).astype(np.int64)
K = K_BINS + 1


def standardize(F):
    mu, sd = F[tr].mean(0), F[tr].std(0) + 1e-6
    return ((F - mu) / sd).astype(np.float32)


def readout(p, gg):
    lim = (MAX_NEW - gg).astype(np.float64)
    e = p[:, :K_BINS] @ ((np.arange(K_BINS) + 0.5) * (MAX_NEW / K_BINS)) + p[:, K_BINS] * lim
    return np.clip(e, 0, lim)


def softmax(l):
    e = np.exp(l - l.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def train(Zs, epochs=int(os.environ.get("AGG_EPOCHS", 12)), lr=1e-3, hidden=512, batch=256, seed=0):
    """Zs: one standardized matrix (mix = None) or a list of them (learned softmax mixing)."""
    rng = np.random.default_rng(seed)
    mix = isinstance(Zs, list)
    d = Zs[0].shape[1] if mix else Zs.shape[1]
    P = [(rng.standard_normal((d, hidden)) / np.sqrt(d)).astype(np.float32),
         np.zeros(hidden, np.float32),
         (rng.standard_normal((hidden, K)) / np.sqrt(hidden)).astype(np.float32),
         np.zeros(K, np.float32)]
    if mix:
        P.append(np.zeros(len(Zs), np.float32))  # mixing logits
    M = [np.zeros_like(q) for q in P]
    V = [np.zeros_like(q) for q in P]

    def inputs(rows, a=None):
        if not mix:
            return Zs[rows]
        w = softmax(a)
        return sum(wi * Z[rows] for wi, Z in zip(w, Zs))

    def probs(rows, P):
        S = inputs(rows, P[4] if mix else None)
        return softmax(np.maximum(S @ P[0] + P[1], 0) @ P[2] + P[3])

    idx = np.where(tr)[0]
    steps = epochs * (len(idx) // batch)
    t, best = 0, (np.inf, None)
    for _ in range(epochs):
        rng.shuffle(idx)
        for s in range(len(idx) // batch):
            b = idx[s * batch:(s + 1) * batch]
            S = inputs(b, P[4] if mix else None)
            pre = S @ P[0] + P[1]
            h = np.maximum(pre, 0)
            gl = softmax(h @ P[2] + P[3])
            gl[np.arange(len(b)), y[b]] -= 1
            gl /= len(b)
            gh = gl @ P[2].T
            gh[pre <= 0] = 0
            grads = [S.T @ gh, gh.sum(0), h.T @ gl, gl.sum(0)]
            if mix:
                gS = gh @ P[0].T
                w = softmax(P[4])
                gw = np.array([(gS * Z[b]).sum() for Z in Zs], np.float32)
                grads.append(w * (gw - (w * gw).sum()))
            t += 1
            cur = lr * 0.5 * (1 + np.cos(np.pi * t / steps))
            for i, (q, dq) in enumerate(zip(P, grads)):
                M[i] = 0.9 * M[i] + 0.1 * dq
                V[i] = 0.999 * V[i] + 0.001 * dq * dq
                decay = 0.01 * q if i in (0, 2) else 0
                q -= cur * ((M[i] / (1 - 0.9 ** t)) / (np.sqrt(V[i] / (1 - 0.999 ** t)) + 1e-8)
                            + decay)
        vrows = np.where(va)[0]
        mae = np.abs(readout(probs(vrows, P), g[va]) - rem[va]).mean()
        if mae < best[0]:
            best = (mae, [q.copy() for q in P])
    P = best[1]
    weights = softmax(P[4]) if mix else None
    return probs(np.where(te)[0], P), best[0], weights


def refined(p):
    """The paper's filter over each test request's sampled positions in order of g; the cap
    class stays where it is."""
    w = MAX_NEW / K_BINS
    T = np.eye(K)
    for i in range(1, K_BINS):
        T[i, i], T[i, i - 1] = 1 - 1 / w, 1 / w
    prior0 = np.bincount(y[tr & (g == 0)], minlength=K) + 1.0
    prior0 /= prior0.sum()
    gt, rt = g[te], rid[te]
    post = np.zeros_like(p, dtype=np.float64)
    last, q, g0 = None, None, 0
    for o in np.lexsort((gt, rt)):
        if rt[o] != last:
            last, q, g0 = rt[o], prior0.copy(), 0
        q = q @ np.linalg.matrix_power(T, int(gt[o] - g0))
        q = np.maximum(q * p[o], 1e-8)
        q /= q.sum()
        g0 = gt[o]
        post[o] = q
    return post


def name(ls):
    return f"{ls[0]}–{ls[-1]}" if ls == list(range(ls[0], ls[-1] + 1)) else ",".join(map(str, ls))


variants = [(f"layer {SINGLE}", lambda: standardize(H[SINGLE])),
            (f"concat {name(CONCAT)}", lambda: standardize(np.concatenate([H[l] for l in CONCAT], 1)))]
for band in BANDS:
    variants.append((f"mean {name(band)}", lambda band=band: standardize(np.mean([H[l] for l in band], 0))))
    variants.append((f"learned mix {name(band)}", lambda band=band: [standardize(H[l]) for l in band]))

rows = []
for label, build in variants:
    p, val, weights = train(build())
    mae = lambda est: np.abs(est - rem[te]).mean()
    rows.append((label, val, mae(readout(p, g[te])), mae(readout(refined(p), g[te]))))
    extra = "" if weights is None else " weights " + " ".join(f"{w:.3f}" for w in weights)
    print(f"{label}: val {val:.2f}{extra}", file=sys.stderr, flush=True)
    if weights is not None:
        rows[-1] = rows[-1] + (weights,)

print(f"`{RUN}`: {int(tr.sum())} train, {int(va.sum())} val, {int(te.sum())} test (request, g) "
      f"pairs; predictor v2's bins (10 + the cap class); MAE of the remaining length in tokens.\n")
print("| aggregation | val MAE | test, probe | test, refined |")
print("|---|---|---|---|")
for r in rows:
    print(f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f} |")
for r in rows:
    if len(r) > 4:
        print(f"\n{r[0]}: weights " + ", ".join(f"{w:.3f}" for w in r[4]))
