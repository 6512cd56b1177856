"""Convolutional encoder/decoder of Stable Diffusion's KL autoencoder (the "VAE").

Module and parameter names follow the original latent-diffusion checkpoints exactly
(`down.{i}.block.{j}.conv1`, `mid.attn_1.q`, `up.{i}.upsample.conv`, ...), so released
`first_stage_model.*` weights load without any key renaming.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import InputError

GROUP_NORM_GROUPS = 32
GROUP_NORM_EPS = 1e-6
SUPPORTED_ATTN_TYPES = ("vanilla", "vanilla-xformers")


def group_norm(in_channels: int) -> nn.GroupNorm:
    """GroupNorm as the released VAE weights expect it: 32 groups, eps 1e-6, affine."""
    return nn.GroupNorm(
        num_groups=GROUP_NORM_GROUPS, num_channels=in_channels, eps=GROUP_NORM_EPS, affine=True
    )


def cpu_conv_layout(x: torch.Tensor) -> torch.Tensor:
    """Activations in the layout the VAE's convolutions run fastest in: channels_last on the CPU.

    Why: at full image resolution oneDNN's direct convolutions are ~10% faster on channels_last inputs
    (1 thread, 256 px: encode 3.74 -> 3.20 s, decode 8.16 -> 7.38 s; the weights may stay as they are).
    On other devices the caller's layout is kept. Results are equal up to float summation order.
    """
    return x.contiguous(memory_format=torch.channels_last) if x.device.type == "cpu" else x


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """Swish / SiLU, the only activation the autoencoder uses."""
    return F.silu(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 upsampling, optionally followed by a 3x3 conv (`conv`)."""

    def __init__(self, in_channels: int, with_conv: bool = True) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.with_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """x2 downsampling: pad right/bottom by one, then a stride-2 3x3 conv without padding.

    The asymmetric padding is what the released weights were trained with; symmetric
    padding would shift every latent by half a pixel.
    """

    def __init__(self, in_channels: int, with_conv: bool = True) -> None:
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """Pre-activation residual block; `nin_shortcut` (1x1) maps channels when they change.

    The autoencoder never uses a timestep embedding, so this block has no `temb_proj`.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        out_channels: int | None = None,
        conv_shortcut: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut

        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(nonlinearity(self.norm1(x)))
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over channels, with 1x1-conv q/k/v/proj_out.

    Uses `scaled_dot_product_attention` so the fused/flash kernels keep the 64x64 mid-block
    attention of a 512px decode from materialising a 4096x4096 score matrix per image.
    """

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.norm = group_norm(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, height, width = h.shape

        def tokens(t: torch.Tensor) -> torch.Tensor:
            # [b, c, h, w] -> [b, 1 head, h*w tokens, c]
            return t.reshape(b, 1, c, height * width).transpose(2, 3)

        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        out = out.transpose(2, 3).reshape(b, c, height, width)
        return x + self.proj_out(out)


def make_attn(in_channels: int, attn_type: str = "vanilla") -> AttnBlock:
    """Build the attention block named by a config's `attn_type`.

    Both names the SD configs use map to the same SDPA block; linear attention is not supported.
    """
    if attn_type not in SUPPORTED_ATTN_TYPES:
        raise InputError(f"attn_type {attn_type!r} is not supported; use one of {SUPPORTED_ATTN_TYPES}")
    return AttnBlock(in_channels)


def _check_ch_mult(ch_mult: Sequence[int]) -> tuple[int, ...]:
    mults = tuple(int(m) for m in ch_mult)
    if not mults:
        raise InputError("ch_mult must name at least one resolution level")
    return mults


class Encoder(nn.Module):
    """Image -> latent moments. Output has 2*z_channels (mean, logvar) when `double_z`."""

    def __init__(
        self,
        *,
        ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        out_ch: int | None = None,
        attn_type: str = "vanilla",
    ) -> None:
        """`out_ch` is accepted (and unused) because configs pass one `ddconfig` to both halves."""
        super().__init__()
        del out_ch
        mults = _check_ch_mult(ch_mult)
        self.ch = ch
        self.num_resolutions = len(mults)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        curr_res = resolution
        in_ch_mult = (1, *mults)
        self.in_ch_mult = in_ch_mult
        self.down = nn.ModuleList()
        block_in = ch
        for i_level, mult in enumerate(mults):
            block_in = ch * in_ch_mult[i_level]
            block_out = ch * mult
            blocks = nn.ModuleList()
            attns = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(make_attn(block_in, attn_type))
            level = nn.Module()
            level.block = blocks
            level.attn = attns
            if i_level != self.num_resolutions - 1:
                level.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(level)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)
        self.mid.attn_1 = make_attn(block_in, attn_type)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)

        self.norm_out = group_norm(block_in)
        out_channels = 2 * z_channels if double_z else z_channels
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(cpu_conv_layout(x))
        for i_level, level in enumerate(self.down):
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = level.downsample(h)

        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(nonlinearity(self.norm_out(h))).contiguous()


class Decoder(nn.Module):
    """Latent -> image; each up level has `num_res_blocks + 1` residual blocks."""

    def __init__(
        self,
        *,
        ch: int,
        out_ch: int,
        ch_mult: Sequence[int] = (1, 2, 4, 8),
        num_res_blocks: int,
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        resamp_with_conv: bool = True,
        in_channels: int | None = None,
        resolution: int,
        z_channels: int,
        double_z: bool = True,
        give_pre_end: bool = False,
        tanh_out: bool = False,
        attn_type: str = "vanilla",
    ) -> None:
        """`in_channels`/`double_z` are accepted (and unused) because configs share one `ddconfig`."""
        super().__init__()
        del in_channels, double_z
        mults = _check_ch_mult(ch_mult)
        self.ch = ch
        self.num_resolutions = len(mults)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out

        block_in = ch * mults[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)
        self.mid.attn_1 = make_attn(block_in, attn_type)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, dropout=dropout)

        # Built from the lowest resolution upwards, but stored so that `up[i]` mirrors `down[i]`.
        levels: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            block_out = ch * mults[i_level]
            blocks = nn.ModuleList()
            attns = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attns.append(make_attn(block_in, attn_type))
            level = nn.Module()
            level.block = blocks
            level.attn = attns
            if i_level != 0:
                level.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)

        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(cpu_conv_layout(z))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))

        for i_level in reversed(range(self.num_resolutions)):
            level = self.up[i_level]
            for i_block, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i_block](h)
            if i_level != 0:
                h = level.upsample(h)

        if self.give_pre_end:
            return h.contiguous()
        h = self.conv_out(nonlinearity(self.norm_out(h))).contiguous()
        return torch.tanh(h) if self.tanh_out else h
