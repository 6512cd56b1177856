"""SDXL's conditioner: each embedder's output, assembled into the UNet's cross-attention context and its vector y.

SDXL conditions on more than text. Its UNet cross-attends to both text encoders' states side by side (CLIP ViT-L's
768 + OpenCLIP bigG's 1280 = 2048 channels) and adds `label_emb(y)` to the timestep embedding, where y is bigG's
pooled text embedding followed by Fourier embeddings of the image's original size, the crop's top-left offset and
the target size (1280 + 6 * 256 = 2816). Each embedder reads one key of the batch (`input_key`), as in sgm, so an
sgm `conditioner_config` works here with the module paths changed: a 3-D output joins the context (along the
channels), a 2-D output the vector, in the order of `emb_models`. The checkpoint names (`embedders.0.transformer`,
`embedders.1.model`) follow from that order; the size embedders hold no weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from itertools import groupby
from typing import Any

import torch
from torch import nn

from ldm.errors import InputError
from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.util import instantiate_from_config

#: The batch key of the prompts (sgm's): the text embedders read it.
TEXT_KEY = "txt"
#: sgm's batch keys for the three size conditionings, each two numbers per image: (height, width), (top, left).
SIZE_KEYS = ("original_size_as_tuple", "crop_coords_top_left", "target_size_as_tuple")


def default_sizes(batch: int, height: int, width: int) -> dict[str, torch.Tensor]:
    """Size conditionings of images shown whole at their own size: original = target = (height, width), no crop
    (what sgm and diffusers assume when none are given)."""
    size = torch.tensor([[float(height), float(width)]]).repeat(batch, 1)
    return {"original_size_as_tuple": size, "crop_coords_top_left": torch.zeros(batch, 2),
            "target_size_as_tuple": size.clone()}


def sizes_of(batch: Mapping[str, Any], n: int, height: int, width: int) -> dict[str, torch.Tensor]:
    """The first `n` items' size conditionings: the batch's own (the data pipeline's, see
    `training.dataset.training_item`), else `default_sizes` of the images' (height, width)."""
    present = [key for key in SIZE_KEYS if key in batch]
    if len(present) == len(SIZE_KEYS):
        return {key: torch.as_tensor(batch[key][:n]).float() for key in SIZE_KEYS}
    if present:
        raise InputError(f"the batch has {', '.join(present)} but not all of {', '.join(SIZE_KEYS)}")
    return default_sizes(n, height, width)


class ConcatTimestepEmbedderND(nn.Module):
    """Each of a row's numbers embedded as a timestep is (`cos` then `sin` of `outdim / 2` frequencies), then the
    row's embeddings side by side: `[B, n] -> [B, n * outdim]`. sgm's name, for config compatibility."""

    def __init__(self, outdim: int) -> None:
        super().__init__()
        self.outdim = outdim

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        if values.dim() == 1:
            values = values[:, None]
        embedded = timestep_embedding(values.reshape(-1).float(), self.outdim)
        return embedded.reshape(values.shape[0], values.shape[1] * self.outdim)


