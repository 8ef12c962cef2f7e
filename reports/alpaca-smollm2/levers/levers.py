"""Levers toward a lower refined MAE, tried on one layer of a generated run (numpy, CPU).

Trains the probe MLP (standardized input -> 512 -> ReLU -> k) with Adam, batch 256, cosine
over 12 epochs, best validation epoch kept (trail train's defaults), once per variant, seed 0,
and scores every variant on the test split's sampled (request, g) pairs like `trail report`:
without refinement, and refined with the paper's Bayesian filter (prior = q T^s, posterior
proportional to prior * p, clamp 1e-8), started from the train split's label distribution at
g = 0 (not from a prompt predictor, so its refined MAE is not `metrics.json`'s).

Variants:
  base      k = 10 equal bins of the remaining length over 0..512 (the paper's head)
  +g        the tokens generated so far (g / 512 and log(1 + g)) appended to the input
  k=32      32 bins
  cap       an eleventh class "runs to the output cap": its remaining length is
            max_new - g exactly, and the filter keeps it (T is the identity on it)
  cap+g     both
Readouts: expectation over bin midpoints (the paper's), and the median of the predicted
distribution (the point that minimizes absolute error).

usage: python3 levers.py RUN_DIR [LAYER]      (needs numpy and polars)
"""
import glob
import sys

import numpy as np
import polars as pl

RUN = sys.argv[1]
LAYER = int(sys.argv[2]) if len(sys.argv) > 2 else 16
MAX_NEW = 512

req = pl.read_parquet(f"{RUN}/requests.parquet").select(
    ["request_id", "split", "output_tokens"])
emb = pl.concat([pl.read_parquet(f) for f in
                 sorted(glob.glob(f"{RUN}/embeddings/layer={LAYER}/*.parquet"))])
emb = emb.filter(pl.col("kind") == "token").join(req, on="request_id")
X = emb["embedding"].to_numpy().astype(np.float32)
g = emb["g"].to_numpy().astype(np.int64)
rem = emb["remaining"].to_numpy().astype(np.int64)
split = emb["split"].to_numpy()
rid = emb["request_id"].to_numpy()
capped = emb["output_tokens"].to_numpy() >= MAX_NEW
tr, va, te = (split == "train"), (split == "val"), (split == "test")


