"""Classifier-free guidance as a small object: it turns a model and two conditions into one denoiser.

A sampler only ever calls `denoiser(x, t, progress)`, where `progress` is the fraction of sampling done
(0 at the first, noisiest step). Guidance variants (guess mode, control modes, guidance windows) are
other denoisers of the same shape, not branches inside the sampler loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

#: `denoiser(x, t, progress) -> model output` (eps, or v for v-parameterised models).
Denoiser = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


class DiffusionModel(Protocol):
    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor: ...


def combine_guidance(out_uncond: torch.Tensor, out_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: move from the unconditional prediction `scale` times towards the conditional."""
    return out_uncond + scale * (out_cond - out_uncond)


def concat_conditions(first: Mapping[str, Any], second: Mapping[str, Any]) -> dict[str, Any] | None:
    """Stack two condition dicts along the batch, or None when they cannot share one forward pass."""
    if first.keys() != second.keys():
        return None
    merged: dict[str, Any] = {}
    for key, a in first.items():
        b = second[key]
        if a is None and b is None:
            merged[key] = None
            continue
        if a is None or b is None or len(a) != len(b):
            return None
        if any(x.shape[1:] != y.shape[1:] for x, y in zip(a, b)):
            return None
        merged[key] = [torch.cat([x, y]) for x, y in zip(a, b)]
    return merged


class ClassifierFreeGuidance:
    """`uncond + scale * (cond - uncond)`, both halves in one batched forward pass when shapes allow.

    With `scale == 1` or no unconditional condition, only the conditional pass runs.
    """

    def __init__(self, model: DiffusionModel, cond: Any, uncond: Any = None, scale: float = 1.0) -> None:
        self.model = model
        self.cond = cond
        self.uncond = uncond
        self.scale = scale

    def __call__(self, x: torch.Tensor, t: torch.Tensor, progress: float = 0.0) -> torch.Tensor:
        if self.uncond is None or self.scale == 1.0:
            return self.model.apply_model(x, t, self.cond)
        both = (concat_conditions(self.uncond, self.cond)
                if isinstance(self.cond, Mapping) and isinstance(self.uncond, Mapping) else None)
        if both is not None:
            out_uncond, out_cond = self.model.apply_model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2)
        else:
            out_cond = self.model.apply_model(x, t, self.cond)
            out_uncond = self.model.apply_model(x, t, self.uncond)
        return combine_guidance(out_uncond, out_cond, self.scale)
