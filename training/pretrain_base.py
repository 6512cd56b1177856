"""Pretrain the built-in demo's base model: a tiny text-to-image model that draws Fill50K targets.

ControlNet adds control to a model that can already draw; for the real thing that model is Stable
Diffusion, which nobody can pretrain on a laptop. The demo's stand-in learns, in minutes on a CPU, to draw
"<colour> circle with <colour> background" images (Fill50K targets) from their prompts, with no hint: it
places its circles wherever it likes, which is exactly what the ControlNet then has to fix.

The UNet and the tiny CLIP text encoder train together: nothing pretrained is downloaded, so the encoder
learns its 78 colour names here (some share words: "dark slate blue", "slate blue"). Batches are drawn on the fly by
`training.make_fill50k.sample_fill50k`, batch k of a run from the seed and k alone, and one prompt in ten is
dropped so that classifier-free guidance has an unconditional model to push away from.

The checkpoint has Stable Diffusion's layout (`model.diffusion_model.*`, `cond_stage_model.*`, schedule
buffers; no `control_model.*`), so `tool_add_control.py` turns it into a ControlLDM start, as it does an
SD1.5 file. It is written atomically (a temporary file, then `os.replace`). The same seed on the same
machine gives the same checkpoint.

    python training/pretrain_base.py --config configs/base_fill50k.yaml --out models/base_fill50k.ckpt
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cldm.model import create_model, load_config
from ldm.errors import DEBUG_HELP, InputError, TrainingDiverged, command_line
from ldm.models.autoencoder import IdentityFirstStage
from ldm.util import settings_from
from training.make_fill50k import sample_fill50k


@dataclass(frozen=True)
class PretrainConfig:
    """Pretraining settings; the config's `pretrain:` section sets them, command-line flags override."""

    steps: int = 1500
    batch_size: int = 32
    learning_rate: float = 1e-3
    warmup_steps: int = 50
    drop_prompt: float = 0.1
    ema_decay: float = 0.995
    seed: int = 0
    log_every: int = 50


def fill50k_batch(seed: int, step: int, batch_size: int, size: int, drop_prompt: float
                  ) -> tuple[torch.Tensor, list[str]]:
    """Batch `step` of a run: targets (B, 3, size, size) in [-1, 1] and prompts ("" for dropped ones).

    A pure function of its arguments, so a run is reproducible and can be cut anywhere.
    """
    images, prompts = [], []
    for i in range(batch_size):
        rng = np.random.default_rng([seed, step, i])
        sample = sample_fill50k(rng, size)
        images.append(sample["target"])
        prompts.append("" if rng.random() < drop_prompt else sample["prompt"])
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return x, prompts


