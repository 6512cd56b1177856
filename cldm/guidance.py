"""Control-aware denoisers: guidance windows, weights, guess mode, control modes and Multi-ControlNet.

Three small objects, each doing one thing:

- `Control`: one ControlNet with its hint and its web-UI settings. It decides, per step, whether it runs
  and with which scale for each of the 13 residuals (`n` in general), and on which rows of the batch.
- `ControlledUNet`: the UNet plus any number of `Control`s; the residuals of all active controls are summed
  elementwise and added once, which is how Multi-ControlNet combines models.
- `ControlledCFG`: classifier-free guidance as a `Denoiser` (`denoiser(x, t, progress)`), running the
  unconditional and conditional halves in one batched forward pass.

Residual scales, with `w` the unit's weight, `n` residuals (13 for SD) and residual `i` counted from the
first skip connection (`i = n - 1` is the middle block):

    balanced                         w                      both branches
    prompt  ("My prompt is more      w * 0.825 ** (n-1-i)   both branches
            important")
    controlnet ("ControlNet is more  w * 0.825 ** (n-1-i)   conditional branch only
            important")
    guess_mode (the original's)      w * 0.825 ** (n-1-i)   conditional branch only

"Conditional branch only" means the unconditional half of a CFG batch gets no residuals from that control
(zeros, which add exactly nothing), so guidance pushes towards the control as well as the prompt. Guess
mode and "controlnet" give the same residuals; `guess_mode` wins over `control_mode` when both are set. The
original's guess mode is meant to be used with an empty prompt, which is the caller's choice here.

A control runs iff `guidance_start <= progress < guidance_end` and `weight != 0`, where progress is `i / N`
at step `i` of `N` (0 at the first, noisiest step). Outside its window the ControlNet is not evaluated at
all, and with no control active the UNet runs with `control=None`, so the output is exactly the plain
model's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from cldm.cldm import guess_mode_scales
from ldm.models.diffusion.ddpm import as_input_for
from ldm.models.diffusion.guidance import combine_guidance

ControlMode = Literal["balanced", "prompt", "controlnet"]
CONTROL_MODES: tuple[str, ...] = ("balanced", "prompt", "controlnet")

#: `unet(x, timesteps=t, context=c, control=residuals_or_None) -> model output`.
UNet = Callable[..., torch.Tensor]
#: `control_net(x=x, hint=h, timesteps=t, context=c) -> list of residuals`.
ControlNetModule = Callable[..., list[torch.Tensor]]


def _tile(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """Repeat a per-image tensor (hint) to a batch that is a whole multiple of it (e.g. both CFG halves)."""
    if tensor.shape[0] == batch:
        return tensor
    if batch % tensor.shape[0]:
        raise ValueError(f"a hint of batch {tensor.shape[0]} cannot be repeated to a batch of {batch}")
    return tensor.repeat(batch // tensor.shape[0], *([1] * (tensor.dim() - 1)))


@dataclass(frozen=True)
class Control:
    """One ControlNet applied with its hint (float in [0, 1], NCHW) and web-UI settings."""

    net: ControlNetModule
    hint: torch.Tensor
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    control_mode: ControlMode = "balanced"
    guess_mode: bool = False

    def __post_init__(self) -> None:
        if self.control_mode not in CONTROL_MODES:
            raise ValueError(f"unknown control mode {self.control_mode!r}; expected one of {CONTROL_MODES}")

    def is_active(self, progress: float) -> bool:
        return self.weight != 0 and self.guidance_start <= progress < self.guidance_end

    @property
    def conditional_only(self) -> bool:
        """Whether the unconditional branch of CFG gets no residuals from this control."""
        return self.guess_mode or self.control_mode == "controlnet"

    def scales(self, n: int) -> list[float]:
        """Per-residual multipliers: the plain weight, or the soft decay of guess mode and the two modes."""
        if self.guess_mode or self.control_mode != "balanced":
            return guess_mode_scales(n, self.weight)
        return [float(self.weight)] * n

    def residuals(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                  conditional: torch.Tensor) -> list[torch.Tensor] | None:
        """Scaled residuals for the whole batch, or None when this control adds nothing to it.

        `conditional[k]` says whether row k carries the prompt; a conditional-only control runs its
        network on those rows alone and leaves zeros in the others.
        """
        rows = conditional if self.conditional_only else torch.ones_like(conditional)
        if not bool(rows.any()):
            return None
        hint = _tile(self.hint.to(device=x.device, dtype=x.dtype), x.shape[0])
        everyone = bool(rows.all())
        picked = (x, hint, t, context) if everyone else (x[rows], hint[rows], t[rows], context[rows])
        raw = self.net(x=picked[0], hint=picked[1], timesteps=picked[2], context=picked[3])
        scaled = [r * s for r, s in zip(raw, self.scales(len(raw)))]
        if everyone:
            return scaled
        full = []
        for r in scaled:
            padded = r.new_zeros((x.shape[0], *r.shape[1:]))
            padded[rows] = r
            full.append(padded)
        return full


class ControlledUNet:
    """The UNet with the summed residuals of every control active at this step.

    Called as `(x, t, context, conditional, progress)`; `conditional` is a bool per row (see
    `Control.residuals`).
    """

    def __init__(self, unet: UNet, controls: Sequence[Control] = (), only_mid_control: bool = False) -> None:
        self.unet = unet
        self.controls = tuple(controls)
        self.only_mid_control = only_mid_control

    def residuals(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, conditional: torch.Tensor,
                  progress: float) -> list[torch.Tensor] | None:
        total: list[torch.Tensor] | None = None
        for control in self.controls:
            if not control.is_active(progress):
                continue
            residuals = control.residuals(x, t, context, conditional)
            if residuals is None:
                continue
            total = residuals if total is None else [a + b for a, b in zip(total, residuals)]
        return total

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, conditional: torch.Tensor,
                 progress: float) -> torch.Tensor:
        sampler_dtype = x.dtype
        x, context = as_input_for(self.unet, x), as_input_for(self.unet, context)  # half-precision networks
        control = self.residuals(x, t, context, conditional, progress)
        extra: dict[str, Any] = {"only_mid_control": True} if self.only_mid_control and control else {}
        return self.unet(x, timesteps=t, context=context, control=control, **extra).to(sampler_dtype)


class ControlledCFG:
    """`uncond + scale * (cond - uncond)` over a `ControlledUNet`, as a `Denoiser`.

    Both halves go through one forward pass (batch `[uncond; cond]`) unless `batched=False`; with
    `scale == 1` or no unconditional context only the conditional half runs. `cond`/`uncond` are text
    contexts with the same batch as `x`.
    """

    def __init__(self, model: ControlledUNet, cond: torch.Tensor, uncond: torch.Tensor | None = None,
                 scale: float = 1.0, batched: bool = True) -> None:
        self.model = model
        self.cond = cond
        self.uncond = uncond
        self.scale = scale
        self.batched = batched

    def __call__(self, x: torch.Tensor, t: torch.Tensor, progress: float = 0.0) -> torch.Tensor:
        n = x.shape[0]
        yes = torch.ones(n, dtype=torch.bool, device=x.device)
        if self.uncond is None or self.scale == 1.0:
            return self.model(x, t, self.cond, yes, progress)
        if self.batched:
            mask = torch.cat([~yes, yes])
            both = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([self.uncond, self.cond]), mask,
                              progress)
            out_uncond, out_cond = both.chunk(2)
        else:
            out_uncond = self.model(x, t, self.uncond, ~yes, progress)
            out_cond = self.model(x, t, self.cond, yes, progress)
        return combine_guidance(out_uncond, out_cond, self.scale)
