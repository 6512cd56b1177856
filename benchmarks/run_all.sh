#!/usr/bin/env bash
# Every measurement in benchmarks/README.md, one after another (each contender in its own process).
# Usage: benchmarks/run_all.sh [THREADS]   (default 1: see README.md, "Method"); results go to benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${1:-1}"
OUT=benchmarks/results
mkdir -p "$OUT"
PY=.venv/bin/python
$PY -m benchmarks.bench_train_step --threads "$THREADS" --rounds 2 --steps 4 --warmup 2 \
    --contenders ours+fused diffusers ours ours+fused+ckpt ours+fused+ckptall diffusers+ckpt \
    --out "$OUT/train_step_t$THREADS.json"
$PY -m benchmarks.bench_train_step --threads "$THREADS" --mode loop --steps 6 --warmup 2 --n-data 16 \
    --contenders ours+fused ours-cached+fused diffusers --out "$OUT/train_loop_t$THREADS.json"
$PY -m benchmarks.bench_generate --threads "$THREADS" \
    --contenders ours ours-window diffusers diffusers-window --out "$OUT/generate_t$THREADS.json"