def learning_rate_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak at the last step."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.learning_rate * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def pretrain(model: Any, cfg: PretrainConfig, log: Callable[[str], None] = print) -> list[float]:
    """Train `model`'s UNet and text encoder on the diffusion loss; returns the loss of every step.

    The UNet is called through `encode`/`decode` rather than `forward`: ControlledUnetModel runs its encoder
    without autograd (in ControlNet training it is locked), and here it must learn. With `ema_decay` > 0 the
    model ends with the exponential moving average of its weights, which samples cleaner after a short run
    than the last step's weights do.
    """
    if not isinstance(model.first_stage_model, IdentityFirstStage) or model.parameterization not in ("eps", "v"):
        raise InputError("pretrain_base.py trains pixel-space (IdentityFirstStage) eps- or v-prediction models only")
    model.materialize()
    unet, text = model.model.diffusion_model, model.cond_stage_model
    text.frozen = False  # the demo's text encoder learns its colour names; frozen again before saving
    for part in (unet, text):
        part.requires_grad_(True)
        part.train()
    params = [*unet.parameters(), *text.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    ema = [p.detach().clone() for p in params] if cfg.ema_decay > 0 else None
    generator = torch.Generator().manual_seed(cfg.seed)
    size = int(model.image_size)
    losses: list[float] = []
    start = time.time()
    for step in range(cfg.steps):
        x0, prompts = fill50k_batch(cfg.seed, step, cfg.batch_size, size, cfg.drop_prompt)
        t = torch.randint(0, model.num_timesteps, (cfg.batch_size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        context = text(prompts)
        h, skips, emb = unet.encode(model.q_sample(x0, t, noise), t, context)
        target = noise if model.parameterization == "eps" else model.get_v(x0, noise, t)
        loss = F.mse_loss(unet.decode(h, skips, emb, context), target)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if ema is not None:  # the decay ramps up, so the random initialisation is soon forgotten
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for average, p in zip(ema, params):
                    average.lerp_(p.detach(), 1.0 - decay)
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            raise TrainingDiverged(f"loss is {losses[-1]} at step {step}: lower --learning_rate")
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            elapsed = time.time() - start
            recent = float(np.mean(losses[-cfg.log_every:]))
            log(f"step {step + 1}/{cfg.steps} loss {recent:.4f} lr {learning_rate_at(step, cfg):.2e} "
                f"{elapsed:.0f}s (eta {elapsed / (step + 1) * (cfg.steps - step - 1):.0f}s)")
    if ema is not None:
        with torch.no_grad():
            for p, average in zip(params, ema):
                p.copy_(average)
    text.freeze()
    unet.requires_grad_(False)
    model.eval()
    return losses


def base_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Stable Diffusion's part of a ControlLDM's weights: everything but `control_model.*`."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not k.startswith("control_model.")}


def save_checkpoint(state_dict: dict[str, torch.Tensor], path: Path, meta: dict[str, Any]) -> None:
    """Write `{"state_dict": ..., **meta}` to a temporary file beside `path`, then move it into place.

    A run killed while writing leaves the old file (or none), never a truncated one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save({"state_dict": state_dict, **meta}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_sample_grid(model: Any, path: Path, seed: int, n: int = 8, guidance_scale: float = 3.0) -> None:
    """What the base draws for `n` held-out prompts without a hint: top row a true image for each prompt.

    Guidance 3, not SD's usual 9: this tiny model over-saturates its colours at 9.
    """
    from training.fidelity import fill50k_heldout, generate, save_grid

    heldout = fill50k_heldout(n, seed, int(model.image_size))
    save_grid([heldout.targets, generate(model, heldout.prompts, None, seed, guidance_scale=guidance_scale)], path)


def config_from(section: Any, overrides: dict[str, Any], where: str = "config") -> PretrainConfig:
    """Defaults, then the YAML's `pretrain:` section, then the flags given on the command line."""
    cfg = settings_from(PretrainConfig, section, f"{where}: pretrain")
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


@command_line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=DEBUG_HELP)
    parser.add_argument("--config", default="configs/base_fill50k.yaml", help="ControlLDM-shaped pixel-space YAML")
    parser.add_argument("--out", type=Path, default=Path("models/base_fill50k.ckpt"), help="checkpoint to write")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the config's)")
    parser.add_argument("--seed", type=int, default=None, help="weights, batches and noise (default: the config's)")
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--learning_rate", type=float, default=None)
    parser.add_argument("--grid", type=Path, default=None, help="also write a PNG of the base's samples")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    cfg = config_from(config.get("pretrain"), {"steps": args.steps, "seed": args.seed, "batch_size": args.batch_size,
                                               "learning_rate": args.learning_rate}, args.config)
    torch.manual_seed(cfg.seed)  # the random initialisation
    model = create_model(args.config)
    losses = pretrain(model, cfg)
    meta = {"config": Path(args.config).read_text(encoding="utf-8"), "pretrain": asdict(cfg),
            "final_loss": float(np.mean(losses[-cfg.log_every:]))}
    save_checkpoint(base_state_dict(model), args.out, meta)
    print(f"wrote {args.out} ({cfg.steps} steps, seed {cfg.seed}, final loss {meta['final_loss']:.4f})")
    if args.grid is not None:
        save_sample_grid(model, args.grid, cfg.seed)
        print(f"samples of the base model (no control): {args.grid}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
