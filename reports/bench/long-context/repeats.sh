#!/bin/sh
# Issue 23: interleaved repeats of the side-by-side runner bench (trail, then llama.cpp's
# llama-batched-bench / llama-bench on the same GGUF and threads, in one invocation), all 30
# layers captured, the f16 KV cache. The number of repeats is fixed in advance (5 at 37 tokens
# of context, 2 at 512); each invocation gives one paired ratio per shape, and ratios.py prints
# their median and min–max. Usage: repeats.sh OUT [PEERS]
T=${TRAIL:-target/release/trail}
O=${1:?out dir}
P=${2:-/tmp/peers/bin}
for r in 1 2 3 4 5; do
  $T bench runner --prompt-tokens 37 --decode-steps 128 --batches 1,8,32 --repeats 3 \
    --vs-llama-cpp "$P" --out "$O/37-r$r" > "$O/37-r$r.log" 2>&1
done
for r in 1 2; do
  $T bench runner --prompt-tokens 512 --decode-steps 128 --batches 1,8,32 --repeats 3 \
    --vs-llama-cpp "$P" --out "$O/512-r$r" > "$O/512-r$r.log" 2>&1
done
