"""The layouts a ControlNet travels in, and the one name mapping between ours and diffusers'.

- **control-only**: the `control_model.*` tensors alone, the layout of the released `control_v11*` files, which the
  web UI's ControlNet extension and ComfyUI load (ComfyUI also takes the names without the prefix);
- **difference**: the web UI's "diff" layout: each ControlNet tensor that has a UNet counterpart minus the base
  UNet's, the others as they are, and a `difference` marker key; loading adds the base back;
- **diffusers**: a `ControlNetModel` folder, `config.json` + `diffusion_pytorch_model.safetensors`, with diffusers'
  names. The names map block by block (`EncoderLayout`), so one table serves both directions.

Exported files carry metadata in the safetensors header (`controlnet.*` keys): the base family, the ControlNet's
config, training steps, a hash of the base UNet, the exporting command; `read_metadata` gives it back.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from ldm.errors import InputError

#: The marker key of the web UI's difference layout (its value is never read).
DIFFERENCE_KEY = "difference"
#: A diffusers model folder: its weights file (which `cldm.checkpoint.read_checkpoint` reads when given the folder).
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_CONFIG = "config.json"
#: The diffusers version whose `ControlNetModel` config this writes (any later one reads it).
DIFFUSERS_CONFIG_VERSION = "0.27.0"
METADATA_PREFIX = "controlnet."
#: A ResBlock's layers under ldm names -> diffusers' ResnetBlock2D names.
RESNET_NAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}


@dataclass(frozen=True)
class EncoderLayout:
    """How many ResBlocks each level of a ControlNet has and how many convs its hint block has: all the name
    mapping needs. Block `b` of `input_blocks` is level `i`'s resnet `j` (and attention `j`), or its downsampler."""

    res_blocks_per_level: tuple[int, ...]
    hint_convs: int

    @classmethod
    def of(cls, net: nn.Module) -> EncoderLayout:
        convs = sum(1 for layer in net.input_hint_block if isinstance(layer, nn.Conv2d))
        return cls(tuple(net.spec.res_blocks_per_level), convs)

    @classmethod
    def from_diffusers(cls, keys: Iterable[str]) -> EncoderLayout:
        """The layout a diffusers ControlNet's tensor names imply."""
        resnets: dict[int, set[int]] = {}
        hint_blocks = set()
        for key in keys:
            parts = key.split(".")
            if parts[0] == "down_blocks" and parts[2] == "resnets":
                resnets.setdefault(int(parts[1]), set()).add(int(parts[3]))
            elif parts[:2] == ["controlnet_cond_embedding", "blocks"]:
                hint_blocks.add(int(parts[2]))
        if not resnets:
            raise InputError("not a diffusers ControlNet: no down_blocks.*.resnets.* tensors")
        return cls(tuple(len(resnets[i]) for i in sorted(resnets)), len(hint_blocks) + 2)

    def prefixes(self) -> list[tuple[str, str, Mapping[str, str]]]:
        """(our prefix, diffusers' prefix, renames inside) for every module; a table usable in both directions."""
        table: list[tuple[str, str, Mapping[str, str]]] = [
            ("time_embed.0.", "time_embedding.linear_1.", {}), ("time_embed.2.", "time_embedding.linear_2.", {}),
            ("label_emb.0.0.", "add_embedding.linear_1.", {}), ("label_emb.0.2.", "add_embedding.linear_2.", {}),
            ("input_blocks.0.0.", "conv_in.", {}),
            ("middle_block.0.", "mid_block.resnets.0.", RESNET_NAMES),
            ("middle_block.1.", "mid_block.attentions.0.", {}),
            ("middle_block.2.", "mid_block.resnets.1.", RESNET_NAMES),
            ("middle_block_out.0.", "controlnet_mid_block.", {}),
            ("input_hint_block.0.", "controlnet_cond_embedding.conv_in.", {}),
            (f"input_hint_block.{2 * (self.hint_convs - 1)}.", "controlnet_cond_embedding.conv_out.", {}),
        ]
        table += [(f"input_hint_block.{2 * (k + 1)}.", f"controlnet_cond_embedding.blocks.{k}.", {})
                  for k in range(self.hint_convs - 2)]
        block = 1
        for level, count in enumerate(self.res_blocks_per_level):
            for j in range(count):
                table += [(f"input_blocks.{block}.0.", f"down_blocks.{level}.resnets.{j}.", RESNET_NAMES),
                          (f"input_blocks.{block}.1.", f"down_blocks.{level}.attentions.{j}.", {})]
                block += 1
            if level != len(self.res_blocks_per_level) - 1:
                table.append((f"input_blocks.{block}.0.op.", f"down_blocks.{level}.downsamplers.0.conv.", {}))
                block += 1
        table += [(f"zero_convs.{k}.0.", f"controlnet_down_blocks.{k}.", {}) for k in range(block)]
        return table

    def rename(self, keys: Iterable[str], to_diffusers: bool) -> dict[str, str]:
        """Our name -> diffusers' (or back) for each of `keys`; a name the table does not know is an error."""
        table = [(ours, theirs, renames) if to_diffusers else (theirs, ours, {v: k for k, v in renames.items()})
                 for ours, theirs, renames in self.prefixes()]
        names = {}
        for key in keys:
            for source, target, renames in table:
                if key.startswith(source):
                    rest = key[len(source):]
                    inner, _, leaf = rest.rpartition(".")
                    names[key] = target + (f"{renames.get(inner, inner)}.{leaf}" if inner else leaf)
                    break
            else:
                side = "ours" if to_diffusers else "diffusers'"
                raise InputError(f"ControlNet tensor {key!r} has no counterpart in the other layout ({side} names)")
        return names


