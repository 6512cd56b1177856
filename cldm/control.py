"""How control reaches the UNet: one ControlNet with its settings (`Control`), and the UNet with any number of them.

`UNetWithControls` is the one path from (UNet, controls, conditioning) to a model output. Training
(`ControlLDM.apply_model` in the loss), the original's `DDIMSampler`, image logging, fidelity scoring and the
generation pipeline all run the UNet through it, so `control_scales`, `only_mid_control`, guess mode and every
unit setting mean the same everywhere. It is a conditioned network in the sense of
`ldm.models.diffusion.guidance`: `net(x, t, context, conditional=..., progress=...)`.

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

The residuals of all active controls are summed elementwise (Multi-ControlNet), then multiplied by the model's
`control_scales` (the original's per-residual knob; all ones unless a script sets it).

A control runs iff `guidance_start <= progress < guidance_end` and `weight != 0`, where progress is `i / N`
at step `i` of `N` (0 at the first, noisiest step). Outside its window the ControlNet is not evaluated at
all, and with no control active the UNet runs with `control=None`, so the output is exactly the plain
model's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ldm.models.diffusion.conditioning import Context, map_context, rows_of, unet_inputs
from ldm.models.diffusion.guidance import Rows
from ldm.modules.diffusionmodules.util import as_input_for

ControlMode = Literal["balanced", "prompt", "controlnet"]
CONTROL_MODES: tuple[str, ...] = ("balanced", "prompt", "controlnet")
#: Residual i of n in guess mode is scaled by GUESS_MODE_DECAY ** (n - 1 - i): coarse features count most.
GUESS_MODE_DECAY = 0.825

#: `unet(x, timesteps=t, context=c, y=vector_or_None, control=residuals_or_None) -> model output`.
UNet = Callable[..., torch.Tensor]
#: `control_net(x=x, hint=h, timesteps=t, context=c, y=vector_or_None) -> list of residuals`.
ControlNetModule = Callable[..., list[torch.Tensor]]


def guess_mode_scales(n: int = 13, strength: float = 1.0) -> list[float]:
    """The original's guess-mode ("soft") control scales: `strength * 0.825 ** (12 - i)` for SD's 13."""
    return [strength * GUESS_MODE_DECAY ** float(n - 1 - i) for i in range(n)]


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

    def residuals(self, x: torch.Tensor, t: torch.Tensor, context: Context,
                  conditional: Rows = True) -> list[torch.Tensor] | None:
        """Scaled residuals for the whole batch, or None when this control adds nothing to it.

        `conditional` says which rows carry the prompt (see `ldm.models.diffusion.guidance`); a
        conditional-only control runs its network on those rows alone and leaves zeros in the others.
        """
        rows = conditional if self.conditional_only else True
        if isinstance(rows, torch.Tensor) and bool(rows.all()):
            rows = True
        if rows is False or (isinstance(rows, torch.Tensor) and not bool(rows.any())):
            return None
        x, context = as_input_for(self.net, x), map_context(context, lambda c: as_input_for(self.net, c))
        hint = _tile(as_input_for(self.net, self.hint.to(device=x.device, dtype=x.dtype)), x.shape[0])
        if rows is not True:
            x, hint, t, context = x[rows], hint[rows], t[rows], rows_of(context, rows)
        crossattn, vector = unet_inputs(context)
        raw = self.net(x=x, hint=hint, timesteps=t, context=crossattn, **({} if vector is None else {"y": vector}))
        scaled = [r * s for r, s in zip(raw, self.scales(len(raw)))]
        if rows is True:
            return scaled
        full = []
        for r in scaled:
            padded = r.new_zeros((rows.shape[0], *r.shape[1:]))
            padded[rows] = r
            full.append(padded)
        return full


@dataclass(frozen=True)
class ControlReward:
    """A ControlNet++-style consistency reward: at timesteps below `max_timestep`, the clean image predicted in one
    step from the noised target is decoded and scored against the hint by `measure`; `weight * (1 - score)` joins
    the loss, and its gradient reaches the ControlNet (the locked UNet and the VAE take none).

    `measure(images, hints, targets) -> [B] scores in [0, 1]` gets the decoded predictions in [-1, 1], the hints in
    [0, 1] and the decoded targets in [-1, 1] (NCHW); it must be differentiable in `images`.
    """

    measure: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    weight: float = 1.0
    max_timestep: int = 200


class UNetWithControls:
    """The UNet with the summed residuals of every control active at a step: a conditioned network.

    `residual_scales` multiplies residual i of the sum (the model's `control_scales`); `autocast` is entered
    around the whole call (the model's frozen-weight autocast, for parts held in another dtype). The output has
    the dtype of `x` (the sampler's), whatever dtype the networks run in.
    """

    def __init__(self, unet: UNet, controls: Sequence[Control] = (), *, only_mid_control: bool = False,
                 residual_scales: Sequence[float] | None = None,
                 autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext) -> None:
        self.unet = unet
        self.controls = tuple(controls)
        self.only_mid_control = only_mid_control
        self.residual_scales = (None if residual_scales is None or all(s == 1.0 for s in residual_scales)
                                else tuple(residual_scales))
        self.autocast = autocast

    def residuals(self, x: torch.Tensor, t: torch.Tensor, context: Context, conditional: Rows = True,
                  progress: float = 0.0) -> list[torch.Tensor] | None:
        total: list[torch.Tensor] | None = None
        for control in self.controls:
            if not control.is_active(progress):
                continue
            residuals = control.residuals(x, t, context, conditional)
            if residuals is None:
                continue
            total = residuals if total is None else [a + b for a, b in zip(total, residuals)]
        if total is not None and self.residual_scales is not None:
            total = [r * s for r, s in zip(total, self.residual_scales)]
        return total

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: Context, conditional: Rows = True,
                 progress: float = 0.0) -> torch.Tensor:
        with self.autocast():
            control = self.residuals(x, t, context, conditional, progress)
            extra: dict[str, Any] = {"only_mid_control": True} if self.only_mid_control and control else {}
            crossattn, vector = unet_inputs(map_context(context, lambda c: as_input_for(self.unet, c)))
            if vector is not None:
                extra["y"] = vector
            out = self.unet(as_input_for(self.unet, x), timesteps=t, context=crossattn, control=control, **extra)
        return out.to(x.dtype)
