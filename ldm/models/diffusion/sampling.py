"""Sampling: one discretization of the trained timesteps, a denoiser, small sampler functions, and `sample(...)`.

Stable Diffusion is a discrete-time model: it was trained at integer timesteps t with `a_t = alphas_cumprod[t]`.
A sampler visits a few of them, noisiest first; `Discretization` says which, with each step's `a_t` and the
`a` it lands on. A `Denoiser` (k-diffusion style) turns a model function's output, whatever its
parameterization, into the predicted noise and clean latent at a step, so a sampler is only its update rule:

    sample_ddim        x' = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps (+ sigma z),
                       sigma = eta sqrt((1 - a') / (1 - a) (1 - a / a'))              (Song et al. 2021)
    sample_dpmpp_2m    DPM-Solver++(2M), the data-prediction multistep solver (Lu et al. 2022, Algorithm 2)

Adding a sampler is one function of `(denoiser, x, discretization, *, callback, disable_progress, ...)` and a
line in `SAMPLERS`. `sample(...)` is the entry that every caller (image logging, fidelity scoring, the
generation pipeline, `DDIMSampler`) goes through.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.guidance import ModelFunction
from ldm.models.diffusion.schedule import eps_and_x0

#: Timestep grids: `ddim` the original DDIM grid (every `T // steps`-th timestep, plus one), `quad` the original's
#: quadratic one, `uniform` `steps` timesteps spread evenly over `[T - 1, 0]`.
GRIDS: tuple[str, ...] = ("ddim", "quad", "uniform")
#: Where the last step lands: `first_timestep` on `a_0` (the original DDIM), `clean` on clean data (`a = 1`).
ENDS: tuple[str, ...] = ("first_timestep", "clean")
#: `callback(i, x, x0)` sees each step's result and its predicted clean latent.
StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


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
class Step:
    """One step of a discretization: at `timestep` (with `alpha` = its `a_t`), landing on `alpha_next`."""

    index: int
    total: int
    timestep: int
    alpha: float
    alpha_next: float

    @property
    def progress(self) -> float:
        """Fraction of sampling done before this step: 0 at the first, noisiest step."""
        return self.index / self.total


@dataclass(frozen=True)
class Discretization:
    """Timesteps in sampling order (noisiest first), their `a_t` and the `a` each step lands on, in float64."""

    timesteps: np.ndarray
    alphas: np.ndarray
    alphas_next: np.ndarray

    @classmethod
    def make(cls, alphas_cumprod: torch.Tensor, num_steps: int, grid: str = "ddim",
             end: str = "first_timestep") -> Discretization:
        """`num_steps` model evaluations on one of `GRIDS`, ending as `end` says (one of `ENDS`)."""
        cumprod = alphas_cumprod.detach().cpu().double().numpy()
        total = len(cumprod)
        if grid in ("ddim", "quad"):
            timesteps = make_ddim_timesteps(num_steps, total, "uniform" if grid == "ddim" else "quad")[::-1].copy()
        elif grid == "uniform":
            if not 0 < num_steps <= total:
                raise ValueError(f"steps must be in [1, {total}], got {num_steps}")
            timesteps = np.round(np.linspace(total - 1, 0, num_steps)).astype(np.int64)
        else:
            raise ValueError(f"unknown timestep grid {grid!r}; expected one of {', '.join(GRIDS)}")
        if end not in ENDS:
            raise ValueError(f"unknown end {end!r}; expected one of {', '.join(ENDS)}")
        alphas = cumprod[timesteps]
        last = cumprod[0] if end == "first_timestep" else 1.0
        return cls(timesteps, alphas, np.append(alphas[1:], last))

    def __len__(self) -> int:
        return len(self.timesteps)

    def __iter__(self) -> Iterator[Step]:
        total = len(self)
        for i in range(total):
            yield Step(i, total, int(self.timesteps[i]), float(self.alphas[i]), float(self.alphas_next[i]))


class Denoiser:
    """A model function as samplers need it: `denoiser(x, step) -> (predicted noise, predicted clean latent)`.

    The model function (`f(x, t, progress)`, e.g. classifier-free guidance over a network) may output eps or
    v; the conversion happens here, so samplers never see the parameterization.
    """

    def __init__(self, model_function: ModelFunction, parameterization: str = "eps") -> None:
        self.model_function = model_function
        self.parameterization = parameterization

    def __call__(self, x: torch.Tensor, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        t = torch.full((x.shape[0],), step.timestep, device=x.device, dtype=torch.long)
        output = self.model_function(x, t, step.progress)
        alpha = torch.tensor(step.alpha, dtype=x.dtype, device=x.device)
        return eps_and_x0(output, x, alpha, self.parameterization)


def ddim_sigma(alpha: float, alpha_next: float, eta: float) -> float:
    """The noise DDIM adds on a step from `alpha` to `alpha_next`: 0 for eta 0, DDPM's posterior std for eta 1."""
    return eta * math.sqrt((1 - alpha_next) / (1 - alpha) * (1 - alpha / alpha_next))


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: torch.Tensor, discretization: Discretization, *, eta: float = 0.0,
                generator: torch.Generator | None = None, temperature: float = 1.0,
                callback: StepCallback | None = None, disable_progress: bool = True) -> torch.Tensor:
    """DDIM from noise `x` at the first timestep down to the end of the discretization; eta 0 is deterministic."""
    for step in tqdm(discretization, desc="DDIM", disable=disable_progress):
        eps, x0 = denoiser(x, step)
        sigma = ddim_sigma(step.alpha, step.alpha_next, eta)
        a_next_t = torch.tensor(step.alpha_next, dtype=x.dtype, device=x.device)
        sigma_t = torch.tensor(sigma, dtype=x.dtype, device=x.device)
        x = a_next_t.sqrt() * x0 + (1.0 - a_next_t - sigma_t**2).sqrt() * eps
        if sigma > 0:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            x = x + sigma_t * temperature * noise
        if callback is not None:
            callback(step.index, x, x0)
    return x


