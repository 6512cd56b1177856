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
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from ldm.errors import InputError
from ldm.models.diffusion.schedule import SCHEDULE_BUFFERS, schedule_values
from ldm.modules.diffusionmodules.util import make_beta_schedule

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


#: (our prefix, diffusers' prefix, renames of the part after the prefix).
PrefixTable = list[tuple[str, str, Mapping[str, str]]]


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

    def encoder_prefixes(self) -> PrefixTable:
        """The rows the UNet encoder and the ControlNet share: time and vector embeddings, input and middle blocks."""
        table: PrefixTable = [
            ("time_embed.0.", "time_embedding.linear_1.", {}), ("time_embed.2.", "time_embedding.linear_2.", {}),
            # SDXL's vector embedding (diffusers' "text_time" addition embedding)
            ("label_emb.0.0.", "add_embedding.linear_1.", {}), ("label_emb.0.2.", "add_embedding.linear_2.", {}),
            ("input_blocks.0.0.", "conv_in.", {}),
            ("middle_block.0.", "mid_block.resnets.0.", RESNET_NAMES),
            ("middle_block.1.", "mid_block.attentions.0.", {}),
            ("middle_block.2.", "mid_block.resnets.1.", RESNET_NAMES),
        ]
        block = 1
        for level, count in enumerate(self.res_blocks_per_level):
            for j in range(count):
                table += [(f"input_blocks.{block}.0.", f"down_blocks.{level}.resnets.{j}.", RESNET_NAMES),
                          (f"input_blocks.{block}.1.", f"down_blocks.{level}.attentions.{j}.", {})]
                block += 1
            if level != len(self.res_blocks_per_level) - 1:
                table.append((f"input_blocks.{block}.0.op.", f"down_blocks.{level}.downsamplers.0.conv.", {}))
                block += 1
        return table

    @property
    def input_blocks(self) -> int:
        return 1 + sum(self.res_blocks_per_level) + len(self.res_blocks_per_level) - 1

    def prefixes(self) -> PrefixTable:
        """Every module of a ControlNet: the encoder's rows, the hint block, the zero convs."""
        table = self.encoder_prefixes() + [
            ("middle_block_out.0.", "controlnet_mid_block.", {}),
            ("input_hint_block.0.", "controlnet_cond_embedding.conv_in.", {}),
            (f"input_hint_block.{2 * (self.hint_convs - 1)}.", "controlnet_cond_embedding.conv_out.", {}),
        ]
        table += [(f"input_hint_block.{2 * (k + 1)}.", f"controlnet_cond_embedding.blocks.{k}.", {})
                  for k in range(self.hint_convs - 2)]
        return table + [(f"zero_convs.{k}.0.", f"controlnet_down_blocks.{k}.", {}) for k in range(self.input_blocks)]

    def rename(self, keys: Iterable[str], to_diffusers: bool) -> dict[str, str]:
        """Our name -> diffusers' (or back) for each of `keys`; a name the table does not know is an error."""
        return rename(keys, self.prefixes(), to_diffusers)


def rename(keys: Iterable[str], table: PrefixTable, to_diffusers: bool) -> dict[str, str]:
    """Each key under the table's first matching prefix, to the other side's name; an unknown key is an error."""
    rows = [(ours, theirs, renames) if to_diffusers else (theirs, ours, {v: k for k, v in renames.items()})
            for ours, theirs, renames in table]
    names = {}
    for key in keys:
        for source, target, renames in rows:
            if key.startswith(source):
                inner, _, leaf = key[len(source):].rpartition(".")
                names[key] = target + (f"{renames.get(inner, inner)}.{leaf}" if inner else leaf)
                break
        else:
            side = "ours" if to_diffusers else "diffusers'"
            raise InputError(f"tensor {key!r} has no counterpart in the other layout ({side} names)")
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