def labels(k, cap):
    y = np.minimum(rem // (MAX_NEW / k), k - 1).astype(np.int64)
    return np.where(capped, k, y) if cap else y


def readout(p, k, gg, cap, median=False):
    w = MAX_NEW / k
    lim = (MAX_NEW - gg).astype(np.float64)
    if not median:
        e = p[:, :k] @ ((np.arange(k) + 0.5) * w)
        if cap:
            e = e + p[:, k] * lim
        return np.clip(e, 0, lim)
    # Median of uniform-within-bin mass plus, with cap, a point mass at lim.
    xs = np.arange(MAX_NEW + 1, dtype=np.float64)
    frac = np.clip((xs[None, :] - (np.arange(k) * w)[:, None]) / w, 0, 1)  # k x 513
    cdf = p[:, :k] @ frac
    if cap:
        cdf = cdf + p[:, k:k + 1] * (xs[None, :] >= lim[:, None])
    return np.minimum(np.argmax(cdf >= 0.5, axis=1).astype(np.float64), lim)


def train(k, use_g, cap, epochs=12, lr=1e-3, hidden=512, batch=256, seed=0):
    rng = np.random.default_rng(seed)
    F = X
    if use_g:
        F = np.concatenate([X, (g / MAX_NEW)[:, None], np.log1p(g)[:, None]], 1)
    mu, sd = F[tr].mean(0), F[tr].std(0) + 1e-6
    Z = ((F - mu) / sd).astype(np.float32)
    y = labels(k, cap)
    K = k + 1 if cap else k
    P = [(rng.standard_normal((Z.shape[1], hidden)) / np.sqrt(Z.shape[1])).astype(np.float32),
         np.zeros(hidden, np.float32),
         (rng.standard_normal((hidden, K)) / np.sqrt(hidden)).astype(np.float32),
         np.zeros(K, np.float32)]
    M = [np.zeros_like(q) for q in P]
    V = [np.zeros_like(q) for q in P]

    def probs(S, W1, b1, W2, b2):
        l = np.maximum(S @ W1 + b1, 0) @ W2 + b2
        e = np.exp(l - l.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    idx = np.where(tr)[0]
    steps = epochs * (len(idx) // batch)
    t, best = 0, (np.inf, None)
    for _ in range(epochs):
        rng.shuffle(idx)
        for s in range(len(idx) // batch):
            b = idx[s * batch:(s + 1) * batch]
            W1, b1, W2, b2 = P
            pre = Z[b] @ W1 + b1
            h = np.maximum(pre, 0)
            l = h @ W2 + b2
            e = np.exp(l - l.max(1, keepdims=True))
            gl = e / e.sum(1, keepdims=True)
            gl[np.arange(len(b)), y[b]] -= 1
            gl /= len(b)
            gh = gl @ W2.T
            gh[pre <= 0] = 0
            grads = [Z[b].T @ gh, gh.sum(0), h.T @ gl, gl.sum(0)]
            t += 1
            cur = lr * 0.5 * (1 + np.cos(np.pi * t / steps))
            for i, (q, d) in enumerate(zip(P, grads)):
                M[i] = 0.9 * M[i] + 0.1 * d
                V[i] = 0.999 * V[i] + 0.001 * d * d
                q -= cur * ((M[i] / (1 - 0.9 ** t)) / (np.sqrt(V[i] / (1 - 0.999 ** t)) + 1e-8)
                            + (0.01 * q if i % 2 == 0 else 0))
        mae = np.abs(readout(probs(Z[va], *P), k, g[va], cap) - rem[va]).mean()
        if mae < best[0]:
            best = (mae, [q.copy() for q in P])
    return probs(Z[te], *best[1]), best[0]


def refined(p, k, cap):
    """The paper's filter over each test request's sampled positions, in order of g."""
    K = p.shape[1]
    w = MAX_NEW / k
    T = np.eye(K)
    for i in range(1, k):
        T[i, i], T[i, i - 1] = 1 - 1 / w, 1 / w
    prior0 = np.bincount(labels(k, cap)[tr & (g == 0)], minlength=K) + 1.0
    prior0 /= prior0.sum()
    gt = g[te]
    order = np.lexsort((gt, rid[te]))
    post = np.zeros_like(p, dtype=np.float64)
    last, q, g0 = None, None, 0
    for o in order:
        if rid[te][o] != last:
            last, q, g0 = rid[te][o], prior0.copy(), 0
        q = q @ np.linalg.matrix_power(T, int(gt[o] - g0))
        q = np.maximum(q * p[o], 1e-8)
        q /= q.sum()
        g0 = gt[o]
        post[o] = q
    return post


rows = []
for name, k, use_g, cap in [("base", 10, False, False), ("+g", 10, True, False),
                            ("k=32", 32, False, False), ("cap", 10, False, True),
                            ("cap+g", 10, True, True)]:
    p, val = train(k, use_g, cap)
    post = refined(p, k, cap)
    mae = lambda est: np.abs(est - rem[te]).mean()
    rows.append((name, val, mae(readout(p, k, g[te], cap)),
                 mae(readout(p, k, g[te], cap, median=True)),
                 mae(readout(post, k, g[te], cap)),
                 mae(readout(post, k, g[te], cap, median=True))))
    print(f"{name}: done", file=sys.stderr, flush=True)

print(f"Layer {LAYER} of `{RUN}`: {int(tr.sum())} train, {int(va.sum())} val, "
      f"{int(te.sum())} test (request, g) pairs; MAE of the remaining length in tokens.\n")
print("| variant | val MAE (mean) | test, no refine | no refine, median | refined | refined, median |")
print("|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r[0]} | " + " | ".join(f"{v:.2f}" for v in r[1:]) + " |")