def _log_snr(a: float) -> float:
    """lambda = -log(sigma) with sigma = sqrt((1 - a) / a); +inf on clean data."""
    return math.inf if a >= 1.0 else 0.5 * (math.log(a) - math.log1p(-a))


@torch.no_grad()
def sample_dpmpp_2m(denoiser: Denoiser, x: torch.Tensor, discretization: Discretization, *,
                    callback: StepCallback | None = None, disable_progress: bool = True) -> torch.Tensor:
    """DPM-Solver++(2M): solve the probability-flow ODE in the log-SNR `lambda` of the grid; deterministic.

    With `h_i = lambda_{i+1} - lambda_i`, `D_i` the clean latent predicted at step i and `r_i = h_{i-1} / h_i`:

        D     = D_i                                              first step, and a step onto clean data
        D     = (1 + 1 / (2 r_i)) D_i - 1 / (2 r_i) D_{i-1}      otherwise
        x_i+1 = sqrt((1 - a_{i+1}) / (1 - a_i)) x_i - sqrt(a_{i+1}) (exp(-h_i) - 1) D

    A step onto clean data (`a = 1`, lambda = +inf) is `x = D_i`: the multistep correction has no finite limit
    there. The first-order update is DDIM with eta = 0.
    """
    prev_x0: torch.Tensor | None = None
    prev_h: float | None = None
    for step in tqdm(discretization, desc="DPM++ 2M", disable=disable_progress):
        _, x0 = denoiser(x, step)
        a_t, a_next = step.alpha, step.alpha_next
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
            callback(step.index, x, x0)
        prev_x0, prev_h = x0, h
    return x


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler function, where its discretization ends by default, and whether it draws noise (eta)."""

    function: Callable[..., torch.Tensor]
    end: str
    stochastic: bool


SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec(sample_ddim, end="first_timestep", stochastic=True),
    "dpmpp_2m": SamplerSpec(sample_dpmpp_2m, end="clean", stochastic=False),
}


def sample(model_function: ModelFunction, x: torch.Tensor, *, alphas_cumprod: torch.Tensor,
           parameterization: str = "eps", sampler: str = "ddim", steps: int = 20, grid: str = "ddim",
           eta: float = 0.0, generator: torch.Generator | None = None, temperature: float = 1.0,
           callback: StepCallback | None = None, progress: bool = False) -> torch.Tensor:
    """Sample from noise `x` with a named sampler of `SAMPLERS`: the one entry every caller uses.

    `model_function(x, t, progress)` is typically `ClassifierFreeGuidance` over a conditioned network. `eta`,
    `generator` and `temperature` reach stochastic samplers only (DDIM); deterministic ones ignore them.
    """
    spec = SAMPLERS.get(sampler)
    if spec is None:
        raise ValueError(f"unknown sampler {sampler!r}; known: {', '.join(SAMPLERS)}")
    discretization = Discretization.make(alphas_cumprod, steps, grid, spec.end)
    noise_options = {"eta": eta, "generator": generator, "temperature": temperature} if spec.stochastic else {}
    return spec.function(Denoiser(model_function, parameterization), x, discretization, callback=callback,
                         disable_progress=not progress, **noise_options)
