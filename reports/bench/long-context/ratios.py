"""Paired trail ÷ llama.cpp ratios of repeats.sh's runs: per shape, each repeat's ratio, their
median and min–max. Usage: python3 ratios.py OUT"""
import glob
import json
import statistics
import sys

out = sys.argv[1]
print("| context | shape | repeats | median | min–max | each |")
print("|---|---|---|---|---|---|")
for ctx in ("37", "512"):
    runs = [json.load(open(f)) for f in sorted(glob.glob(f"{out}/{ctx}-r*/runner.json"))]
    if not runs:
        continue
    for shape in ("decode_b1", "decode_b8", "decode_b32", "prefill"):
        xs = [r["ratios"][shape] for r in runs if shape in r["ratios"]]
        if xs:
            print(f"| {ctx} | {shape} | {len(xs)} | {statistics.median(xs):.2f}× | "
                  f"{min(xs):.2f}–{max(xs):.2f} | " + ", ".join(f"{x:.2f}" for x in xs) + " |")
rss = [(f, json.load(open(f)).get("peak_rss_mib")) for f in sorted(glob.glob(f"{out}/512-r*/runner.json"))]
for f, r in rss:
    print(f"\npeak RSS {f.split('/')[-2]}: {r}")
