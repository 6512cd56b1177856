"""What the consistency reward costs per training step: time and peak memory, with and without it.

The reward decodes the one-step prediction of x0 with the VAE (with gradients, into the ControlNet) and the target
(without), on the rows whose timestep is below `--reward_max_timestep` only. This measures a training step
(`shared_step` forward and backward, one thread) on the tiny SD config, whose KL VAE has SD's structure (8x
downsampling), at 64 px, batch 4: reward off; on at max timestep 200 (the default: about a fifth of the rows under
uniform sampling); and on at 1000 (every row, the worst case). Peak memory is each variant's own (a fresh child
process, `ru_maxrss`); the variants take turns in rounds, each round in fresh processes. The ratio, not the absolute
time, carries to SD1.5: there the VAE decoder is ~50 GFLOP per 512 px image against the UNet + ControlNet's ~1 TFLOP
for a forward and backward at batch 1.

    .venv/bin/python -m benchmarks.bench_reward_cost --out benchmarks/results/reward_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.common import REPO_ROOT, peak_rss_mib, run_child, time_calls

VARIANTS = {"off": None, "on_t200": 200, "on_t1000": 1000}


def measure(max_timestep: int | None, repeats: int) -> dict[str, float]:
    from cldm.control import ControlReward
    from cldm.model import create_model
    from training.rewards import measure_from_name

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model(REPO_ROOT / "models" / "cldm_tiny.yaml")
    model.materialize()
    model.train()
    if max_timestep is not None:
        model.reward = ControlReward(measure_from_name("edges"), 0.5, max_timestep)
    g = torch.Generator().manual_seed(0)
    batch = {"jpg": torch.rand(4, 64, 64, 3, generator=g) * 2 - 1, "hint": torch.rand(4, 64, 64, 3, generator=g),
             "txt": ["a ball", "a cup", "a hat", "a tree"]}

    def step() -> None:
        loss, _ = model.shared_step(batch)
        loss.backward()
        model.zero_grad(set_to_none=True)

    times = time_calls(step, warmup=3, repeats=repeats)
    # The mean, not the median: at max timestep 200 about 41% of batch-4 steps have no row to reward (0.8 ** 4).
    return {"s_per_step": statistics.mean(times), "peak_rss_mib": peak_rss_mib()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--repeats", type=int, default=30, help="timed steps per variant, over all rounds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", default=None, choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(measure(VARIANTS[args.child], args.repeats)), flush=True)
        return
    # Rounds of every variant in turn, so that a change in the machine's load while measuring hits all of them alike.
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name in VARIANTS:
            runs[name].append(run_child("benchmarks.bench_reward_cost",
                                        ["--child", name, "--repeats", str(args.repeats // args.rounds)]))
    results = {name: {"s_per_step": statistics.mean(r["s_per_step"] for r in rs),
                      "peak_rss_mib": max(r["peak_rss_mib"] for r in rs)} for name, rs in runs.items()}
    base = results["off"]
    for name, result in results.items():
        print(f"{name}: {result['s_per_step'] * 1000:.1f} ms/step ({result['s_per_step'] / base['s_per_step']:.2f}x), "
              f"peak {result['peak_rss_mib']:.0f} MiB ({result['peak_rss_mib'] - base['peak_rss_mib']:+.0f})")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
