"""Building blocks shared by the UNet and the ControlNet: embeddings, norms, schedules, checkpointing."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as torch_checkpoint


def make_beta_schedule(
    schedule: str,
    n_timestep: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> np.ndarray:
    """The betas of the forward process, in float64 as the original computes them.

    Stable Diffusion uses "linear", which despite its name is linear in sqrt(beta) ("scaled linear").
    """
    if schedule == "linear":
        return np.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=np.float64) ** 2
    if schedule == "cosine":
        steps = np.arange(n_timestep + 1, dtype=np.float64) / n_timestep + cosine_s
        alphas = np.cos(steps / (1 + cosine_s) * math.pi / 2) ** 2
        alphas = alphas / alphas[0]
        return np.clip(1 - alphas[1:] / alphas[:-1], 0, 0.999)
    if schedule == "sqrt_linear":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64)
    if schedule == "sqrt":
        return np.linspace(linear_start, linear_end, n_timestep, dtype=np.float64) ** 0.5
    raise ValueError(f"unknown beta schedule {schedule!r}; expected linear, cosine, sqrt_linear or sqrt")


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep features, cosines first (the order the released weights expect)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a module's parameters: a zero conv adds nothing until training moves it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype: half-precision statistics overflow."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(
            x.float(), self.num_groups, self.weight.float() if self.weight is not None else None,
            self.bias.float() if self.bias is not None else None, self.eps,
        ).to(x.dtype)


def normalization(channels: int) -> nn.Module:
    return GroupNorm32(32, channels)


def conv_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return nn.Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise ValueError(f"unsupported dimensions: {dims}")


def avg_pool_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    return {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims](*args, **kwargs)


def checkpoint(fn: Callable[..., torch.Tensor], *args: Any, enabled: bool) -> torch.Tensor:
    """Recompute `fn` in backward instead of storing activations, only when a backward can happen.

    Non-reentrant checkpointing works with frozen inputs and parameters, unlike the original's custom
    function; under `torch.no_grad` (inference, the locked encoder) there is nothing to save, so it is
    skipped.
    """
    if enabled and torch.is_grad_enabled():
        return torch_checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def extract_into_tensor(values: torch.Tensor, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Gather per-timestep schedule values and shape them to broadcast over a batch of images."""
    out = values.gather(-1, t)
    return out.reshape(t.shape[0], *((1,) * (len(shape) - 1)))