class GeneralConditioner(nn.Module):
    """Runs every embedder on its batch key: `{"crossattn": [B, T, sum of widths], "vector": [B, sum of widths]}`.

    `emb_models` are sgm's entries: `target`/`params` of the embedder plus `input_key`; `is_trainable` must be
    false (the embedders are frozen, as SDXL trains them) and `ucg_rate` 0 (prompt dropout is the data's job here,
    where it drops the text of both encoders at once).
    """

    def __init__(self, emb_models: Sequence[Mapping[str, Any]]) -> None:
        super().__init__()
        self.embedders = nn.ModuleList()
        self.input_keys: list[str] = []
        for index, entry in enumerate(emb_models):
            entry = dict(entry)
            key = entry.pop("input_key", None)
            if not isinstance(key, str):
                raise InputError(f"conditioner embedder {index} needs an input_key (the batch key it reads)")
            if entry.pop("is_trainable", False):
                raise InputError(f"conditioner embedder {index}: trainable embedders are not supported "
                                 f"(set is_trainable: false)")
            if entry.pop("ucg_rate", 0.0):
                raise InputError(f"conditioner embedder {index}: ucg_rate is not supported (use the training "
                                 f"script's prompt dropout)")
            embedder = instantiate_from_config(entry)
            if hasattr(embedder, "freeze"):
                embedder.freeze()
            else:
                embedder.requires_grad_(False)
            self.embedders.append(embedder)
            self.input_keys.append(key)

    def _groups(self) -> Iterator[tuple[str, list[nn.Module]]]:
        """The embedders in order, runs of consecutive ones reading the same key together."""
        for key, run in groupby(zip(self.input_keys, self.embedders), key=lambda pair: pair[0]):
            yield key, [embedder for _, embedder in run]

    def encode_key(self, key: str, values: Any) -> dict[str, torch.Tensor]:
        """What the embedders reading `key` alone make of `values` (`"txt"`: both text encoders' context and the
        pooled vector): what the training cache stores, and `forward(encoded=...)` takes back."""
        runs = [embedders for k, embedders in self._groups() if k == key]
        if len(runs) != 1:
            raise InputError(f"the embedders reading {key!r} must be consecutive in the conditioner to be encoded "
                             f"apart; here they form {len(runs)} runs")
        return self._joined(self._outputs(key, runs[0], values))

    def forward(self, batch: Mapping[str, Any], force_zero_embeddings: Sequence[str] = (),
                encoded: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> dict[str, torch.Tensor]:
        """The conditionings of `batch`; the embedders reading a key in `force_zero_embeddings` give zeros instead
        (sgm's name: `("txt",)` is SDXL's unconditional text, diffusers' `force_zeros_for_empty_prompt`).
        `encoded[key]`: what `encode_key(key, ...)` gave before (the cache's text): those embedders do not run, and
        the result is on the device of those tensors (the training step's, while the encoders wait on the CPU)."""
        parts: dict[str, list[torch.Tensor]] = {"crossattn": [], "vector": []}
        for key, embedders in self._groups():
            if encoded is not None and key in encoded:
                outputs = {name: [value] for name, value in encoded[key].items()}
            elif key in batch:
                outputs = self._outputs(key, embedders, batch[key])
            else:
                raise InputError(f"the conditioner needs {key!r} for each item (the SDXL size conditionings are "
                                 f"{', '.join(SIZE_KEYS)})")
            for name, tensors in outputs.items():
                parts[name] += [torch.zeros_like(t) for t in tensors] if key in force_zero_embeddings else tensors
        given = [t for outputs in (encoded or {}).values() for t in outputs.values()]
        return self._joined(parts, given[0].device if given else None)

    @staticmethod
    def _outputs(key: str, embedders: list[nn.Module], values: Any) -> dict[str, list[torch.Tensor]]:
        """The embedders' outputs on `values`: a 3-D one joins the context, a 2-D one the vector."""
        parts: dict[str, list[torch.Tensor]] = {"crossattn": [], "vector": []}
        for embedder in embedders:
            outputs = embedder(values)
            for out in outputs if isinstance(outputs, tuple) else (outputs,):
                if out.dim() not in (2, 3):
                    raise InputError(f"conditioner embedder for {key!r} gave a {out.dim()}-D output; "
                                     f"expected 3-D (context) or 2-D (vector)")
                parts["crossattn" if out.dim() == 3 else "vector"].append(out)
        return parts

    def _joined(self, parts: Mapping[str, list[torch.Tensor]], device: torch.device | None = None
                ) -> dict[str, torch.Tensor]:
        device = device or next((p.device for p in self.parameters()), torch.device("cpu"))
        return {name: torch.cat([t.to(device) for t in tensors], dim=-1) for name, tensors in parts.items()
                if tensors}
