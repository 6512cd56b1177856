"""The forward (noising) process of discrete-time diffusion: schedule buffers, noising, and what the network predicts.

Everything here follows from the betas. Released checkpoints carry twelve schedule buffers (`SCHEDULE_BUFFERS`),
which the model registers under the original names; `NoiseSchedule` is a view over those float32 buffers for
noising and for the training targets, and `eps_and_x0` turns a network output of any parameterization into the
predicted noise and clean latent, which is all a sampler needs. With `a_t = alphas_cumprod[t]`:

    x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps                  (noising)
    v   = sqrt(a_t) eps - sqrt(1 - a_t) x0                  (the v-prediction target)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ldm.modules.diffusionmodules.util import extract_into_tensor

#: Buffers that the original registers and released checkpoints carry; all follow from the betas.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)
PARAMETERIZATIONS = ("eps", "v", "x0")


def schedule_values(betas: np.ndarray, v_posterior: float = 0.0) -> dict[str, np.ndarray]:
    """The values of `SCHEDULE_BUFFERS`, in float64 as the original computes them (stored as float32)."""
    betas = np.asarray(betas, dtype=np.float64)
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = ((1 - v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
                          + v_posterior * betas)
    return {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    }


def lvlb_weights(values: dict[str, np.ndarray], parameterization: str) -> np.ndarray:
    """Per-timestep weights of the original's variational-bound loss term (used when `original_elbo_weight` > 0)."""
    betas, alphas_cumprod = values["betas"], values["alphas_cumprod"]
    if parameterization == "eps":
        with np.errstate(divide="ignore"):  # posterior_variance[0] is 0; weight[0] is replaced below
            weights = betas**2 / (2 * values["posterior_variance"] * (1.0 - betas) * (1 - alphas_cumprod))
    elif parameterization == "x0":
        weights = 0.5 * np.sqrt(alphas_cumprod) / (2.0 - 2.0 * alphas_cumprod)
    else:
        weights = np.ones_like(betas)
    weights[0] = weights[1]
    return weights


def standard_noise(x: torch.Tensor) -> torch.Tensor:
    """Gaussian noise shaped like `x`, drawn in the standard layout (unlike `randn_like`, which follows `x`'s
    memory format): a channels_last latent gets the same noise at each position as a contiguous one."""
    return torch.randn(x.shape, dtype=x.dtype, device=x.device)


@dataclass(frozen=True)
class NoiseSchedule:
    """Noising and targets at integer timesteps, from a model's float32 schedule buffers.

    The buffers are the ones checkpoints carry, so training noises latents with exactly the values the
    original used (each square root computed once in float64, not from the float32 `alphas_cumprod`).
    """

    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas_cumprod: torch.Tensor
    sqrt_recipm1_alphas_cumprod: torch.Tensor

    @classmethod
    def of(cls, module: Any) -> NoiseSchedule:
        """The view over the buffers `module` registered from `schedule_values`."""
        return cls(module.sqrt_alphas_cumprod, module.sqrt_one_minus_alphas_cumprod,
                   module.sqrt_recip_alphas_cumprod, module.sqrt_recipm1_alphas_cumprod)

    def _mix(self, t: torch.Tensor, *terms: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """sum of coefficient[t] * value over `(coefficient buffer, value)` terms, broadcast over each image."""
        first, *rest = (extract_into_tensor(coefficient, t, value.shape) * value for coefficient, value in terms)
        for term in rest:
            first = first + term
        return first

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps."""
        return self._mix(t, (self.sqrt_alphas_cumprod, x0), (self.sqrt_one_minus_alphas_cumprod, noise))

    def v_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(a_t) eps - sqrt(1 - a_t) x0."""
        return self._mix(t, (self.sqrt_alphas_cumprod, noise), (self.sqrt_one_minus_alphas_cumprod, -x0))

    def target(self, parameterization: str, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What a network of this parameterization is trained to output."""
        if parameterization == "eps":
            return noise
        if parameterization == "v":
            return self.v_target(x0, noise, t)
        return x0

    def x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._mix(t, (self.sqrt_alphas_cumprod, x_t), (self.sqrt_one_minus_alphas_cumprod, -v))

    def eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._mix(t, (self.sqrt_alphas_cumprod, v), (self.sqrt_one_minus_alphas_cumprod, x_t))

    def x0_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self._mix(t, (self.sqrt_recip_alphas_cumprod, x_t), (self.sqrt_recipm1_alphas_cumprod, -eps))


def eps_and_x0(model_output: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor, parameterization: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted noise and clean latent at `a_t = alpha` from a network output of either sampling parameterization."""
    sqrt_alpha, sqrt_one_minus = alpha.sqrt(), (1 - alpha).sqrt()
    if parameterization == "v":
        return sqrt_alpha * model_output + sqrt_one_minus * x, sqrt_alpha * x - sqrt_one_minus * model_output
    if parameterization == "eps":
        return model_output, (x - sqrt_one_minus * model_output) / sqrt_alpha
    raise ValueError(f"sampling supports eps and v parameterisations, not {parameterization!r}")
