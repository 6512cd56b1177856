"""Semantic segmentation maps in the ADE20K colours the ControlNet seg model was trained on.

The model is a transformers semantic-segmentation folder, ``<annotator dir>/seg/`` with
``config.json``, ``model.safetensors`` (or ``pytorch_model.bin``) and ``preprocessor_config.json``
-- e.g. a local copy of an ADE20K UperNet or SegFormer. The original annotator's UniFormer/OneFormer
checkpoints are not read. Labels are coloured with the 150-class ADE20K palette by class index, so
the model must predict ADE20K ids for the colours to mean what the ControlNet expects.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cldm.annotators.base import annotator_dir, as_device, prepare_input, require_hf_folder

SEG_SUBFOLDER = "seg"

# ADE20K palette (RGB), class index 0 = wall ... 149 = flag, as used by mmseg and the annotator
_ADE20K_RGB: tuple[tuple[int, int, int], ...] = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
        (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
        (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
        (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
        (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
        (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
        (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
        (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
        (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
        (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
        (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
        (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
        (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
        (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
        (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
        (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
        (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
        (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
        (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
        (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
        (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
        (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
        (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
        (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
        (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)  # fmt: skip
ADE20K_PALETTE = np.array(_ADE20K_RGB, dtype=np.uint8)


def colorize_ade20k(labels: np.ndarray) -> np.ndarray:
    """RGB uint8 map for integer class ids (ids beyond 149 wrap around the palette)."""
    ids = np.asarray(labels).astype(np.int64) % len(ADE20K_PALETTE)
    return ADE20K_PALETTE[ids]


class Segmenter:
    """ADE20K-coloured segmentation from a local transformers model.

    Args:
        model_dir: annotator folder (default ``<repo>/models/annotators``); the model is read from
            its ``seg/`` subfolder.
        device: torch device (default CPU).
    """

    def __init__(self, model_dir: Path | str | None = None, device: torch.device | str | None = None) -> None:
        self.folder = annotator_dir(model_dir) / SEG_SUBFOLDER
        self.device = as_device(device)
        self._model: Any = None
        self._processor: Any = None

    def _load(self) -> tuple[Any, Any]:
        if self._model is None:
            from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

            require_hf_folder(self.folder, "transformers semantic-segmentation model")
            self._processor = AutoImageProcessor.from_pretrained(self.folder, local_files_only=True)
            model = AutoModelForSemanticSegmentation.from_pretrained(self.folder, local_files_only=True)
            self._model = model.eval().to(self.device)
        return self._model, self._processor

    def labels(self, img_rgb: np.ndarray) -> np.ndarray:
        """Per-pixel class ids ``(H, W)`` int64 at the input size (logits upsampled bilinearly)."""
        model, processor = self._load()
        inputs = processor(images=img_rgb, return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, dtype=next(model.parameters()).dtype)
        with torch.inference_mode():
            logits = model(pixel_values=pixels).logits
        logits = F.interpolate(logits.float(), size=img_rgb.shape[:2], mode="bilinear", align_corners=False)
        return logits[0].argmax(dim=0).cpu().numpy()

    def __call__(self, img: np.ndarray, resolution: int = 512) -> np.ndarray:
        """Segmentation map (RGB uint8, ADE20K palette) at the working resolution."""
        rgb = prepare_input(img, resolution)
        return colorize_ade20k(self.labels(rgb))
