"""Normal maps from depth, the original ControlNet 1.0 "normal" (MiDaS) annotator formula."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from cldm.annotators.base import prepare_input
from cldm.annotators.depth import DepthEstimator
from cldm.control_image import rgb_to_bgr

NORMAL_BG_THRESHOLD_DEFAULT = 0.4
NORMAL_BG_THRESHOLD_RANGE = (0.0, 1.0)
NORMAL_Z = np.pi * 2.0


def normal_from_depth(depth: np.ndarray, bg_threshold: float = NORMAL_BG_THRESHOLD_DEFAULT) -> np.ndarray:
    """Normal map ``(H, W, 3)`` uint8 in the original annotator's channel order ``(x, y, z)``.

    With ``d`` the raw (inverse) depth: ``x = Sobel_x(d)``, ``y = Sobel_y(d)`` (3x3), ``z = 2*pi``;
    where the min-max normalised depth is below ``bg_threshold`` (far background) ``x = y = 0``;
    the vector is normalised and mapped by ``v * 127.5 + 127.5``. A flat region therefore reads
    (127, 127, 255). The gradients are taken on the raw depth, so their scale -- hence how tilted
    the normals look -- depends on the depth model's output range, as in the original.
    """
    d = depth.astype(np.float32)
    span = float(d.max() - d.min())
    d_norm = (d - d.min()) / span if span > 0 else np.zeros_like(d)
    x = cv2.Sobel(d, cv2.CV_32F, 1, 0, ksize=3)
    y = cv2.Sobel(d, cv2.CV_32F, 0, 1, ksize=3)
    z = np.full_like(x, NORMAL_Z)
    background = d_norm < bg_threshold
    x[background] = 0
    y[background] = 0
    normal = np.stack([x, y, z], axis=2)
    normal /= np.sqrt(np.sum(normal**2, axis=2, keepdims=True))
    return np.clip(normal * 127.5 + 127.5, 0, 255).astype(np.uint8)


class NormalEstimator:
    """Depth model + :func:`normal_from_depth`, returning the control image for the normal model.

    The ControlNet 1.0 normal model was trained on the annotator array reversed (its demo feeds
    ``detected_map[:, :, ::-1]``), so the returned RGB map is ``(z, y, x)``: flat areas are
    (255, 127, 127). Use :func:`normal_from_depth` for the ``(x, y, z)`` preview order.

    Args:
        model_dir: annotator folder; the depth model is read from its ``depth/`` subfolder.
        device: torch device (default CPU).
    """

    def __init__(self, model_dir: Path | str | None = None, device: torch.device | str | None = None) -> None:
        self.depth = DepthEstimator(model_dir, device)

    def __call__(
        self, img: np.ndarray, resolution: int = 512, bg_threshold: float = NORMAL_BG_THRESHOLD_DEFAULT
    ) -> np.ndarray:
        """Control-ready normal map (RGB uint8) at the working resolution."""
        rgb = prepare_input(img, resolution)
        return rgb_to_bgr(normal_from_depth(self.depth.predict(rgb), bg_threshold))
