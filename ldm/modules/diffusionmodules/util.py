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

from ldm.errors import InputError


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
    raise InputError(f"unknown beta schedule {schedule!r}; expected linear, cosine, sqrt_linear or sqrt")


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
    """GroupNorm whose statistics are summed in float32 whatever the input dtype (half-precision sums overflow),
    returning the input's dtype as the original's GroupNorm32 does.

    PyTorch's kernels already accumulate fp16/bf16 inputs in float32, so half-precision inputs go to them as
    they are: casting the activations up and back (or letting CUDA autocast do it) costs two extra passes over
    memory and four extra kernels per norm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            with torch.autocast(x.device.type, enabled=False):
                return F.group_norm(x, self.num_groups, _cast(self.weight, x.dtype), _cast(self.bias, x.dtype),
                                    self.eps)
        return F.group_norm(x.float(), self.num_groups, _cast(self.weight, torch.float32),
                            _cast(self.bias, torch.float32), self.eps).to(x.dtype)


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def normalization(channels: int) -> nn.Module:
    return GroupNorm32(32, channels)


#: Values one output pixel reads (in_channels * kernel height * kernel width) from which a 2-D conv on the CPU
#: is computed as a matrix product: 1280 channels through a 3x3 kernel, the UNet's deepest levels.
GEMM_CONV_MIN_REDUCTION = 1280 * 3 * 3
#: Largest batch * output pixels for that path: its unfolded input (kept for the weight gradient) grows
#: with the map, and at 32x32 and beyond oneDNN's direct convolution is as fast anyway.
GEMM_CONV_MAX_PIXELS = 512


def conv2d_as_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int]) -> torch.Tensor:
    """`F.conv2d` (zero padding, one group) as im2col and one matrix product per image: same sums, other order.

    Autograd gives the backward: the input gradient through `fold`, the weight gradient as a product
    with the unfolded input.
    """
    n, _, h, w = x.shape
    out_channels, _, kh, kw = weight.shape
    h_out = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    w_out = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    columns = F.unfold(x, (kh, kw), dilation=dilation, padding=padding, stride=stride)  # [N, C*kh*kw, L]
    matrix = weight.reshape(out_channels, -1)
    if n == 1:
        out = (torch.mm(matrix, columns[0]) if bias is None
               else torch.addmm(bias.unsqueeze(1), matrix, columns[0])).unsqueeze(0)
    else:
        out = torch.matmul(matrix, columns)
        if bias is not None:
            out = out + bias.unsqueeze(1)
    return out.reshape(n, out_channels, h_out, w_out)


class Conv2d(nn.Conv2d):
    """`nn.Conv2d` that computes wide convolutions on small maps as a matrix product on the CPU.

    Why: for 1280+ input channels on maps of at most 16x16 pixels (the UNet's two deepest levels at 256
    and 512 px) oneDNN's direct convolution runs at a third of the machine's matmul speed: at 8x8, 66 ms
    forward and 257 ms forward + backward against 28 and 118 ms for im2col + GEMM (1 thread, fp32). The
    parameters, state-dict keys and results (up to float summation order) are those of `nn.Conv2d`;
    other devices, dtypes, grouped or non-zero-padded convs and channels_last inputs (whose layout the
    direct path keeps) take the usual path.
    """

    def _gemm_pays(self, x: torch.Tensor) -> bool:
        if (x.device.type != "cpu" or x.dtype != torch.float32 or self.groups != 1 or x.dim() != 4
                or self.padding_mode != "zeros" or isinstance(self.padding, str) or not x.is_contiguous()):
            return False
        kh, kw = self.kernel_size
        if self.in_channels * kh * kw < GEMM_CONV_MIN_REDUCTION:
            return False
        h_out = (x.shape[2] + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        w_out = (x.shape[3] + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        return x.shape[0] * h_out * w_out <= GEMM_CONV_MAX_PIXELS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gemm_pays(x):
            padding = tuple(self.padding)  # an int tuple here: string paddings take the direct path
            return conv2d_as_gemm(x, self.weight, self.bias, self.stride, padding, self.dilation)
        return super().forward(x)


def conv_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    if dims == 1:
        return nn.Conv1d(*args, **kwargs)
    if dims == 2:
        return Conv2d(*args, **kwargs)
    if dims == 3:
        return nn.Conv3d(*args, **kwargs)
    raise InputError(f"unsupported dimensions: {dims}")


def avg_pool_nd(dims: int, *args: Any, **kwargs: Any) -> nn.Module:
    return {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims](*args, **kwargs)


#: On the CPU, the smallest block input (in elements) whose activations are worth recomputing instead of keeping:
#: 2**22 values, 16 MiB in fp32. Below it a block keeps a few tens of MB, which CPU RAM holds easily, while
#: recomputing it costs its whole forward pass again (a quarter of an SD1.5 training step at 256 px).
CPU_CHECKPOINT_MIN_ELEMENTS = 2**22


def checkpoint(fn: Callable[..., torch.Tensor], x: torch.Tensor, *args: Any, enabled: bool,
               cpu_min_elements: int = CPU_CHECKPOINT_MIN_ELEMENTS) -> torch.Tensor:
    """Recompute `fn(x, *args)` in backward instead of storing activations, only where that pays.

    Non-reentrant checkpointing works with frozen inputs and parameters, unlike the original's custom
    function. It is skipped under `torch.no_grad` (inference, the locked encoder: nothing is stored), and on
    the CPU for inputs smaller than `cpu_min_elements`, where memory is plentiful and compute is not; GPUs
    checkpoint every enabled block, as configured. Results are the same either way.
    """
    if (enabled and torch.is_grad_enabled()
            and (x.device.type != "cpu" or x.numel() >= cpu_min_elements)):
        return torch_checkpoint(fn, x, *args, use_reentrant=False)
    return fn(x, *args)


def extract_into_tensor(values: torch.Tensor, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Gather per-timestep schedule values and shape them to broadcast over a batch of images."""
    out = values.gather(-1, t)
    return out.reshape(t.shape[0], *((1,) * (len(shape) - 1)))


def as_input_for(module: Any, x: torch.Tensor) -> torch.Tensor:
    """`x` in the dtype of `module`'s weights, so that a network held in half precision runs without autocast
    (whose per-op casts cost time at inference); under autocast, or for a non-module, `x` is returned as it is."""
    if not x.is_floating_point() or torch.is_autocast_enabled(x.device.type) or not isinstance(module, nn.Module):
        return x
    first = next(module.parameters(), None)
    return x if first is None or first.dtype == x.dtype else x.to(first.dtype)
