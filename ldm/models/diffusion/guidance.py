"""Classifier-free guidance: the one object that turns a conditioned network and two conditions into a model function.

A *conditioned network* is called as `network(x, t, cond, conditional=..., progress=...)`:

- `cond` is whatever the network is conditioned on: a text context (a tensor, or SDXL's `{"crossattn", "vector"}`,
  see `conditioning.py`), or the original's condition dict (`{'c_crossattn': [context], 'c_concat': [hint]}`);
- `conditional` says which rows carry the prompt: `True` (all), `False` (none: the unconditional half) or a
  bool tensor per row when both halves share one batch. A network may ignore it; a ControlNet whose unit
  steers the conditional half only (guess mode, "ControlNet is more important") reads it;
- `progress` is the fraction of sampling done (0 at the first, noisiest step), for guidance windows.

`ClassifierFreeGuidance(network, cond, uncond, scale)` is then a *model function* `f(x, t, progress)`, which
`ldm.models.diffusion.sampling.Denoiser` hands to the samplers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from ldm.models.diffusion.conditioning import concat_contexts

#: `network(x, t, cond, conditional=bool | bool tensor, progress=float) -> model output`.
ConditionedNetwork = Callable[..., torch.Tensor]
#: `model_function(x, t, progress) -> model output` (eps, or v for v-parameterised models).
ModelFunction = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
Rows = bool | torch.Tensor


def combine_guidance(out_uncond: torch.Tensor, out_cond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: move from the unconditional prediction `scale` times towards the conditional."""
    return out_uncond + scale * (out_cond - out_uncond)


def _is_condition_dict(cond: Any) -> bool:
    """The original's `{'c_crossattn': [...], 'c_concat': [...] or None}` (lists), not an SDXL context (tensors)."""
    return isinstance(cond, Mapping) and all(v is None or isinstance(v, (list, tuple)) for v in cond.values())


def concat_conditions(first: Any, second: Any) -> Any:
    """Stack two conditions along the batch (contexts of either shape, or dicts of tensor lists), or None when they
    cannot share one forward pass."""
    if _is_condition_dict(first) != _is_condition_dict(second):
        return None
    if not _is_condition_dict(first):
        contexts = all(isinstance(c, (torch.Tensor, Mapping)) for c in (first, second))
        return concat_contexts(first, second) if contexts else None
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
        parts = [concat_contexts(x, y) for x, y in zip(a, b)]
        if any(part is None for part in parts):
            return None
        merged[key] = parts
    return merged


def apply_model_network(model: Any) -> ConditionedNetwork:
    """A model with the original's `apply_model(x, t, cond)` as a conditioned network (it conditions every row)."""

    def network(x: torch.Tensor, t: torch.Tensor, cond: Any, conditional: Rows = True, progress: float = 0.0
                ) -> torch.Tensor:
        return model.apply_model(x, t, cond)

    return network


class ClassifierFreeGuidance:
    """`uncond + scale * (cond - uncond)`, both halves in one batched forward pass (`[uncond; cond]`) when their
    conditions stack, else in two; with `scale == 1` or no unconditional condition only the conditional pass runs.
    """

    def __init__(self, network: ConditionedNetwork, cond: Any, uncond: Any = None, scale: float = 1.0,
                 batched: bool = True) -> None:
        self.network = network
        self.cond = cond
        self.uncond = uncond
        self.scale = scale
        self.batched = batched

    def __call__(self, x: torch.Tensor, t: torch.Tensor, progress: float = 0.0) -> torch.Tensor:
        if self.uncond is None or self.scale == 1.0:
            return self.network(x, t, self.cond, conditional=True, progress=progress)
        both = concat_conditions(self.uncond, self.cond) if self.batched else None
        if both is not None:
            rows = torch.arange(2 * x.shape[0], device=x.device) >= x.shape[0]
            out = self.network(torch.cat([x, x]), torch.cat([t, t]), both, conditional=rows, progress=progress)
            out_uncond, out_cond = out.chunk(2)
        else:
            out_uncond = self.network(x, t, self.uncond, conditional=False, progress=progress)
            out_cond = self.network(x, t, self.cond, conditional=True, progress=progress)
        return combine_guidance(out_uncond, out_cond, self.scale)
