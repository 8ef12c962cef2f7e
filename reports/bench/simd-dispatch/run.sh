#!/bin/bash
# Interleaved old/new runner bench for issue 22: 3 pairs, order alternating.
OLD=/work/target-llm-base/release/trail
NEW=/work/target-llm/release/trail
for i in 1 2 3; do
  if [ $((i % 2)) -eq 1 ]; then order="old new"; else order="new old"; fi
  for w in $order; do
    bin=$OLD; [ $w = new ] && bin=$NEW
    $bin bench runner --json > $w-$i.json 2> $w-$i.err
    echo "$w $i done $(date +%T)"
  done
done