def diffusers_config(net: nn.Module, addition_time_embed_dim: int | None = None) -> dict[str, Any]:
    """The `config.json` of diffusers' `ControlNetModel` that has the architecture of our ControlNet `net`.

    An SDXL ControlNet (one with `label_emb`) also needs `addition_time_embed_dim`: the width of each size number's
    embedding in its vector y (256 for SDXL), which the model's conditioner knows and the ControlNet does not.
    Refuses what diffusers' ControlNet cannot express (a pixel-space hint block, scale-shift norms, ...).
    """
    spec = net.spec
    unsupported = {"use_scale_shift_norm": spec.use_scale_shift_norm, "resblock_updown": spec.resblock_updown,
                   "dims != 2": spec.dims != 2, "num_attention_blocks": spec.num_attention_blocks is not None,
                   "disable_self_attentions": bool(spec.disable_self_attentions),
                   "disable_middle_transformer": spec.disable_middle_transformer,
                   "a hint block that does not downsample 8x": net.hint_downsample != 8,
                   "a number of ResBlocks that differs between levels": len(set(spec.res_blocks_per_level)) > 1}
    refused = [name for name, present in unsupported.items() if present]
    if refused:
        raise InputError(f"this ControlNet has no diffusers equivalent ({', '.join(refused)})")
    if spec.adm_in_channels is not None and addition_time_embed_dim is None:
        raise InputError("an SDXL ControlNet's diffusers config needs the size embedding width "
                         "(addition_time_embed_dim, the conditioner's ConcatTimestepEmbedderND outdim)")
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
        "layers_per_block": spec.res_blocks_per_level[0],
        "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-5, "norm_num_groups": 32,
        "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
        "projection_class_embeddings_input_dim": None, "resnet_time_scale_shift": "default",
        "transformer_layers_per_block": spec.transformer_depth if isinstance(spec.transformer_depth, int)
        else list(spec.depth_per_level), "upcast_attention": False,
        "use_linear_projection": spec.use_linear_in_transformer,
    }
    if spec.adm_in_channels is not None:
        config.update({"addition_embed_type": "text_time", "addition_time_embed_dim": addition_time_embed_dim,
                       "projection_class_embeddings_input_dim": spec.adm_in_channels})
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


# ----- a diffusers Stable Diffusion pipeline folder, read as an SD checkpoint ----------------------------------
#: The file that marks a folder as a diffusers pipeline.
PIPELINE_INDEX = "model_index.json"
#: Key prefixes of the parts of an SD checkpoint in the original layout.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
#: Where sgm's SDXL checkpoints keep their two text encoders (CLIP ViT-L, OpenCLIP bigG).
SDXL_CLIP_PREFIX = "conditioner.embedders.0."
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1."
#: sd_xl_base_1.0's scheduler settings that change what the model computes (cldm_xl.yaml's schedule).
SDXL_SCHEDULER = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                  "num_train_timesteps": 1000, "prediction_type": "epsilon", "rescale_betas_zero_snr": False}
#: A shard's file name: `diffusion_pytorch_model-00001-of-00003.safetensors`.
SHARD_NAME = re.compile(r"-\d{5}-of-\d{5}")
VAE_RESNET_NAMES = {"nin_shortcut": "conv_shortcut"}
VAE_ATTENTION_NAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
#: How many of OpenCLIP ViT-H/14's 24 text blocks diffusers' SD2 converter keeps (the last is dropped).
DIFFUSERS_SD2_TEXT_LAYERS = 23
#: transformers' CLIP text layer -> OpenCLIP's resblock, for the names that only differ (q/k/v are joined).
OPEN_CLIP_LAYER_NAMES = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                         "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def unet_table(res_blocks_per_level: Sequence[int], attention: Sequence[bool]) -> PrefixTable:
    """Our UNet's modules and diffusers' UNet2DConditionModel's: the encoder as the ControlNet's, then the decoder,
    whose level `L - 1 - i` is diffusers' `up_blocks[i]`, with one ResBlock more per level than the encoder."""
    table = EncoderLayout(tuple(res_blocks_per_level), hint_convs=2).encoder_prefixes()
    block = 0
    for i, level in enumerate(reversed(range(len(res_blocks_per_level)))):
        for j in range(res_blocks_per_level[level] + 1):
            table.append((f"output_blocks.{block}.0.", f"up_blocks.{i}.resnets.{j}.", RESNET_NAMES))
            if attention[level]:
                table.append((f"output_blocks.{block}.1.", f"up_blocks.{i}.attentions.{j}.", {}))
            block += 1
        if level != 0:
            upsampler = 2 if attention[level] else 1
            table.append((f"output_blocks.{block - 1}.{upsampler}.conv.", f"up_blocks.{i}.upsamplers.0.conv.", {}))
    return table + [("out.0.", "conv_norm_out.", {}), ("out.2.", "conv_out.", {})]


