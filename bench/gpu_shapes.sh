#!/usr/bin/env bash
# Issue 27's checks for the first GPU session (one H100 or H200; about 12 minutes in all).
# Full depth, bfloat16, the real shapes (random weights built in memory, never downloaded).
# Writes every result under ${OUT:-bench/results}; the figures each step should show are in
# bench/README.md ("GPU: what the first run should show"). Run from the repository root:
#     OUT=/some/dir bash bench/gpu_shapes.sh            # or STEPS="mfu" / "shapes" / "predict"
set -euo pipefail
out=${OUT:-bench/results}
steps=${STEPS:-"predict mfu shapes"}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
for step in $steps; do
  case $step in
    predict)  # what the measurements are checked against (no GPU work)
      python -m bench.step_prediction --forward-fraction 0.82 > "$out/step-prediction.json" ;;
    mfu)  # forward FLOP rate over the dense bf16 peak and over a same-shape matmul, + op profile
      for shape in qwen2.5-vl-3b qwen2.5-vl-7b; do
        timeout 240 python -m bench.mfu --model "$shape" --device cuda --dtype bfloat16 --group 5 --tokens 1024 \
          --repeats 3 --profile > "$out/mfu-$shape.json" || echo "mfu $shape failed: $?"
      done ;;
    shapes)  # kawhi serve on the GPU: time, tokens/s and device memory per request, vs the memory model
      timeout 560 python -m bench.shapes --device cuda --dtype bfloat16 --layers 0 --vision-depth 0 \
        --shape qwen2.5-vl-7b --group 5 --tokens 1024 --max-load 100 --out "$out/shapes-7b-gpu.json" \
        || echo "shapes failed: $?" ;;
  esac
done
