"""Control-fidelity metrics: does a generated image follow its hint and its prompt?

Pure numpy/OpenCV functions, used on held-out Fill50K hints (where the true circle mask and the prompted
colours are known) and on edge controls. Images are HxWx3 RGB, either uint8 in [0, 255] or float in
[0, 1]; colours are always given as (r, g, b) in 0-255 units, as ``training.make_fill50k`` returns them.

Conventions: every score is in [0, 1], higher is better, and the degenerate "nothing to find, nothing
found" case scores 1.0 (a perfect answer to an empty question), so averages over samples are not
distorted by NaNs.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

# Largest Euclidean distance between two colours in 0-255 RGB: black to white, 255 * sqrt(3). Computed
# the same way as per-pixel distances so that a black-vs-white pixel has error exactly 1.0.
MAX_RGB_DISTANCE = float(np.linalg.norm(np.full(3, 255.0)))


def _rgb255(image: np.ndarray) -> np.ndarray:
    """HxWx3 image as float64 in 0-255 units; uint8 is taken as is, floats are assumed in [0, 1]."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 RGB image, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float64)
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float64) * 255.0
    raise ValueError(f"expected uint8 or float image, got {image.dtype}")


def _uint8(image: np.ndarray) -> np.ndarray:
    """HxW or HxWxC image as uint8 (floats in [0, 1] are scaled and rounded)."""
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    if image.dtype == np.bool_:
        return image.astype(np.uint8) * 255
    if np.issubdtype(image.dtype, np.floating):
        return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise ValueError(f"expected uint8, bool or float image, got {image.dtype}")


def _color_distance(image255: np.ndarray, rgb: Sequence[float]) -> np.ndarray:
    """Per-pixel Euclidean RGB distance to one colour, HxW."""
    return np.linalg.norm(image255 - np.asarray(rgb, np.float64), axis=-1)


def circle_mask_from_colors(
    image: np.ndarray, circle_rgb: Sequence[float], background_rgb: Sequence[float]
) -> np.ndarray:
    """Pixels closer (Euclidean RGB) to the prompted circle colour than to the background colour.

    This is where the model *painted the circle*, judged by the prompt's colours; compare it with the
    true mask using ``iou``. Ties go to the background.
    """
    rgb = _rgb255(image)
    return _color_distance(rgb, circle_rgb) < _color_distance(rgb, background_rgb)


def iou(mask_a: np.ndarray, mask_b: np.ndarray) -> float:
    """Intersection over union of two boolean masks of the same shape.

    Both empty gives 1.0: the masks agree exactly, and a NaN would poison averages.
    """
    a, b = np.asarray(mask_a, bool), np.asarray(mask_b, bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    union = np.count_nonzero(a | b)
    if union == 0:
        return 1.0
    return np.count_nonzero(a & b) / union


def color_accuracy(
    image: np.ndarray, mask: np.ndarray, circle_rgb: Sequence[float], background_rgb: Sequence[float]
) -> float:
    """How close the image's colours are to the prompted ones, region by region, in [0, 1].

    Each pixel's expected colour is ``circle_rgb`` inside the true ``mask`` and ``background_rgb``
    outside. Its error is the Euclidean RGB distance to that colour divided by the largest possible
    distance (black to white, 255 * sqrt(3)), so in [0, 1]. The score is::

        1 - (mean error inside + mean error outside) / 2

    The two regions are weighted equally, not by area, so a small circle painted the wrong colour
    cannot hide behind a large, correct background. If one region is empty the other's mean is used
    alone. A perfect image scores 1.0; all-black on a white-circle/black-background prompt scores 0.5.
    """
    rgb = _rgb255(image)
    inside = np.asarray(mask, bool)
    if inside.shape != rgb.shape[:2]:
        raise ValueError(f"mask shape {inside.shape} does not match image {rgb.shape[:2]}")
    if inside.size == 0:
        raise ValueError("empty image")
    errors = []
    if inside.any():
        errors.append(_color_distance(rgb[inside], circle_rgb).mean())
    if not inside.all():
        errors.append(_color_distance(rgb[~inside], background_rgb).mean())
    return float(np.clip(1.0 - np.mean(errors) / MAX_RGB_DISTANCE, 0.0, 1.0))


def canny_edges(image: np.ndarray, low: float = 100, high: float = 200) -> np.ndarray:
    """Boolean Canny edge map of an RGB (or grayscale) image, thresholds as in ControlNet's Canny hint."""
    pixels = _uint8(image)
    if pixels.ndim == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY)
    return cv2.Canny(pixels, low, high) > 0


def _edge_map(hint_edges: np.ndarray) -> np.ndarray:
    """Hint edge map to HxW bool: a pixel is an edge where any channel is above half intensity."""
    edges = np.asarray(hint_edges)
    if edges.dtype != np.bool_:
        edges = _uint8(edges) > 127
    if edges.ndim == 3:
        edges = edges.any(axis=2)
    if edges.ndim != 2:
        raise ValueError(f"expected an HxW or HxWxC edge map, got shape {edges.shape}")
    return edges


def _near(mask: np.ndarray, tolerance: int) -> np.ndarray:
    """Pixels within ``tolerance`` (Chebyshev distance) of a set pixel of ``mask``."""
    if tolerance == 0:
        return mask
    kernel = np.ones((2 * tolerance + 1, 2 * tolerance + 1), np.uint8)
    return cv2.dilate(mask.astype(np.uint8), kernel) > 0


def edge_f1(
    image: np.ndarray, hint_edges: np.ndarray, low: float = 100, high: float = 200, tolerance: int = 0
) -> float:
    """F1 between the Canny edges of a generated image and the hint's edge map.

    As ControlNet++ measures edge controls: run Canny (``low``, ``high``) on the generated image and
    score it against the hint's edges. With ``tolerance`` 0 (default, ControlNet++'s pixel-exact
    score) an edge pixel matches only the same pixel; with ``tolerance`` t it matches any pixel within
    Chebyshev distance t, which forgives the one-pixel shifts Canny makes on anti-aliased boundaries.
    Precision is the fraction of generated edge pixels near a hint edge, recall the fraction of hint
    edge pixels near a generated edge, F1 = 2PR / (P + R). Both empty gives 1.0, exactly one empty 0.0.
    """
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    predicted = canny_edges(image, low, high)
    reference = _edge_map(hint_edges)
    if predicted.shape != reference.shape:
        raise ValueError(f"image {predicted.shape} and hint {reference.shape} differ in size")
    n_pred, n_ref = np.count_nonzero(predicted), np.count_nonzero(reference)
    if n_pred == 0 and n_ref == 0:
        return 1.0
    if n_pred == 0 or n_ref == 0:
        return 0.0
    precision = np.count_nonzero(predicted & _near(reference, tolerance)) / n_pred
    recall = np.count_nonzero(reference & _near(predicted, tolerance)) / n_ref
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))
