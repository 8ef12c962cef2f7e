#!/usr/bin/env bash
# The peer run (issue 27): llama.cpp's llama-server against `trail serve` with FCFS and with
# TRAIL, on the same GGUF, threads and batch, over the same seeded traces at the same absolute
# arrival rate, interleaved on the wall clock (A B C, then B C A, then C A B, ...) because these
# VMs swing up to 1.5x in speed between minutes.
#
# Usage: run.sh OUT
# Env:   TRAIL (the trail binary), LLAMA_SERVER (llama.cpp's server binary), RUN (a `trail generate`
#        run directory whose test split the traces are drawn from), CHECKPOINT and BERT (the
#        exported predictor and BERT checkpoints for `trail serve --policy trail`), MODEL (GGUF),
#        THREADS (2), BATCH (8), REPEATS (3), REQUESTS (40 per cell), LOAD (0.8 of the slowest
#        system's saturation), SAT_REQUESTS (32).
#
# 1. Saturation: each system takes a burst of SAT_REQUESTS requests; the slowest system's rate
#    (requests/s) is the reference, so no system is overloaded by construction.
# 2. Cells: REPEATS rounds; round r runs every system once, in an order rotated by r, on the trace
#    of seed r at LOAD x the reference rate. Every system gets the same requests at the same times.
#    llama-server is sent max_tokens = the profiled length with ignore_eos (it predicts nothing, so
#    this leaks nothing; its completion_tokens are checked); trail serve gets the profiled length
#    only as the evaluation-only eval_output_tokens, which only its stop rule reads.
# 3. analyze.py: paired ratios per round and pooled over rounds, with request-bootstrap intervals.
set -euo pipefail
out=${1:?usage: run.sh OUT}
trail=${TRAIL:-trail}
llama=${LLAMA_SERVER:?set LLAMA_SERVER to the llama-server binary}
run=${RUN:?set RUN to a trail generate run directory}
ckpt=${CHECKPOINT:?set CHECKPOINT} bert=${BERT:?set BERT}
model=${MODEL:-${TRAIL_HOME:-$HOME/.cache/trail}/models/SmolLM2-135M-Instruct.Q4_1.gguf}
threads=${THREADS:-2} batch=${BATCH:-8} repeats=${REPEATS:-3} requests=${REQUESTS:-40}
load=${LOAD:-0.8} sat_requests=${SAT_REQUESTS:-32}
port=${PORT:-18431}
systems=(llama-server trail-fcfs trail-trail)
mkdir -p "$out"

start() { # system -> starts its server on $port, waits until it answers
  case $1 in
    llama-server) "$llama" -m "$model" -np "$batch" -c $((batch * 1024)) -t "$threads" -tb "$threads" \
                    --host 127.0.0.1 --port "$port" > "$out/$1.server.log" 2>&1 & ;;
    trail-fcfs)   "$trail" serve --policy fcfs --allow-eval-output-tokens --max-running "$batch" \
                    --served-model-name trail \
                    --threads "$threads" --model "$model" --host 127.0.0.1 --port "$port" \
                    > "$out/$1.server.log" 2>&1 & ;;
    trail-trail)  "$trail" serve --policy trail --checkpoint "$ckpt" --bert-checkpoint "$bert" \
                    --allow-eval-output-tokens --max-running "$batch" --threads "$threads" \
                    --served-model-name trail \
                    --model "$model" --host 127.0.0.1 --port "$port" > "$out/$1.server.log" 2>&1 & ;;
  esac
  pid=$!
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$port/v1/models" > /dev/null && return 0
    sleep 0.2
  done
  echo "$1 did not start; see $out/$1.server.log" >&2; exit 1
}
stop() { kill "$pid"; wait "$pid" 2> /dev/null || true; }

cell() { # system dir extra-args...
  local system=$1 dir=$2; shift 2
  local protocol=eval-output-tokens; [ "$system" = llama-server ] && protocol=max-tokens
  start "$system"
  "$trail" eval latency --backend http --base-url "http://127.0.0.1:$port" --protocol "$protocol" \
    --policies fcfs --run "$run" --model "$model" --max-tokens 512 --out "$dir" "$@" > "$dir.log" 2>&1 || { stop; echo "$system: see $dir.log" >&2; exit 1; }
  stop
}

# 1. Saturation of each system (a burst; the cell after it is a token one and is not used).
for s in "${systems[@]}"; do
  [ -f "$out/saturation/$s/saturation.json" ] && continue
  mkdir -p "$out/saturation"
  cell "$s" "$out/saturation/$s" --saturation-requests "$sat_requests" --loads 0.5 --seeds 0 \
    --requests 4
  echo "saturation $s: $(grep -o '"rps": [0-9.]*' "$out/saturation/$s/saturation.json")"
done
rate=$(for s in "${systems[@]}"; do
  grep -o '"rps": [0-9.]*' "$out/saturation/$s/saturation.json" | grep -o '[0-9.]*$'
done | sort -g | head -1)
echo "reference rate (slowest system's saturation): $rate requests/s; cells at $load x that"

# 2. Interleaved cells.
for r in $(seq 1 "$repeats"); do
  for k in 0 1 2; do
    s=${systems[$(((k + r - 1) % 3))]}
    dir="$out/cells/round$r/$s"
    [ -f "$dir/summary.json" ] && continue
    mkdir -p "$out/cells/round$r"
    cell "$s" "$dir" --saturation-rps "$rate" --loads "$load" --seeds "$r" --requests "$requests"
    echo "round $r $s done $(date +%T)"
  done
done
