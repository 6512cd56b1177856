"""Depth maps from transformers depth-estimation models (DPT/MiDaS, Depth Anything, ...).

The weights are a transformers-format folder, ``<annotator dir>/depth/`` with ``config.json``,
``model.safetensors`` (or ``pytorch_model.bin``) and ``preprocessor_config.json`` -- for example a
local copy of ``Intel/dpt-hybrid-midas`` (the same MiDaS DPT-Hybrid the original annotator uses,
converted) or a Depth Anything checkpoint. The original ``dpt_hybrid-midas-501f0c75.pt`` (a timm
state dict) is not read: convert it to that folder format first. Nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cldm.annotators.base import annotator_dir, as_device, prepare_input, require_hf_folder

DEPTH_SUBFOLDER = "depth"


def normalize_to_uint8(depth: np.ndarray) -> np.ndarray:
    """Min-max scale to [0, 255] uint8, as the original MiDaS map (a constant map gives zeros)."""
    d = depth.astype(np.float64)
    d = d - d.min()
    peak = d.max()
    if peak > 0:
        d = d / peak
    return np.clip(d * 255.0, 0, 255).astype(np.uint8)


class DepthEstimator:
    """Relative (inverse) depth from a local transformers model; near is bright.

    Args:
        model_dir: annotator folder (default ``<repo>/models/annotators``); the model is read from
            its ``depth/`` subfolder.
        device: torch device (default CPU).
    """

    def __init__(self, model_dir: Path | str | None = None, device: torch.device | str | None = None) -> None:
        self.folder = annotator_dir(model_dir) / DEPTH_SUBFOLDER
        self.device = as_device(device)
        self._model: Any = None
        self._processor: Any = None

    def _load(self) -> tuple[Any, Any]:
        if self._model is None:
            from transformers import AutoImageProcessor, AutoModelForDepthEstimation

            require_hf_folder(self.folder, "transformers depth-estimation model")
            self._processor = AutoImageProcessor.from_pretrained(self.folder, local_files_only=True)
            model = AutoModelForDepthEstimation.from_pretrained(self.folder, local_files_only=True)
            self._model = model.eval().to(self.device)
        return self._model, self._processor

    def predict(self, img_rgb: np.ndarray) -> np.ndarray:
        """The model's raw prediction ``(H, W)`` float32, bicubically resized to the input size."""
        model, processor = self._load()
        inputs = processor(images=img_rgb, return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, dtype=next(model.parameters()).dtype)
        with torch.inference_mode():
            pred = model(pixel_values=pixels).predicted_depth
        size = img_rgb.shape[:2]
        pred = F.interpolate(pred[:, None].float(), size=size, mode="bicubic", align_corners=False)
        return pred[0, 0].cpu().numpy()

    def __call__(self, img: np.ndarray, resolution: int = 512) -> np.ndarray:
        """Depth map (RGB uint8, gray) at the working resolution."""
        rgb = prepare_input(img, resolution)
        gray = normalize_to_uint8(self.predict(rgb))
        return np.repeat(gray[:, :, None], 3, axis=2)
