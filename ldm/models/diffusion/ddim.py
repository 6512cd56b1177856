"""The original's DDIM entry point, `DDIMSampler(model).sample(...)`, as a thin layer over `sampling.sample`.

The original ControlNet scripts sample with it: `model.apply_model` under classifier-free guidance, DDIM on the
original's timestep grid. The arithmetic lives in `ldm.models.diffusion.sampling`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ldm.models.diffusion.guidance import ClassifierFreeGuidance, apply_model_network
from ldm.models.diffusion.sampling import Discretization, make_ddim_timesteps, sample

#: The original's `ddim_discretize` names and the grids they are.
DISCRETIZE_GRIDS = {"uniform": "ddim", "quad": "quad"}


class DDIMSampler:
    """`DDIMSampler(model).sample(steps, batch, shape, cond, ...)`: DDIM over `model.apply_model`."""

    _UNSUPPORTED = ("mask", "x0", "score_corrector", "dynamic_threshold", "ucg_schedule", "normals_sequence")

    def __init__(self, model: Any, schedule: str = "linear", **kwargs: Any) -> None:
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.ddim_timesteps: np.ndarray | None = None

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> Discretization:
        """The steps `sample` takes (`ddim_timesteps` ascending, as the original keeps them)."""
        grid = DISCRETIZE_GRIDS.get(ddim_discretize)
        if grid is None:
            raise ValueError(f"unknown DDIM discretization {ddim_discretize!r}; expected 'uniform' or 'quad'")
        self.ddim_timesteps = make_ddim_timesteps(ddim_num_steps, len(self.model.alphas_cumprod), ddim_discretize)
        return Discretization.make(self.model.alphas_cumprod, ddim_num_steps, grid)

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
        total = len(self.make_schedule(S, ddim_eta=eta, verbose=verbose))
        device = self.model.betas.device
        x = (torch.randn((batch_size, *shape), generator=generator, device=device)
             if x_T is None else x_T.to(device))
        guided = ClassifierFreeGuidance(apply_model_network(self.model), conditioning, unconditional_conditioning,
                                        unconditional_guidance_scale)
        intermediates: dict[str, list[torch.Tensor]] = {"x_inter": [x], "pred_x0": [x]}

        def on_step(i: int, x_i: torch.Tensor, pred_x0: torch.Tensor) -> None:
            index = total - 1 - i
            if index % log_every_t == 0 or index == total - 1:
                intermediates["x_inter"].append(x_i)
                intermediates["pred_x0"].append(pred_x0)
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)

        samples = sample(guided, x, alphas_cumprod=self.model.alphas_cumprod,
                         parameterization=self.model.parameterization, sampler="ddim", steps=S, eta=eta,
                         generator=generator, temperature=temperature, callback=on_step, progress=verbose)
        return samples, intermediates
