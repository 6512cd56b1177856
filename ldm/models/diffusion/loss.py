"""The training objective: which timesteps a step trains on, with which noise, and how far the network's output is
from its target.

`DiffusionLoss` is the original's `l_simple_weight * loss_simple + original_elbo_weight * loss_vlb`, where
`loss_simple` is the mean over samples of the per-element L1 or L2 error (each sample averaged over its own
elements first), and `loss_vlb` weights each sample's error by the variational-bound weight of its timestep.
The original SD and ControlNet configs train with `loss_simple` alone. `TrainingRecipe` holds the options that
change what a step sees (all off by default, which is the original's objective exactly):

    timestep sampling   uniform       t ~ U{0, ..., T-1}                                   (the original)
                        cubic         t = floor((1 - u^3) T), u ~ U[0, 1)                  (T2I-Adapter: noisier t)
                        logit_normal  t = floor(sigmoid(n) T), n ~ N(mean, std^2)          (SD3)
    Min-SNR weighting   w_t = min(SNR_t, gamma) / SNR_t        for eps,                  (Hang et al. 2023)
                        w_t = min(SNR_t, gamma) / (SNR_t + 1)  for v,   SNR_t = a_t / (1 - a_t)
    offset noise        eps = z + s * z_c, z_c ~ N(0, 1) one value per image and channel
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ldm.errors import InputError
from ldm.models.diffusion.schedule import standard_noise

LOSS_TYPES = ("l1", "l2")
TIMESTEP_SAMPLINGS = ("uniform", "cubic", "logit_normal")


@dataclass(frozen=True)
class TrainingRecipe:
    """What a training step sees besides the data: timestep distribution, loss weighting, noise offset."""

    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0

    def __post_init__(self) -> None:
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise InputError(f"timestep sampling must be one of {', '.join(TIMESTEP_SAMPLINGS)}, "
                             f"got {self.timestep_sampling!r}")
        if self.logit_std <= 0 or (self.min_snr_gamma is not None and self.min_snr_gamma <= 0) \
                or self.noise_offset < 0:
            raise InputError("logit_std and min_snr_gamma must be positive, noise_offset not negative")

    def timesteps(self, batch: int, total: int, device: torch.device) -> torch.Tensor:
        """The step's timesteps, drawn from the global RNG (uniform draws exactly as the original does)."""
        if self.timestep_sampling == "uniform":
            return torch.randint(0, total, (batch,), device=device).long()
        if self.timestep_sampling == "cubic":
            fraction = 1.0 - torch.rand(batch, device=device) ** 3
        else:
            fraction = torch.sigmoid(torch.randn(batch, device=device) * self.logit_std + self.logit_mean)
        return (fraction * total).long().clamp(0, total - 1)

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        """The noise to train on: standard Gaussian, plus the offset's per-image, per-channel constant."""
        noise = standard_noise(x)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn((*x.shape[:2], *([1] * (x.dim() - 2))), dtype=x.dtype,
                                                            device=x.device)
        return noise

    def weights(self, alphas_cumprod: torch.Tensor, t: torch.Tensor, parameterization: str) -> torch.Tensor | None:
        """Min-SNR's per-sample loss weights, or None without it."""
        if self.min_snr_gamma is None:
            return None
        a = alphas_cumprod[t].double()
        snr = a / (1.0 - a)
        clipped = snr.clamp(max=self.min_snr_gamma)
        return (clipped / (snr + 1.0) if parameterization == "v" else clipped / snr).float()


class DiffusionLoss:
    """The loss of one batch, and what to log of it."""

    def __init__(self, loss_type: str = "l2", l_simple_weight: float = 1.0, original_elbo_weight: float = 0.0
                 ) -> None:
        if loss_type not in LOSS_TYPES:
            raise InputError(f"loss_type must be 'l1' or 'l2', got {loss_type!r}")
        self.loss_type = loss_type
        self.l_simple_weight = l_simple_weight
        self.original_elbo_weight = original_elbo_weight

    def elementwise(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-element loss (not reduced)."""
        if self.loss_type == "l1":
            return (target - pred).abs()
        return F.mse_loss(pred, target, reduction="none")

    def __call__(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor, lvlb_weights: torch.Tensor,
                 prefix: str, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, logs) for network outputs `pred` at timesteps `t`, each sample's error times `weights` if given
        (Min-SNR); logs are named `<prefix>/loss...`."""
        per_sample = self.elementwise(pred.float(), target.float()).mean(dim=tuple(range(1, pred.dim())))
        if weights is not None:
            per_sample = per_sample * weights.to(per_sample.device)
        loss_simple = per_sample.mean()
        loss = self.l_simple_weight * loss_simple
        logs = {f"{prefix}/loss_simple": loss_simple.detach()}
        if self.original_elbo_weight:
            loss_vlb = (lvlb_weights[t] * per_sample).mean()
            loss = loss + self.original_elbo_weight * loss_vlb
            logs[f"{prefix}/loss_vlb"] = loss_vlb.detach()
        logs[f"{prefix}/loss"] = loss.detach()
        return loss, logs
