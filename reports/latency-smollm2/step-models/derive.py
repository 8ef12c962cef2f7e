"""Step-time models of Llama-3-8B in bf16 on an A100-80GB and an H100-80GB (SXM), from the
roofline, checked against published vLLM figures and recalibrated where the roofline alone is
more than 30 % off. Writes llama3-8b-bf16-{a100,h100}-80gb.json (the format of
`step_model.json`, written as serde_json writes it, so the files round-trip byte for byte) and
prints the tables of README.md.

A step of d decode rows, p prefill tokens, k KV tokens attended and s KV tokens swapped takes

    base + per_decode_row * d + per_prefill_token * p + per_kv_token * k + per_swap_token * s

usage: python3 derive.py        (standard library only)
"""
import json
import statistics
from decimal import Decimal
from pathlib import Path

# Llama-3-8B (config.json of meta-llama/Meta-Llama-3-8B): 32 layers, hidden 4096, 8 KV heads of
# 128, vocabulary 128256, untied input embedding and LM head.
PARAMS = 8_030_261_248
EMBED = 128_256 * 4096
STREAMED = PARAMS - EMBED  # every weight but the input embedding table is read each step
PREFILL = STREAMED - EMBED  # the LM head runs on a prompt's last token only
BYTES = 2  # bf16
KV_BYTES = 32 * 8 * 128 * 2 * BYTES  # layers x KV heads x head dim x (K, V) x bytes = 128 KiB

