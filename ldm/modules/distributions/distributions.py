"""The diagonal Gaussian posterior produced by the KL autoencoder's encoder."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) from encoder moments stacked as [mean, logvar] on dim 1.

    logvar is clamped to [-30, 20] so an untrained or extreme encoder cannot produce
    inf/0 variances. With `deterministic=True` the variance is zero: `sample()` returns
    the mean and `kl()`/`nll()` are zero.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False) -> None:
        if parameters.shape[1] % 2 != 0:
            raise ValueError(
                f"parameters need an even channel count (mean, logvar), got {tuple(parameters.shape)}"
            )
        self.parameters = parameters
        self.deterministic = deterministic
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        if deterministic:
            self.var = torch.zeros_like(self.mean)
            self.std = torch.zeros_like(self.mean)
        else:
            self.var = torch.exp(self.logvar)
            self.std = torch.exp(0.5 * self.logvar)

    def _event_dims(self) -> list[int]:
        return list(range(1, self.mean.ndim))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reparameterised draw `mean + std * eps`; pass a generator for reproducible latents."""
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """The most likely latent, i.e. the mean."""
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other) per batch element; `other=None` means the standard normal."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        dims = self._event_dims()
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var
            + self.var / other.var
            - 1.0
            - self.logvar
            + other.logvar,
            dim=dims,
        )

    def nll(self, sample: torch.Tensor, dims: Sequence[int] | None = None) -> torch.Tensor:
        """Negative log-likelihood of `sample`, summed over `dims` (default: all but batch)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        dims = self._event_dims() if dims is None else list(dims)
        log_two_pi = math.log(2.0 * math.pi)
        return 0.5 * torch.sum(log_two_pi + self.logvar + (sample - self.mean).pow(2) / self.var, dim=dims)
