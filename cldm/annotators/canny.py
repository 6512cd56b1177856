"""Canny edge map, as the original ``apply_canny``."""

from __future__ import annotations

import cv2
import numpy as np

from cldm.annotators.base import prepare_input

CANNY_LOW_DEFAULT = 100
CANNY_HIGH_DEFAULT = 200
CANNY_THRESHOLD_RANGE = (1, 255)


def canny(
    img: np.ndarray,
    resolution: int = 512,
    low_threshold: float = CANNY_LOW_DEFAULT,
    high_threshold: float = CANNY_HIGH_DEFAULT,
) -> np.ndarray:
    """White Canny edges on black, at the annotator working size.

    Runs on the RGB image directly (OpenCV takes the strongest channel gradient), like the original,
    so colour-only boundaries are kept. Thresholds are hysteresis thresholds on the gradient
    magnitude, each in [1, 255]; defaults 100/200.
    """
    lo, hi = CANNY_THRESHOLD_RANGE
    low = float(np.clip(low_threshold, lo, hi))
    high = float(np.clip(high_threshold, lo, hi))
    rgb = prepare_input(img, resolution)
    edges = cv2.Canny(rgb, low, high)
    return np.repeat(edges[:, :, None], 3, axis=2)
