"""Straight-line maps for the M-LSD ControlNet, from OpenCV's Fast Line Detector.

The M-LSD network of the original annotator (``mlsd_large_512_fp32.pth``) is not reimplemented;
OpenCV's FLD (``cv2.ximgproc``) finds the same kind of straight segments without weights. Its
controls are mapped onto the M-LSD ones so the web-UI-style thresholds keep their meaning:

- ``value_threshold`` (M-LSD: minimum line-centre score, default 0.1, range 0.01-2.0) sets FLD's
  Canny thresholds to ``500 * value_threshold`` (so the default gives FLD's own default of 50):
  higher means only stronger edges make lines.
- ``distance_threshold`` (M-LSD: minimum segment length in its half-resolution output map,
  default 0.1, range 0.01-20.0) becomes a minimum length of ``10 + 2 * distance_threshold`` pixels
  at the working resolution (10 px is FLD's default floor, which keeps the texture noise out that
  the network would never report).
"""

from __future__ import annotations

import cv2
import numpy as np

from cldm.annotators.base import prepare_input

MLSD_VALUE_DEFAULT = 0.1
MLSD_VALUE_RANGE = (0.01, 2.0)
MLSD_DISTANCE_DEFAULT = 0.1
MLSD_DISTANCE_RANGE = (0.01, 20.0)


def detect_line_segments(
    img_rgb: np.ndarray,
    value_threshold: float = MLSD_VALUE_DEFAULT,
    distance_threshold: float = MLSD_DISTANCE_DEFAULT,
) -> np.ndarray:
    """Line segments ``(N, 4)`` as ``x1, y1, x2, y2`` pixels of ``img_rgb`` (any size, RGB uint8)."""
    v = float(np.clip(value_threshold, *MLSD_VALUE_RANGE))
    d = float(np.clip(distance_threshold, *MLSD_DISTANCE_RANGE))
    canny_th = 500.0 * v
    detector = cv2.ximgproc.createFastLineDetector(
        length_threshold=int(round(10 + 2 * d)),
        distance_threshold=1.414213562,
        canny_th1=canny_th,
        canny_th2=canny_th,
        canny_aperture_size=3,
        do_merge=False,
    )
    gray = cv2.cvtColor(img_rgb, cv2.COLOR_RGB2GRAY)
    lines = detector.detect(gray)
    if lines is None:
        return np.zeros((0, 4), dtype=np.float32)
    return lines.reshape(-1, 4).astype(np.float32)


def mlsd(
    img: np.ndarray,
    resolution: int = 512,
    value_threshold: float = MLSD_VALUE_DEFAULT,
    distance_threshold: float = MLSD_DISTANCE_DEFAULT,
) -> np.ndarray:
    """White 1-px straight lines on black at the working resolution, as the original M-LSD map."""
    rgb = prepare_input(img, resolution)
    out = np.zeros_like(rgb)
    for x1, y1, x2, y2 in detect_line_segments(rgb, value_threshold, distance_threshold):
        p1 = (int(round(x1)), int(round(y1)))
        p2 = (int(round(x2)), int(round(y2)))
        cv2.line(out, p1, p2, (255, 255, 255), 1)
    return out
