"""The code's own cost per call, on the tiny config, where the arithmetic is small and Python overhead shows.

Measures, in one thread, the median seconds of: `apply_model` (batch 2, 8x8 latent, with control), a training
step's forward and backward (`shared_step`), and `DDIMSampler(model).sample` (10 steps, CFG 7.5). Only the
original's public API is used, so the same script measures any checkout of the project:

    PYTHONPATH=/path/to/checkout .venv/bin/python benchmarks/bench_overhead.py --out result.json

(`PYTHONPATH` puts that checkout's packages before the installed ones.) `before_after.sh` runs it on two checkouts,
rounds interleaved.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.common import time_calls


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    return statistics.median(time_calls(fn, warmup=3, repeats=repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import cldm
    from cldm.model import create_model
    from ldm.models.diffusion.ddim import DDIMSampler

    config = Path(cldm.__file__).resolve().parents[1] / "models" / "cldm_tiny.yaml"
    torch.manual_seed(0)
    model = create_model(config)
    model.materialize()
    model.eval()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500])
    context, hint = torch.randn(2, 77, 32, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    cond = {"c_concat": [hint], "c_crossattn": [context]}
    uncond = {"c_concat": [hint], "c_crossattn": [torch.zeros_like(context)]}
    batch = {"jpg": torch.rand(2, 64, 64, 3) * 2 - 1, "hint": hint.permute(0, 2, 3, 1), "txt": ["a ball", "a cup"]}

    def forward() -> object:
        with torch.no_grad():
            return model.apply_model(x, t, cond)

    def train_step() -> object:
        model.train()
        loss, _ = model.shared_step(batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        model.eval()
        return loss

    def sample() -> object:
        return DDIMSampler(model).sample(10, 2, (4, 8, 8), cond, verbose=False, unconditional_guidance_scale=7.5,
                                         unconditional_conditioning=uncond, eta=0.0)

    result = {"code": str(config.parents[1]), "apply_model_s": median_seconds(forward, args.repeats),
              "train_step_s": median_seconds(train_step, args.repeats),
              "ddim_10_steps_s": median_seconds(sample, max(5, args.repeats // 5))}
    print(json.dumps(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