def vae_table(levels: int, res_blocks: int) -> PrefixTable:
    """Our KL autoencoder's modules and diffusers' AutoencoderKL's; the decoder's level order is reversed there."""
    table: PrefixTable = [("quant_conv.", "quant_conv.", {}), ("post_quant_conv.", "post_quant_conv.", {})]
    for side in ("encoder", "decoder"):
        table += [(f"{side}.conv_in.", f"{side}.conv_in.", {}), (f"{side}.conv_out.", f"{side}.conv_out.", {}),
                  (f"{side}.norm_out.", f"{side}.conv_norm_out.", {}),
                  (f"{side}.mid.block_1.", f"{side}.mid_block.resnets.0.", VAE_RESNET_NAMES),
                  (f"{side}.mid.block_2.", f"{side}.mid_block.resnets.1.", VAE_RESNET_NAMES),
                  (f"{side}.mid.attn_1.", f"{side}.mid_block.attentions.0.", VAE_ATTENTION_NAMES)]
    for level in range(levels):
        table += [(f"encoder.down.{level}.block.{j}.", f"encoder.down_blocks.{level}.resnets.{j}.", VAE_RESNET_NAMES)
                  for j in range(res_blocks)]
        if level != levels - 1:
            table.append((f"encoder.down.{level}.downsample.conv.", f"encoder.down_blocks.{level}.downsamplers.0.conv.",
                          {}))
        up = levels - 1 - level
        table += [(f"decoder.up.{level}.block.{j}.", f"decoder.up_blocks.{up}.resnets.{j}.", VAE_RESNET_NAMES)
                  for j in range(res_blocks + 1)]
        if level != 0:
            table.append((f"decoder.up.{level}.upsample.conv.", f"decoder.up_blocks.{up}.upsamplers.0.conv.", {}))
    return table


