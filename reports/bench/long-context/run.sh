#!/bin/sh
# Issue 23: the runner at 512 tokens of context (decode to 640), the f16 KV cache (one-pass
# attention, the default) and the f32 one (the numerics before issue 23) from one release
# binary, llama.cpp beside the f16 run; then the same at 37 tokens. Usage: run.sh OUT [PEERS]
T=${TRAIL:-target/release/trail}
O=${1:?out dir}
P=${2:-/tmp/peers/bin}
for ctx in 512 37; do
  $T bench runner --kv-cache f16 --prompt-tokens $ctx --decode-steps 128 --batches 1,8,32 \
    --repeats 3 --vs-llama-cpp "$P" --out "$O/f16-$ctx" > "$O/f16-$ctx.log" 2>&1
  $T bench runner --kv-cache f32 --prompt-tokens $ctx --decode-steps 128 --batches 1,8,32 \
    --repeats 3 --out "$O/f32-$ctx" > "$O/f32-$ctx.log" 2>&1
done
