"""DPM-Solver++(2M): a second-order multistep ODE sampler, as a plain function beside `sample_ddim`.

Stable Diffusion is a discrete-time model: it was trained at integer timesteps with cumulative alphas
`a_t`. The solver works in the log-SNR variable of those steps,

    sigma_t = sqrt((1 - a_t) / a_t),    lambda_t = -log(sigma_t) = log(sqrt(a_t) / sqrt(1 - a_t)),

and steps between grid timesteps with the data-prediction ("++") update of Lu et al. 2022
("DPM-Solver++", Algorithm 2), written with the variance-preserving alpha_t = sqrt(a_t) and
s_t = sqrt(1 - a_t) of the latent x_t = alpha_t x_0 + s_t eps:

    h_i   = lambda_{i+1} - lambda_i
    D_i   = x0 predicted at (x_i, t_i)
    D     = D_i                                                    first step, and the last one
    D     = (1 + 1 / (2 r_i)) D_i - 1 / (2 r_i) D_{i-1},   r_i = h_{i-1} / h_i     otherwise
    x_i+1 = (s_{i+1} / s_i) x_i - alpha_{i+1} (exp(-h_i) - 1) D

The grid ends at clean data (a = 1, lambda = +inf), where the update reduces to `x = D_i`; the
multistep correction is dropped there because it has no finite limit. The first-order update is exactly
DDIM with eta = 0, which is why the two samplers share the denoiser, the parameterisations and the
callback convention.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.ddim import eps_and_x0, make_ddim_timesteps
from ldm.models.diffusion.guidance import Denoiser

DPM_GRIDS: tuple[str, ...] = ("ddim", "uniform")


@dataclass(frozen=True)
class DPMSolverSchedule:
    """Timesteps in sampling order (noisiest first), their `a_t`, and the `a` each step lands on.

    `alphas_next[-1]` is 1.0: the last step lands on clean data.
    """

    timesteps: np.ndarray
    alphas: tuple[float, ...]
    alphas_next: tuple[float, ...]

    @classmethod
    def make(cls, alphas_cumprod: torch.Tensor, num_steps: int, method: str = "ddim") -> DPMSolverSchedule:
        """`num_steps` model evaluations on a timestep grid.

        `"ddim"` is the original DDIM grid (every `T // num_steps`-th step plus one, so results line up
        with `sample_ddim`); `"uniform"` spreads the steps evenly over `[T - 1, 0]`, starting at the
        noisiest trained timestep.
        """
        cumprod = alphas_cumprod.detach().cpu().double().numpy()
        total = len(cumprod)
        if method == "ddim":
            timesteps = make_ddim_timesteps(num_steps, total)[::-1].copy()
        elif method == "uniform":
            if not 0 < num_steps <= total:
                raise ValueError(f"steps must be in [1, {total}], got {num_steps}")
            timesteps = np.round(np.linspace(total - 1, 0, num_steps)).astype(np.int64)
        else:
            raise ValueError(f"unknown DPM-Solver grid {method!r}; expected one of {DPM_GRIDS}")
        alphas = tuple(float(cumprod[t]) for t in timesteps)
        return cls(timesteps, alphas, alphas[1:] + (1.0,))

    def __len__(self) -> int:
        return len(self.timesteps)


def _log_snr(a: float) -> float:
    """lambda = -log(sigma) with sigma = sqrt((1 - a) / a); +inf on clean data."""
    return math.inf if a >= 1.0 else 0.5 * (math.log(a) - math.log1p(-a))


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, schedule: DPMSolverSchedule,
                    parameterization: str = "eps", generator: torch.Generator | None = None,
                    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
                    disable_progress: bool = True) -> torch.Tensor:
    """Solve the probability-flow ODE from noise `x` at the first grid timestep down to a clean latent.

    Deterministic: `generator` is accepted so that callers can treat every sampler alike, and is unused.
    `callback(i, x, pred_x0)` sees each step's result, as with `sample_ddim`.
    """
    del generator
    total = len(schedule)
    prev_x0: torch.Tensor | None = None
    prev_h: float | None = None
    for i in tqdm(range(total), desc="DPM++ 2M", disable=disable_progress):
        a_t, a_next = schedule.alphas[i], schedule.alphas_next[i]
        t = torch.full((x.shape[0],), int(schedule.timesteps[i]), device=x.device, dtype=torch.long)
        alpha = torch.tensor(a_t, dtype=x.dtype, device=x.device)
        _, x0 = eps_and_x0(denoiser(x, t, i / total), x, alpha, parameterization)
        h = _log_snr(a_next) - _log_snr(a_t)
        if a_next >= 1.0:
            x = x0
        else:
            d = x0
            if prev_x0 is not None and prev_h is not None:
                half_inv_r = h / (2.0 * prev_h)
                d = (1.0 + half_inv_r) * x0 - half_inv_r * prev_x0
            ratio = math.sqrt((1.0 - a_next) / (1.0 - a_t))
            x = ratio * x - math.sqrt(a_next) * math.expm1(-h) * d
        if callback is not None:
            callback(i, x, x0)
        prev_x0, prev_h = x0, h
    return x
