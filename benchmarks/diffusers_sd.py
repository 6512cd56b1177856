"""The diffusers contender: SD1.5-sized UNet, ControlNet, VAE and CLIP text encoder from config dicts.

Nothing is downloaded: every part is built from the configuration the SD1.5 / sd-controlnet repositories
publish, with diffusers' random initialisation. Only the benchmark scripts import this module, so the
project itself never depends on diffusers (a test and benchmark dependency only).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.modules.encoders.tokenizer import find_bpe_vocab, load_bpe

#: runwayml/stable-diffusion-v1-5 unet/config.json (the fields that differ from diffusers' defaults too).
SD15_UNET: dict[str, Any] = {
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
    "cross_attention_dim": 768, "attention_head_dim": 8,
}

#: runwayml/stable-diffusion-v1-5 vae/config.json.
SD15_VAE: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 512,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "act_fn": "silu",
    "norm_num_groups": 32, "scaling_factor": 0.18215,
}

#: openai/clip-vit-large-patch14's text tower (SD1.5's text_encoder/config.json).
CLIP_L14_TEXT: dict[str, Any] = {
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5, "projection_dim": 768, "bos_token_id": 49406, "eos_token_id": 49407,
    "pad_token_id": 1,
}

#: SD1.5's scheduler_config.json: the "scaled linear" betas of models/cldm_v15.yaml.
SD15_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
}


@dataclass
class DiffusersSD:
    """The four networks of a ControlNet training or generation run."""

    unet: UNet2DConditionModel
    controlnet: ControlNetModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel

    def to_channels_last(self) -> None:
        for net in (self.unet, self.controlnet, self.vae):
            net.to(memory_format=torch.channels_last)


def build(seed: int = 0) -> DiffusersSD:
    """Random-weight SD1.5 parts; the ControlNet starts as a copy of the UNet encoder, as in training."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD15_UNET)
    controlnet = ControlNetModel.from_unet(unet)
    vae = AutoencoderKL(**SD15_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L14_TEXT))
    for net in (unet, controlnet, vae, text_encoder):
        net.eval()
    return DiffusersSD(unet, controlnet, vae, text_encoder)


def ddpm_scheduler() -> DDPMScheduler:
    return DDPMScheduler(**{k: v for k, v in SD15_SCHEDULE.items() if k != "set_alpha_to_one"})


def ddim_scheduler() -> DDIMScheduler:
    return DDIMScheduler(**SD15_SCHEDULE)


def clip_tokenizer(folder: Path) -> CLIPTokenizer:
    """transformers' CLIP tokenizer from the BPE file the project already ships (open-clip-torch's wheel).

    The pipeline insists on a tokenizer; writing vocab.json/merges.txt from the same merges our own
    tokenizer reads avoids a hub download and gives identical token ids.
    """
    folder.mkdir(parents=True, exist_ok=True)
    bpe = load_bpe()
    with gzip.open(find_bpe_vocab(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    (folder / "vocab.json").write_text(json.dumps(bpe.encoder), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77,
                         pad_token="<|endoftext|>")
