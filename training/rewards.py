"""Differentiable measures of control fidelity, for the consistency reward (`cldm.control.ControlReward`).

Each is `measure(images, hints, targets) -> [B]` scores in [0, 1]: `images` the decoded one-step predictions in
[-1, 1], `hints` the control images in [0, 1], `targets` the decoded training targets in [-1, 1], all NCHW. They
are the smooth versions of what `cldm.metrics` scores held-out samples with:

- `Fill50kSoftIoU`: the demo's IoU made smooth. The true disc is filled in from the hint's outline (its pixels' mean
  position and mean distance from it give the circle); the circle's and the background's colours are the target's
  mean colours inside and outside the disc (they are the prompted colours). A pixel counts as circle with
  probability `sigmoid((d_background - d_circle) / temperature)`, `d` the mean squared colour distance.
- `EdgeSoftF1`: edge hints. Sobel edge strength of the prediction's grey levels, squashed to [0, 1], against the
  hint's edges: `2 sum(e h) / (sum(e) + sum(h))`, an F1 of soft edges.

`measure_from_name` resolves `--reward_measure`: `fill50k`, `edges`, or `package.module:Class` for one of the user's.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import InputError
from ldm.util import get_obj_from_str

EPS = 1e-6


def disc_from_outline(hints: torch.Tensor) -> torch.Tensor:
    """The filled disc (float mask [B, H, W]) of each hint's circle outline (bright pixels on black)."""
    outline = (hints.mean(dim=1) > 0.5).float()
    height, width = outline.shape[-2:]
    ys = torch.arange(height, device=hints.device, dtype=torch.float32).view(1, height, 1)
    xs = torch.arange(width, device=hints.device, dtype=torch.float32).view(1, 1, width)
    count = outline.sum(dim=(1, 2)).clamp(min=1.0)
    cy = (outline * ys).sum(dim=(1, 2)) / count
    cx = (outline * xs).sum(dim=(1, 2)) / count
    distance = ((ys - cy.view(-1, 1, 1)) ** 2 + (xs - cx.view(-1, 1, 1)) ** 2).sqrt()
    radius = (outline * distance).sum(dim=(1, 2)) / count
    return (distance <= radius.view(-1, 1, 1) + 0.5).float()


class Fill50kSoftIoU(nn.Module):
    """Soft IoU between the predicted circle (by colour) and the hint's disc; see the module docstring."""

    def __init__(self, temperature: float = 0.05) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, images: torch.Tensor, hints: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        disc = disc_from_outline(hints)
        inside = disc.unsqueeze(1)
        circle = (targets * inside).sum(dim=(2, 3)) / inside.sum(dim=(2, 3)).clamp(min=1.0)
        background = (targets * (1 - inside)).sum(dim=(2, 3)) / (1 - inside).sum(dim=(2, 3)).clamp(min=1.0)
        d_circle = ((images - circle[:, :, None, None]) ** 2).mean(dim=1)
        d_background = ((images - background[:, :, None, None]) ** 2).mean(dim=1)
        painted = torch.sigmoid((d_background - d_circle) / self.temperature)
        overlap = (painted * disc).sum(dim=(1, 2))
        return overlap / (painted.sum(dim=(1, 2)) + disc.sum(dim=(1, 2)) - overlap + EPS)


class EdgeSoftF1(nn.Module):
    """F1 of soft edges: Sobel strength of the prediction against the hint's edges; see the module docstring."""

    def __init__(self, scale: float = 0.5) -> None:
        super().__init__()
        self.scale = scale
        kernel = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]]) / 4.0
        self.register_buffer("sobel", torch.stack([kernel, kernel.t()]).unsqueeze(1), persistent=False)

    def forward(self, images: torch.Tensor, hints: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        grey = ((images + 1.0) / 2.0).mean(dim=1, keepdim=True)
        gradients = F.conv2d(grey, self.sobel.to(grey), padding=1)
        edges = torch.tanh(gradients.pow(2).sum(dim=1).add(EPS).sqrt() / self.scale)
        truth = hints.mean(dim=1)
        return 2 * (edges * truth).sum(dim=(1, 2)) / (edges.sum(dim=(1, 2)) + truth.sum(dim=(1, 2)) + EPS)


MEASURES: dict[str, Callable[[], nn.Module]] = {"fill50k": Fill50kSoftIoU, "edges": EdgeSoftF1}


def measure_from_name(name: str) -> nn.Module:
    """A measure by name (`fill50k`, `edges`) or by import path (`package.module:Class`, built without arguments)."""
    if name in MEASURES:
        return MEASURES[name]()
    if ":" not in name:
        raise InputError(f"unknown reward measure {name!r}; known: {', '.join(MEASURES)}, or package.module:Class")
    return get_obj_from_str(name.replace(":", "."))()