# Datasheet figures (SXM parts): HBM bandwidth, dense bf16 tensor-core peak, PCIe x16 per direction.
GPUS = {
    "a100-80gb": dict(name="A100-SXM4-80GB", hbm=2.039e12, bf16=312e12, pcie=32e9, gen="Gen4"),
    "h100-80gb": dict(name="H100-SXM5-80GB", hbm=3.35e12, bf16=989.4e12, pcie=64e9, gen="Gen5"),
}
UTILISATION = 0.5  # of the bf16 peak, for prefill tokens and decode rows
PCIE_EFFICIENCY = 0.8  # of the PCIe link, for swap copies
# KV capacity: vLLM's default --gpu-memory-utilization 0.9 of 80 GiB, less the weights and
# 4 GiB for activations, CUDA graphs and the allocator; in whole blocks of 16 tokens.
HBM_BYTES = 80 * 2**30
KV_CAPACITY = int((0.9 * HBM_BYTES - PARAMS * BYTES - 4 * 2**30) // KV_BYTES) // 16 * 16

# Published vLLM figures for Llama-3-8B(-Instruct) bf16, one GPU.
# Lambda (LambdaLabsML/vllm-benchmark, vLLM 0.6.0, Sept 2024): benchmark_serving.py, 10 ShareGPT
# prompts at once, results/prompt_10/1x{GPU}-SXM/Meta-Llama-3-8B-Instruct_tp1_len2048.json.
LAMBDA_INPUT = [13, 25, 27, 10, 329, 29, 399, 328, 4, 205]
PUBLISHED = {
    "a100-80gb": dict(
        outputs=[120, 507, 233, 194, 101, 741, 9, 3, 6, 31],
        median_tpot_ms=12.013653567765019,
        mean_ttft_ms=126.86908692121507,
        batch8_latency_ms=1585.43,
    ),
    "h100-80gb": dict(
        outputs=[120, 429, 233, 194, 101, 741, 9, 3, 6, 31],
        median_tpot_ms=7.558259615148475,
        mean_ttft_ms=62.426355000934564,
        batch8_latency_ms=997.542,
    ),
}
# vLLM's performance benchmark, latency_llama8B_tp1: batch 8, 32 prompt + 128 output tokens,
# mean end-to-end latency (batch8_latency_ms above).


def model(gpu, eta=1.0):
    """The roofline model; `eta` scales the memory terms (the recalibration)."""
    g = GPUS[gpu]
    compute = g["bf16"] * UTILISATION
    return {
        "base_s": STREAMED * BYTES / (g["hbm"] * eta),
        "per_decode_row_s": 2 * STREAMED / compute,
        "per_prefill_token_s": 2 * PREFILL / compute,
        "per_kv_token_s": KV_BYTES / (g["hbm"] * eta),
        "per_swap_token_s": KV_BYTES / (g["pcie"] * PCIE_EFFICIENCY),
        "kv_capacity_tokens": KV_CAPACITY,
    }


def step(m, decode=0, prefill=0, kv=0):
    return (
        m["base_s"]
        + m["per_decode_row_s"] * decode
        + m["per_prefill_token_s"] * prefill
        + m["per_kv_token_s"] * kv
    )


def burst(m, prompts, outputs):
    """Every request at t = 0, all prompts in one step (vLLM's default token budget holds
    them), then decode steps: the times of each request's first and last token."""
    t = step(m, prefill=sum(prompts), kv=sum(prompts))
    first = [t] * len(prompts)
    done = [t if o == 1 else None for o in outputs]
    generated = [1] * len(prompts)
    while None in done:
        live = [i for i, d in enumerate(done) if d is None]
        # a decode row attends its context once it has run: prompt + generated tokens
        t += step(m, decode=len(live), kv=sum(prompts[i] + generated[i] for i in live))
        for i in live:
            generated[i] += 1
            if generated[i] == outputs[i]:
                done[i] = t
    return first, done


def figures(m, gpu):
    """The model's median TPOT and mean TTFT on Lambda's burst, and the batch-8 latency."""
    outputs = PUBLISHED[gpu]["outputs"]
    first, done = burst(m, LAMBDA_INPUT, outputs)
    tpot = [(d - f) / (o - 1) for f, d, o in zip(first, done, outputs) if o > 1]
    _, done8 = burst(m, [32] * 8, [128] * 8)
    return {
        "median_tpot_ms": statistics.median(tpot) * 1e3,
        "mean_ttft_ms": statistics.mean(first) * 1e3,
        "batch8_latency_ms": statistics.mean(done8) * 1e3,
    }


def calibrate(gpu):
    """The eta at which the model's median TPOT on Lambda's burst is the published one."""
    lo, hi = 0.2, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if figures(model(gpu, mid), gpu)["median_tpot_ms"] > PUBLISHED[gpu]["median_tpot_ms"]:
            lo = mid
        else:
            hi = mid
    return round((lo + hi) / 2, 4)


def ryu(x):
    """A float as serde_json (ryu) writes it: the shortest digits that read back, in decimal
    notation for decimal exponents -5 < kk <= 16, else scientific."""
    sign, digits, exp = Decimal(repr(x)).normalize().as_tuple()
    d = "".join(map(str, digits))
    n, k = len(d), exp
    kk = n + k
    if 0 <= k and kk <= 16:
        s = d + "0" * k + ".0"
    elif 0 < kk <= 16:
        s = d[:kk] + "." + d[kk:]
    elif -5 < kk <= 0:
        s = "0." + "0" * (-kk) + d
    elif n == 1:
        s = f"{d}e{kk - 1}"
    else:
        s = f"{d[0]}.{d[1:]}e{kk - 1}"
    return ("-" if sign else "") + s


def write(path, m):
    fields = [f'  "{k}": {v if isinstance(v, int) else ryu(v)}' for k, v in m.items()]
    path.write_text("{\n" + ",\n".join(fields) + "\n}")


def pct(a, b):
    return f"{100 * (a / b - 1):+.0f} %"


def main():
    here = Path(__file__).parent
    print(f"KV capacity: {KV_CAPACITY} tokens; streamed weights {STREAMED * BYTES / 1e9:.2f} GB")
    rows = []
    for gpu in GPUS:
        pub = PUBLISHED[gpu]
        roof = figures(model(gpu), gpu)
        eta = calibrate(gpu)
        m = model(gpu, eta)
        cal = figures(m, gpu)
        write(here / f"llama3-8b-bf16-{gpu}.json", m)
        json.loads((here / f"llama3-8b-bf16-{gpu}.json").read_text())
        print(f"\n{GPUS[gpu]['name']}: eta = {eta}")
        for k, v in m.items():
            print(f"  {k}: {v * 1e3 if k.endswith('_s') else v:.6g}{' ms' if k.endswith('_s') else ''}")
        for b in (1, 8, 48):
            print(f"  decode step, {b} rows of 300 tokens: {step(m, decode=b, kv=b * 300) * 1e3:.2f} ms")
        for key, label in [
            ("median_tpot_ms", "median TPOT, 10 ShareGPT prompts at once (Lambda, vLLM 0.6.0)"),
            ("batch8_latency_ms", "latency, batch 8 x (32 in, 128 out) (vLLM perf benchmark)"),
            ("mean_ttft_ms", "mean TTFT, 10 ShareGPT prompts at once (Lambda, vLLM 0.6.0)"),
        ]:
            rows.append(
                f"| {GPUS[gpu]['name']} | {label} | {pub[key]:.1f} | {roof[key]:.1f} "
                f"({pct(roof[key], pub[key])}) | {cal[key]:.1f} ({pct(cal[key], pub[key])}) |"
            )
    print("\n| GPU | figure | published (ms) | roofline (ms) | recalibrated (ms) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
