"""DDIM sampling: the original's timestep schedule, a plain sampling function, and `DDIMSampler`.

`sample_ddim` is a function of (denoiser, starting noise, schedule): no state, progress bar and callbacks as
arguments. `DDIMSampler` keeps the original's public `sample(...)` signature on top of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.guidance import ClassifierFreeGuidance, Denoiser


def make_ddim_timesteps(num_ddim_steps: int, num_train_steps: int = 1000, method: str = "uniform") -> np.ndarray:
    """The original's DDIM timesteps, ascending: every `num_train_steps // num_ddim_steps`-th step, plus one.

    As in the original, a step count that does not divide the training steps gives a few extra steps
    (30 of 1000 gives 31), kept so that results match the original code. Where the original's last step
    would be `num_train_steps` itself (3, 9, 27, 101-111, ... steps), which it cannot index and crashes on,
    that step is dropped.
    """
    if not 0 < num_ddim_steps <= num_train_steps:
        raise ValueError(f"steps must be in [1, {num_train_steps}], got {num_ddim_steps}")
    if method == "uniform":
        steps = np.arange(0, num_train_steps, num_train_steps // num_ddim_steps)
    elif method == "quad":
        steps = (np.linspace(0, np.sqrt(num_train_steps * 0.8), num_ddim_steps) ** 2).astype(int)
    else:
        raise ValueError(f"unknown DDIM discretization {method!r}; expected 'uniform' or 'quad'")
    steps = steps + 1
    return steps[steps < num_train_steps]


@dataclass(frozen=True)
class DDIMSchedule:
    """Per-step values, in sampling order's reverse (ascending timesteps) like the original's buffers."""

    timesteps: np.ndarray
    alphas: torch.Tensor
    alphas_prev: torch.Tensor
    sigmas: torch.Tensor

    @classmethod
    def make(cls, alphas_cumprod: torch.Tensor, num_steps: int, eta: float = 0.0,
             method: str = "uniform") -> DDIMSchedule:
        timesteps = make_ddim_timesteps(num_steps, len(alphas_cumprod), method)
        cumprod = alphas_cumprod.detach().float().cpu().double()
        alphas = cumprod[timesteps]
        alphas_prev = torch.cat([cumprod[:1], cumprod[timesteps[:-1]]])
        sigmas = eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))
        return cls(timesteps, alphas.float(), alphas_prev.float(), sigmas.float())

    def __len__(self) -> int:
        return len(self.timesteps)


def eps_and_x0(model_output: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, parameterization: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted noise and clean latent from a model output of either parameterisation."""
    sqrt_alpha, sqrt_one_minus = alpha.sqrt(), (1 - alpha).sqrt()
    if parameterization == "v":
        return sqrt_alpha * model_output + sqrt_one_minus * x, sqrt_alpha * x - sqrt_one_minus * model_output
    if parameterization == "eps":
        return model_output, (x - sqrt_one_minus * model_output) / sqrt_alpha
    raise ValueError(f"DDIM supports eps and v parameterisations, not {parameterization!r}")


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: torch.Tensor, schedule: DDIMSchedule, parameterization: str = "eps",
                generator: torch.Generator | None = None, temperature: float = 1.0,
                callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                disable_progress: bool = True) -> torch.Tensor:
    """Run DDIM from noise `x` at the last timestep down to a clean latent.

    `callback(i, x, pred_x0)` sees each step's result.
    """
    total = len(schedule)
    for i in tqdm(range(total), desc="DDIM", disable=disable_progress):
        index = total - 1 - i
        t = torch.full((x.shape[0],), int(schedule.timesteps[index]), device=x.device, dtype=torch.long)
        a_t, a_prev, sigma = (v[index].to(x.device) for v in (schedule.alphas, schedule.alphas_prev,
                                                                 schedule.sigmas))
        e_t, pred_x0 = eps_and_x0(denoiser(x, t, i / total), x, a_t, parameterization)
        x = a_prev.sqrt() * pred_x0 + (1.0 - a_prev - sigma**2).sqrt() * e_t
        if sigma > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + sigma * temperature * noise
        if callback is not None:
            callback(i, x, pred_x0)
    return x


class DDIMSampler:
    """The original's DDIM entry point: `DDIMSampler(model).sample(steps, batch, shape, cond, ...)`."""

    _UNSUPPORTED = ("mask", "x0", "score_corrector", "dynamic_threshold", "ucg_schedule", "normals_sequence")

    def __init__(self, model: Any, schedule: str = "linear", **kwargs: Any) -> None:
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule: DDIMSchedule | None = None

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> DDIMSchedule:
        self.schedule = DDIMSchedule.make(self.model.alphas_cumprod, ddim_num_steps, ddim_eta, ddim_discretize)
        self.ddim_timesteps = self.schedule.timesteps
        return self.schedule

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: tuple[int, ...] | torch.Size, conditioning: Any = None,
               callback: Callable[[int], None] | None = None,
               img_callback: Callable[[torch.Tensor, int], None] | None = None, eta: float = 0.0,
               temperature: float = 1.0, verbose: bool = True, x_T: torch.Tensor | None = None,
               log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, generator: torch.Generator | None = None,
               quantize_x0: bool = False, noise_dropout: float = 0.0, corrector_kwargs: Any = None,
               **kwargs: Any) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Sample `batch_size` latents of `shape` (C, H, W); returns (samples, intermediates)."""
        unsupported = [k for k in self._UNSUPPORTED if kwargs.get(k) is not None]
        if unsupported or quantize_x0 or noise_dropout or kwargs.keys() - set(self._UNSUPPORTED):
            raise ValueError(f"DDIMSampler.sample does not support: {unsupported or sorted(kwargs)}")
        schedule = self.make_schedule(S, ddim_eta=eta, verbose=verbose)
        device = self.model.betas.device
        x = (torch.randn((batch_size, *shape), generator=generator, device=device)
             if x_T is None else x_T.to(device))
        denoiser = ClassifierFreeGuidance(self.model, conditioning, unconditional_conditioning,
                                          unconditional_guidance_scale)
        intermediates: dict[str, list[torch.Tensor]] = {"x_inter": [x], "pred_x0": [x]}
        total = len(schedule)

        def on_step(i: int, x_i: torch.Tensor, pred_x0: torch.Tensor) -> None:
            index = total - 1 - i
            if index % log_every_t == 0 or index == total - 1:
                intermediates["x_inter"].append(x_i)
                intermediates["pred_x0"].append(pred_x0)
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)

        samples = sample_ddim(denoiser, x, schedule, self.model.parameterization, generator=generator,
                              temperature=temperature, callback=on_step, disable_progress=not verbose)
        return samples, intermediates
