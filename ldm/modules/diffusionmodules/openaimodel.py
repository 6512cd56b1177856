"""The Stable Diffusion UNet, and the one builder that makes its encoder for the UNet and the ControlNet.

The ControlNet is "a trainable copy of the encoder": instead of repeating the UNet's constructor,
`UNetEncoderSpec.build_encoder` makes the time embedding, the input blocks and the middle block, and
both networks call it. Parameter names match the released checkpoints.

SDXL is the same builder with what sgm's UNet adds: a transformer depth per level (the middle block takes the
last), and a vector conditioning `y` (pooled text and size embeddings) that `label_emb` turns into a second
timestep-like embedding (`num_classes: sequential`, `adm_in_channels` wide). Both networks take `y=` as sgm's do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import InputError
from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import (
    CPU_CHECKPOINT_MIN_ELEMENTS,
    avg_pool_nd,
    checkpoint,
    conv_nd,
    normalization,
    timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module):
    """A block that also takes the timestep embedding."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the timestep embedding and the text context to the layers that need them."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour x2, then an optional 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None,
                 padding: int = 1) -> None:
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, channels, self.out_channels, 3, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3x3 conv (or average pooling when `use_conv` is off)."""

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None,
                 padding: int = 1) -> None:
        super().__init__()
        self.out_channels = out_channels or channels
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            if self.out_channels != channels:
                raise InputError("average-pool downsampling cannot change the channel count")
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Two 3x3 convs with the timestep embedding added in between, and a skip connection."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, dims: int = 2,
                 use_checkpoint: bool = False, up: bool = False, down: bool = False) -> None:
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_checkpoint = use_checkpoint
        self.checkpoint_cpu_min_elements = CPU_CHECKPOINT_MIN_ELEMENTS
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), conv_nd(dims, channels, self.out_channels, 3, padding=1)
        )
        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels, False, dims)
            self.x_upd: nn.Module = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels)
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        else:
            kernel, pad = (3, 1) if use_conv else (1, 0)
            self.skip_connection = conv_nd(dims, channels, self.out_channels, kernel, padding=pad)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return checkpoint(self._forward, x, emb, enabled=self.use_checkpoint,
                          cpu_min_elements=self.checkpoint_cpu_min_elements)

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *((1,) * (h.dim() - emb_out.dim())))
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


@dataclass
class UNetEncoderSpec:
    """The hyper-parameters the UNet and the ControlNet share, as the original YAMLs name them.

    `num_heads=-1` with `num_head_channels=64` is SD2.x and SDXL (heads follow the width); SD1.x fixes
    `num_heads=8`. `legacy=True` reproduces the old LDM head-size rule. `use_spatial_transformer` unset means
    what sgm's UNet always does (a spatial transformer at each attention level); only False is refused.
    `transformer_depth` is one depth or one per level, and the middle block takes the last, as in sgm.
    `num_classes: sequential` with `adm_in_channels` adds SDXL's `label_emb` for the vector conditioning.
    """

    in_channels: int
    model_channels: int
    num_res_blocks: int | Sequence[int]
    attention_resolutions: Sequence[int]
    dropout: float = 0.0
    channel_mult: Sequence[int] = (1, 2, 4, 8)
    conv_resample: bool = True
    dims: int = 2
    use_checkpoint: bool = False
    num_heads: int = -1
    num_head_channels: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_spatial_transformer: bool | None = None
    transformer_depth: int | Sequence[int] = 1
    context_dim: int | None = None
    disable_self_attentions: Sequence[bool] | None = None
    num_attention_blocks: Sequence[int] | None = None
    disable_middle_self_attn: bool = False
    disable_middle_transformer: bool = False
    use_linear_in_transformer: bool = False
    legacy: bool = True
    num_classes: str | None = None
    adm_in_channels: int | None = None
    res_blocks_per_level: list[int] = field(init=False)
    depth_per_level: list[int] = field(init=False)

    @classmethod
    def from_params(cls, **params: Any) -> UNetEncoderSpec:
        """The spec from a YAML's network `params:`; a parameter it does not know is named in the error."""
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(params) - known)
        if unknown:
            raise InputError(f"unknown UNet/ControlNet parameter(s) {', '.join(unknown)}")
        return cls(**params)

    def __post_init__(self) -> None:
        if self.num_heads == -1 and self.num_head_channels == -1:
            raise InputError("set either num_heads or num_head_channels")
        if self.context_dim is None:
            raise InputError("the UNet needs context_dim (the text embedding width)")
        if self.use_spatial_transformer is False:
            raise InputError("only the spatial-transformer UNet of Stable Diffusion is supported")
        if self.num_classes not in (None, "sequential"):
            raise InputError(f"num_classes must be unset or 'sequential' (SDXL's vector conditioning), got "
                             f"{self.num_classes!r}: class-conditional UNets are not part of Stable Diffusion")
        if (self.num_classes == "sequential") != (self.adm_in_channels is not None):
            raise InputError("num_classes: sequential and adm_in_channels (the width of the vector y) go together")
        self.res_blocks_per_level = self._per_level("num_res_blocks", self.num_res_blocks)
        self.depth_per_level = self._per_level("transformer_depth", self.transformer_depth)
        if not isinstance(self.context_dim, int):  # the original YAMLs may give it as a one-element list
            self.context_dim = list(self.context_dim)[0]

    def _per_level(self, name: str, value: int | Sequence[int]) -> list[int]:
        """One number for every level, or a list with one entry per `channel_mult` level."""
        if isinstance(value, int):
            return [value] * len(self.channel_mult)
        if len(value) != len(self.channel_mult):
            raise InputError(f"{name} needs one entry per channel_mult level (or one number)")
        return list(value)

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(number of heads, channels per head) of an attention layer on `channels` channels."""
        if self.num_head_channels == -1:
            heads, dim_head = self.num_heads, channels // self.num_heads
        else:
            heads, dim_head = channels // self.num_head_channels, self.num_head_channels
        if self.legacy:
            dim_head = channels // heads
        return heads, dim_head

    def res_block(self, channels: int, out_channels: int, **kwargs: bool) -> ResBlock:
        return ResBlock(channels, self.time_embed_dim, self.dropout, out_channels=out_channels, dims=self.dims,
                        use_checkpoint=self.use_checkpoint, use_scale_shift_norm=self.use_scale_shift_norm,
                        **kwargs)

    def transformer(self, channels: int, depth: int, disable_self_attn: bool = False) -> SpatialTransformer:
        heads, dim_head = self.heads_for(channels)
        return SpatialTransformer(channels, heads, dim_head, depth=depth,
                                  context_dim=self.context_dim, disable_self_attn=disable_self_attn,
                                  use_linear=self.use_linear_in_transformer, use_checkpoint=self.use_checkpoint)

    def self_attn_disabled(self, level: int) -> bool:
        return bool(self.disable_self_attentions[level]) if self.disable_self_attentions else False

    def has_attention(self, level: int, index: int, downsample_factor: int) -> bool:
        if downsample_factor not in self.attention_resolutions:
            return False
        return self.num_attention_blocks is None or index < self.num_attention_blocks[level]

    def time_embedding(self) -> nn.Sequential:
        return nn.Sequential(
            nn.Linear(self.model_channels, self.time_embed_dim), nn.SiLU(),
            nn.Linear(self.time_embed_dim, self.time_embed_dim),
        )

    def vector_embedding(self) -> nn.Sequential | None:
        """SDXL's `label_emb` (y -> an embedding added to the timestep's), or None for SD1.x/2.x."""
        if self.adm_in_channels is None:
            return None
        return nn.Sequential(nn.Sequential(
            nn.Linear(self.adm_in_channels, self.time_embed_dim), nn.SiLU(),
            nn.Linear(self.time_embed_dim, self.time_embed_dim),
        ))

    def build_encoder(self) -> tuple[nn.ModuleList, TimestepEmbedSequential, list[int]]:
        """Input blocks, middle block, and the channel count of every skip connection (in order)."""
        input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(self.dims, self.in_channels, self.model_channels, 3, padding=1))]
        )
        skip_channels = [self.model_channels]
        ch, ds = self.model_channels, 1
        for level, mult in enumerate(self.channel_mult):
            for index in range(self.res_blocks_per_level[level]):
                layers: list[nn.Module] = [self.res_block(ch, mult * self.model_channels)]
                ch = mult * self.model_channels
                if self.has_attention(level, index, ds):
                    layers.append(self.transformer(ch, self.depth_per_level[level], self.self_attn_disabled(level)))
                input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(self.channel_mult) - 1:
                down = (self.res_block(ch, ch, down=True) if self.resblock_updown
                        else Downsample(ch, self.conv_resample, dims=self.dims, out_channels=ch))
                input_blocks.append(TimestepEmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2
        middle_attention = (nn.Identity() if self.disable_middle_transformer
                            else self.transformer(ch, self.depth_per_level[-1], self.disable_middle_self_attn))
        middle_block = TimestepEmbedSequential(self.res_block(ch, ch), middle_attention, self.res_block(ch, ch))
        return input_blocks, middle_block, skip_channels

    def build_decoder(self, skip_channels: list[int], out_channels: int) -> tuple[nn.ModuleList, nn.Sequential]:
        """Output blocks (consuming the skips in reverse) and the final norm + conv."""
        skips = list(skip_channels)
        output_blocks = nn.ModuleList()
        ch = skip_channels[-1]
        ds = 2 ** (len(self.channel_mult) - 1)
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for index in range(self.res_blocks_per_level[level] + 1):
                layers: list[nn.Module] = [self.res_block(ch + skips.pop(), self.model_channels * mult)]
                ch = self.model_channels * mult
                if self.has_attention(level, index, ds):
                    layers.append(self.transformer(ch, self.depth_per_level[level], self.self_attn_disabled(level)))
                if level and index == self.res_blocks_per_level[level]:
                    layers.append(self.res_block(ch, ch, up=True) if self.resblock_updown
                                  else Upsample(ch, self.conv_resample, dims=self.dims, out_channels=ch))
                    ds //= 2
                output_blocks.append(TimestepEmbedSequential(*layers))
        out = nn.Sequential(
            normalization(ch), nn.SiLU(),
            zero_module(conv_nd(self.dims, self.model_channels, out_channels, 3, padding=1)),
        )
        return output_blocks, out


class EmbedsTimesteps(nn.Module):
    """The embedding every block of a UNet-shaped network takes: the timestep's, plus SDXL's vector `y`.

    Shared by the UNet and the ControlNet (both hold `time_embed` and, for SDXL, `label_emb` from the spec), so the
    two can never embed a step differently.
    """

    model_channels: int
    time_embed: nn.Module
    label_emb: nn.Module | None

    def embed(self, timesteps: torch.Tensor, y: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(dtype))
        if self.label_emb is None:
            if y is not None:
                raise InputError("this network takes no vector conditioning y (that is SDXL's): leave y unset")
            return emb
        if y is None:
            raise InputError("an SDXL network needs the vector conditioning y (pooled text and size embeddings)")
        return emb + self.label_emb(y.to(dtype))


class UNetModel(EmbedsTimesteps):
    """The denoising UNet with cross-attention to the text embedding (Stable Diffusion 1.x/2.x and SDXL).

    The constructor takes the original YAML's `params:` (or sgm's, for SDXL); `image_size` is accepted and
    unused, as there.
    """

    def __init__(self, image_size: int | None = None, *, in_channels: int, model_channels: int,
                 out_channels: int, num_res_blocks: int | Sequence[int], attention_resolutions: Sequence[int],
                 use_fp16: bool = False, use_bf16: bool = False, n_embed: int | None = None,
                 use_new_attention_order: bool = False, spatial_transformer_attn_type: str | None = None,
                 **spec_params: Any) -> None:
        super().__init__()
        if n_embed is not None:
            raise InputError("VQ-output UNets are not part of Stable Diffusion")
        self.spec = UNetEncoderSpec.from_params(in_channels=in_channels, model_channels=model_channels,
                                                num_res_blocks=num_res_blocks,
                                                attention_resolutions=attention_resolutions, **spec_params)
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.time_embed = self.spec.time_embedding()
        self.label_emb = self.spec.vector_embedding()
        self.input_blocks, self.middle_block, skip_channels = self.spec.build_encoder()
        self.output_blocks, self.out = self.spec.build_decoder(skip_channels, out_channels)

    def encode(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None,
               y: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Run the encoder and middle block: (middle output, skip features, timestep embedding)."""
        emb = self.embed(timesteps, y, x.dtype)
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        return self.middle_block(h, emb, context), skips, emb

    def decode(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor,
               context: torch.Tensor | None) -> torch.Tensor:
        for block, skip in zip(self.output_blocks, reversed(skips)):
            h = block(torch.cat([h, skip], dim=1), emb, context)
        return self.out(h)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        h, skips, emb = self.encode(x, timesteps, context, y)
        return self.decode(h, skips, emb, context)
