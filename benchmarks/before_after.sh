#!/usr/bin/env bash
# The CPU training step and generation of two checkouts, in one sitting, rounds interleaved (A, B, A, B, ...):
# what a change to the code costs at run time, on the same machine at the same time.
# Usage: benchmarks/before_after.sh BEFORE_CHECKOUT [ROUNDS] [THREADS]   (e.g. a `git worktree` of the older commit)
# Each checkout runs its own benchmarks/ scripts from its own root (so it imports its own code); results go to
# benchmarks/results/before_after/{before,after}_{step,generate}_r<round>.json of this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
BEFORE="$(cd "$1" && pwd)"
AFTER="$(pwd)"
ROUNDS="${2:-2}"
THREADS="${3:-1}"
PY="$AFTER/.venv/bin/python"
OUT="$AFTER/benchmarks/results/before_after"
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
