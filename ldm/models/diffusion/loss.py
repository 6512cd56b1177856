"""The training objective: how far the network's output is from its target, per sample, then averaged.

`DiffusionLoss` is the original's `l_simple_weight * loss_simple + original_elbo_weight * loss_vlb`, where
`loss_simple` is the mean over samples of the per-element L1 or L2 error (each sample averaged over its own
elements first), and `loss_vlb` weights each sample's error by the variational-bound weight of its timestep.
The original SD and ControlNet configs train with `loss_simple` alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ldm.errors import InputError

LOSS_TYPES = ("l1", "l2")


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
                 prefix: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, logs) for network outputs `pred` at timesteps `t`; logs are named `<prefix>/loss...`."""
        per_sample = self.elementwise(pred.float(), target.float()).mean(dim=tuple(range(1, pred.dim())))
        loss_simple = per_sample.mean()
        loss = self.l_simple_weight * loss_simple
        logs = {f"{prefix}/loss_simple": loss_simple.detach()}
        if self.original_elbo_weight:
            loss_vlb = (lvlb_weights[t] * per_sample).mean()
            loss = loss + self.original_elbo_weight * loss_vlb
            logs[f"{prefix}/loss_vlb"] = loss_vlb.detach()
        logs[f"{prefix}/loss"] = loss.detach()
        return loss, logs