def is_diffusers_controlnet(state: Mapping[str, Any]) -> bool:
    return "controlnet_cond_embedding.conv_in.weight" in state


def to_diffusers(control: Mapping[str, torch.Tensor], layout: EncoderLayout) -> dict[str, torch.Tensor]:
    """ControlNet weights (our names, no prefix) under diffusers' names."""
    names = layout.rename(control, to_diffusers=True)
    return {names[k]: v for k, v in control.items()}


def from_diffusers(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ControlNet's weights under our names (no prefix); the layout is read off the names."""
    names = EncoderLayout.from_diffusers(state).rename(state, to_diffusers=False)
    return {names[k]: v for k, v in state.items()}


def diffusers_config(net: nn.Module) -> dict[str, Any]:
    """The `config.json` of diffusers' `ControlNetModel` that has the architecture of our ControlNet `net`.

    Refuses what diffusers' ControlNet cannot express (a pixel-space hint block, scale-shift norms, ...).
    """
    spec = net.spec
    unsupported = {"use_scale_shift_norm": spec.use_scale_shift_norm, "resblock_updown": spec.resblock_updown,
                   "dims != 2": spec.dims != 2, "num_attention_blocks": spec.num_attention_blocks is not None,
                   "disable_self_attentions": bool(spec.disable_self_attentions),
                   "a hint block that does not downsample 8x": net.hint_downsample != 8}
    refused = [name for name, present in unsupported.items() if present]
    if refused:
        raise InputError(f"this ControlNet has no diffusers equivalent ({', '.join(refused)})")
    channels = [spec.model_channels * mult for mult in spec.channel_mult]
    attention = [2**level in spec.attention_resolutions for level in range(len(channels))]
    heads = [spec.heads_for(ch)[0] for ch in channels]
    config: dict[str, Any] = {
        "_class_name": "ControlNetModel", "_diffusers_version": DIFFUSERS_CONFIG_VERSION,
        "act_fn": "silu", "addition_embed_type": None, "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": None, "attention_head_dim": heads if len(set(heads)) > 1 else heads[0],
        "block_out_channels": channels, "class_embed_type": None, "conditioning_channels": net.hint_channels,
        "conditioning_embedding_out_channels": list(net.hint_block_widths),
        "controlnet_conditioning_channel_order": "rgb", "cross_attention_dim": spec.context_dim,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "downsample_padding": 1, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
        "flip_sin_to_cos": True, "freq_shift": 0, "global_pool_conditions": False, "in_channels": spec.in_channels,
        "layers_per_block": spec.res_blocks_per_level[0] if len(set(spec.res_blocks_per_level)) == 1
        else list(spec.res_blocks_per_level),
        "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-5, "norm_num_groups": 32,
        "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
        "projection_class_embeddings_input_dim": None, "resnet_time_scale_shift": "default",
        "transformer_layers_per_block": spec.transformer_depth, "upcast_attention": False,
        "use_linear_projection": spec.use_linear_in_transformer,
    }
    return config


def difference(control: Mapping[str, torch.Tensor], unet: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The web UI's difference layout of `control` (our names, no prefix) over the base `unet` (no prefix).

    In float32, adding the base back gives the control bit for bit wherever a weight is within a factor of two of
    its base (the subtraction is then exact, Sterbenz' lemma), which holds for a ControlNet trained from a copy of
    its base's encoder; `undo_difference` and the exporter's report check it.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in control.items():
        base = unet.get(key)
        usable = base is not None and base.shape == value.shape and value.is_floating_point()
        out[key] = (value.float() - base.float()).to(value.dtype) if usable else value
    out[DIFFERENCE_KEY] = torch.tensor([1.0])
    return out


def undo_difference(diff: Mapping[str, torch.Tensor], unet: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ControlNet a difference file holds, given the base `unet` it was taken over (both without prefixes)."""
    return {key: (value.float() + unet[key].float()).to(value.dtype)
            if key in unet and unet[key].shape == value.shape and value.is_floating_point() else value
            for key, value in diff.items() if key != DIFFERENCE_KEY}


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of `tensors`, in name order: what a base model is."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def metadata(fields: Mapping[str, Any]) -> dict[str, str]:
    """`controlnet.<name>` string entries for a safetensors header (configs as JSON)."""
    out = {}
    for name, value in fields.items():
        if value is None:
            continue
        if isinstance(value, DictConfig | ListConfig):
            value = OmegaConf.to_container(value, resolve=True)
        out[METADATA_PREFIX + name] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return out


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `controlnet.*` entries of a safetensors file (or of the weights file in a diffusers folder)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / DIFFUSERS_WEIGHTS
    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata() or {}
    return {k[len(METADATA_PREFIX):]: v for k, v in header.items() if k.startswith(METADATA_PREFIX)}