def _read_json(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not a readable diffusers config ({type(err).__name__})") from err
    if not isinstance(config, dict):
        raise InputError(f"{path}: not a diffusers config (a JSON object)")
    return config


def _field(config: Mapping[str, Any], key: str, path: Path) -> Any:
    if key not in config:
        raise InputError(f"{path}: lacks {key!r}")
    return config[key]


def weights_file(folder: Path) -> Path:
    """A diffusers part's weights: the plain safetensors file, else a variant (fp16), else a pickled `.bin`; one
    shard of several is not a weights file (`part_tensors` reads them by their index)."""
    for pattern in ("diffusion_pytorch_model.safetensors", "model.safetensors", "*.safetensors", "*.bin"):
        found = sorted(f for f in folder.glob(pattern) if not SHARD_NAME.search(f.name))
        if found:
            return found[0]
    if any(SHARD_NAME.search(f.name) for f in folder.iterdir()):
        raise InputError(f"{folder}: sharded weights without their index (*.safetensors.index.json)")
    raise InputError(f"{folder}: no weights file (*.safetensors or *.bin) in this diffusers model folder")


def shard_index(folder: Path) -> Path | None:
    """The index of a part saved in shards (`save_pretrained` splits weights over 10 GB, an fp32 SDXL UNet)."""
    found = sorted(folder.glob("*.safetensors.index.json")) or sorted(folder.glob("*.bin.index.json"))
    return found[0] if found else None


def part_tensors(folder: Path, read: Callable[[Path], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A diffusers part's tensors: its weights file, or every shard its index lists (all of its tensors there)."""
    index = shard_index(folder)
    if index is None:
        return read(weights_file(folder))
    weight_map = _field(_read_json(index), "weight_map", index)
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not (folder / shard).is_file():
            raise InputError(f"{index}: lists the shard {shard}, which is not in {folder}")
        tensors.update(read(folder / shard))
    missing = sorted(set(weight_map) - tensors.keys())
    if missing:
        raise InputError(f"{index}: {len(missing)} tensors it lists are in none of the shards (first: {missing[0]})")
    return tensors


def sd_from_diffusers_pipeline(folder: Path, read: Callable[[Path], dict[str, torch.Tensor]]
                               ) -> dict[str, torch.Tensor]:
    """A diffusers `StableDiffusionPipeline` or `StableDiffusionXLPipeline` folder (`unet/`, `vae/`,
    `text_encoder/`, and for SDXL `text_encoder_2/`) as a checkpoint in the original (sgm's for SDXL) layout.
    `read` reads one weights file (the caller's safe reader).

    SD2.x's text encoder (OpenCLIP's, stored by diffusers as a transformers CLIPTextModel) goes back to OpenCLIP's
    names. diffusers' converter keeps 23 of ViT-H/14's 24 blocks (SD2 conditions on the penultimate one) and drops
    the projection: a 23-block encoder gets its last block back as zeros (a zero block adds nothing to its input),
    and the projection as zeros (unused by the UNet's conditioning). SDXL's second encoder (OpenCLIP bigG, a
    transformers CLIPTextModelWithProjection there) keeps every block and its projection, which makes the pooled
    vector; its `logit_scale`, which diffusers does not keep, is zero (no conditioning reads it). sgm's SDXL files
    carry no schedule buffers, so none are added for SDXL.
    """
    xl = (folder / "text_encoder_2").is_dir()
    if xl and not (folder / "text_encoder").is_dir():
        raise InputError(f"{folder}: an SDXL refiner pipeline (text_encoder_2/ without text_encoder/); ControlNets "
                         "control the base model (sd_xl_base_1.0)")
    parts = {name: folder / name for name in ("unet", "vae", "text_encoder", "text_encoder_2")[:4 if xl else 3]}
    missing = [name for name, path in parts.items() if not (path / DIFFUSERS_CONFIG).is_file()]
    if missing:
        raise InputError(f"{folder}: a diffusers pipeline without {', '.join(missing)} "
                         f"(each part needs its {DIFFUSERS_CONFIG})")
    state = {**_unet_from_pipeline(parts["unet"], read), **_vae_from_pipeline(parts["vae"], read)}
    text_config, text = _text_from_pipeline(parts["text_encoder"], read)
    if xl:
        state.update({f"{SDXL_CLIP_PREFIX}transformer.{k}": v for k, v in text.items() if k.startswith("text_model.")})
        _, bigg = _text_from_pipeline(parts["text_encoder_2"], read)
        if "text_projection.weight" not in bigg:
            raise InputError(f"{parts['text_encoder_2']}: SDXL's second text encoder lacks text_projection.weight "
                             "(a CLIPTextModelWithProjection has it)")
        projection = bigg.pop("text_projection.weight").T  # transformers' Linear weight; OpenCLIP multiplies by it
        state.update({SDXL_OPEN_CLIP_PREFIX + k: v
                      for k, v in open_clip_from_transformers(bigg, False, projection).items()})
        check_sdxl_scheduler(folder)
        return state
    if text_config.get("hidden_act") == "gelu":  # OpenCLIP's tower (SD2.x); CLIP's uses quick_gelu (SD1.x)
        dropped = text_config.get("num_hidden_layers") == DIFFUSERS_SD2_TEXT_LAYERS
        state.update({TEXT_PREFIX + k: v for k, v in open_clip_from_transformers(text, dropped).items()})
    else:
        state.update({f"{TEXT_PREFIX}transformer.{k}": v for k, v in text.items() if k.startswith("text_model.")})
    return {**state, **schedule_of_pipeline(folder)}


def _unet_from_pipeline(part: Path, read: Callable[[Path], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    config_path = part / DIFFUSERS_CONFIG
    config = _read_json(config_path)
    levels = len(_field(config, "block_out_channels", config_path))
    per_level = config.get("layers_per_block", 2)
    res_blocks = list(per_level) if isinstance(per_level, list) else [per_level] * levels
    attention = ["CrossAttn" in kind for kind in _field(config, "down_block_types", config_path)]
    unet = part_tensors(part, read)
    return {UNET_PREFIX + name: unet[key] for key, name in rename(unet, unet_table(res_blocks, attention),
                                                                 to_diffusers=False).items()}


def _vae_from_pipeline(part: Path, read: Callable[[Path], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    config_path = part / DIFFUSERS_CONFIG
    config = _read_json(config_path)
    vae = part_tensors(part, read)
    table = vae_table(len(_field(config, "block_out_channels", config_path)), config.get("layers_per_block", 2))
    state = {}
    for key, name in rename(vae, table, to_diffusers=False).items():
        tensor = vae[key]
        if ".mid.attn_1." in name and name.endswith("weight") and tensor.dim() == 2:
            tensor = tensor[:, :, None, None]  # our attention's projections are 1x1 convolutions
        state[VAE_PREFIX + name] = tensor
    return state


def _text_from_pipeline(part: Path, read: Callable[[Path], dict[str, torch.Tensor]]
                        ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A transformers text encoder's config and tensors, named `text_model.*` (transformers 5 saves without that
    level) and `text_projection.*`."""
    config = _read_json(part / DIFFUSERS_CONFIG)
    text = {k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k: v
            for k, v in part_tensors(part, read).items() if not k.endswith("position_ids")}
    return config, text


def check_sdxl_scheduler(folder: Path) -> None:
    """An SDXL checkpoint carries no schedule: the config's (sgm's SDXL schedule, epsilon prediction) is used, so a
    pipeline trained with another is refused rather than read as if it had SDXL's."""
    path = folder / "scheduler" / "scheduler_config.json"
    config = _read_json(path) if path.is_file() else {}
    for key, expected in SDXL_SCHEDULER.items():
        if key in config and config[key] != expected:
            raise InputError(f"{path}: {key} {config[key]!r}; SDXL bases (and cldm_xl.yaml) use {expected!r}, "
                             "the only SDXL schedule this project trains and samples")


def schedule_of_pipeline(folder: Path) -> dict[str, torch.Tensor]:
    """The schedule buffers an SD checkpoint carries, from the pipeline's scheduler config (SD's defaults without
    one). diffusers' "scaled_linear" betas are what the original calls "linear"."""
    path = folder / "scheduler" / "scheduler_config.json"
    config = _read_json(path) if path.is_file() else {}
    kind = config.get("beta_schedule", "scaled_linear")
    if kind != "scaled_linear":
        raise InputError(f"{path}: beta_schedule {kind!r}; Stable Diffusion pipelines use 'scaled_linear'")
    betas = make_beta_schedule("linear", config.get("num_train_timesteps", 1000), config.get("beta_start", 0.00085),
                               config.get("beta_end", 0.012))
    values = schedule_values(betas)
    return {name: torch.tensor(values[name], dtype=torch.float32) for name in SCHEDULE_BUFFERS}


def open_clip_from_transformers(text: Mapping[str, torch.Tensor], dropped_last_block: bool,
                                projection: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """OpenCLIP's text tower (`model.*` names) from diffusers' transformers-format copy of it (`text_model.*`);
    `dropped_last_block`: append the block diffusers' converter left out, as zeros; `projection`: the
    `text_projection` matrix (`[width, embed_dim]`), zeros without one."""
    prefix = "text_model.encoder.layers."
    layers = 1 + max(int(k[len(prefix):].split(".")[0]) for k in text if k.startswith(prefix))
    width = text["text_model.final_layer_norm.weight"].shape[0]
    out = {"model.token_embedding.weight": text["text_model.embeddings.token_embedding.weight"],
           "model.positional_embedding": text["text_model.embeddings.position_embedding.weight"],
           "model.ln_final.weight": text["text_model.final_layer_norm.weight"],
           "model.ln_final.bias": text["text_model.final_layer_norm.bias"],
           "model.text_projection": torch.zeros(width, width) if projection is None else projection.contiguous(),
           "model.logit_scale": torch.zeros(())}
    for i in range(layers + int(dropped_last_block)):
        ours = f"model.transformer.resblocks.{i}."
        if i == layers:  # the block diffusers dropped: zeros (the residual block then adds nothing)
            out.update({name.replace(f"resblocks.{i - 1}.", f"resblocks.{i}."): torch.zeros_like(tensor)
                        for name, tensor in out.items() if name.startswith(f"model.transformer.resblocks.{i - 1}.")})
            continue
        theirs = f"{prefix}{i}."
        for kind in ("weight", "bias"):
            out[f"{ours}attn.in_proj_{kind}"] = torch.cat([text[f"{theirs}self_attn.{p}_proj.{kind}"]
                                                           for p in ("q", "k", "v")])
            out.update({f"{ours}{mine}.{kind}": text[f"{theirs}{name}.{kind}"]
                        for name, mine in OPEN_CLIP_LAYER_NAMES.items()})
    return out
