#!/usr/bin/env bash
# The CPU training step and generation of two checkouts, in one sitting, rounds interleaved (A, B, A, B, ...):
# what a change to the code costs at run time, on the same machine at the same time.
# Usage: benchmarks/before_after.sh BEFORE AFTER [ROUNDS] [THREADS]
#   BEFORE, AFTER: checkouts of the two commits (`git worktree add /tmp/before OLD`), left alone while this runs.
# Each checkout runs its own benchmarks/ scripts from its own root (so it imports its own code, with this
# checkout's .venv); results go to benchmarks/results/before_after/{before,after}_{step,generate}_r<round>.json here.
set -euo pipefail
cd "$(dirname "$0")/.."
BEFORE="$(cd "$1" && pwd)"
AFTER="$(cd "$2" && pwd)"
ROUNDS="${3:-2}"
THREADS="${4:-1}"
PY="$(pwd)/.venv/bin/python"
OUT="$(pwd)/benchmarks/results/before_after"
mkdir -p "$OUT"
for round in $(seq 1 "$ROUNDS"); do
    for side in before after; do
        tree=$BEFORE; [ "$side" = after ] && tree=$AFTER
        (cd "$tree" && "$PY" -m benchmarks.bench_train_step --threads "$THREADS" --rounds 1 --steps 4 --warmup 2 \
            --no-flops --contenders ours+fused --out "$OUT/${side}_step_r$round.json")
    done
done
for round in $(seq 1 "$ROUNDS"); do
    for side in before after; do
        tree=$BEFORE; [ "$side" = after ] && tree=$AFTER
        (cd "$tree" && "$PY" -m benchmarks.bench_generate --threads "$THREADS" --no-flops \
            --contenders ours ours-window --out "$OUT/${side}_generate_r$round.json")
    done
done
# The code's own per-call cost on the tiny config (seconds of Python overhead are visible there), 8 rounds.
for round in $(seq 1 8); do
    for side in before after; do
        tree=$BEFORE; [ "$side" = after ] && tree=$AFTER
        PYTHONPATH="$tree" "$PY" benchmarks/bench_overhead.py --repeats 40 --out "$OUT/${side}_overhead_r$round.json"
    done
done
