"""The text conditioning a UNet takes, in one of two shapes, and the few operations every path needs on it.

SD1.x/2.x condition on a context tensor `[B, T, D]`. SDXL conditions on `{"crossattn": [B, T, D], "vector": [B, V]}`
(its conditioner's output: the two text encoders' states and the pooled text with the size embeddings, which the UNet
takes as `y`). Guidance stacks two conditions, a conditional-only control picks rows, half-precision networks cast
them: these functions do that for both shapes, so the denoising path never asks which family it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

#: A context tensor, or SDXL's {"crossattn": context, "vector": y}.
Context = torch.Tensor | Mapping[str, torch.Tensor]


def unet_inputs(context: Context) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(cross-attention context, vector y or None): the `context=` and `y=` of a UNet or ControlNet call."""
    if isinstance(context, Mapping):
        return context["crossattn"], context.get("vector")
    return context, None


def map_context(context: Context, fn: Callable[[torch.Tensor], torch.Tensor]) -> Context:
    """`fn` applied to every tensor of the context, keeping its shape (tensor or mapping)."""
    if isinstance(context, Mapping):
        return {key: fn(value) for key, value in context.items()}
    return fn(context)


def rows_of(context: Context, index: slice | torch.Tensor) -> Context:
    """The context of some batch rows (a slice, or a bool/index tensor)."""
    return map_context(context, lambda t: t[index])


def concat_contexts(first: Context, second: Context) -> Context | None:
    """Both contexts in one batch (`[first; second]`), or None when their shapes differ (prompts of different
    lengths, say) and they must run in two passes."""
    if isinstance(first, Mapping) != isinstance(second, Mapping):
        return None
    if not isinstance(first, Mapping):
        return torch.cat([first, second]) if first.shape[1:] == second.shape[1:] else None
    assert isinstance(second, Mapping)
    if first.keys() != second.keys() or any(first[k].shape[1:] != second[k].shape[1:] for k in first):
        return None
    return {key: torch.cat([first[key], second[key]]) for key in first}


def cat_conditions(parts: list[Context], vectors: list[torch.Tensor] | None) -> Context:
    """The context of the original's condition dict: its `c_crossattn` list joined along the tokens, with the
    `y` list (SDXL) joined along the channels. An SDXL context may also stand in the `c_crossattn` list as it is
    (what `get_learned_conditioning` returns): its vector then joins `y`'s."""
    crossattns = [unet_inputs(part)[0] for part in parts]
    vectors = [v for part in parts if (v := unet_inputs(part)[1]) is not None] + list(vectors or [])
    crossattn = torch.cat(crossattns, 1)
    if not vectors:
        return crossattn
    return {"crossattn": crossattn, "vector": torch.cat(vectors, 1)}
