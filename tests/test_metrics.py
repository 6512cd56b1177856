"""Control-fidelity metrics on drawn masks and images with exactly known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cldm.metrics import MAX_RGB_DISTANCE, canny_edges, circle_mask_from_colors, color_accuracy, edge_f1, iou
from training.make_fill50k import sample_fill50k, sample_rng


def _square(size: int, y0: int, x0: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[y0 : y0 + side, x0 : x0 + side] = True
    return mask


def test_iou_two_squares_known_overlap() -> None:
    a = _square(32, 0, 0, 10)  # 100 px
    b = _square(32, 5, 5, 10)  # 100 px, overlap 5x5 = 25
    assert iou(a, b) == 25 / 175
    assert iou(a, a) == 1.0
    assert iou(a, _square(32, 20, 20, 5)) == 0.0


def test_iou_both_empty_is_one_and_shapes_checked() -> None:
    empty = np.zeros((8, 8), bool)
    assert iou(empty, empty) == 1.0
    assert iou(empty, _square(8, 0, 0, 2)) == 0.0
    with pytest.raises(ValueError):
        iou(empty, np.zeros((8, 9), bool))


def test_circle_mask_from_colors_uint8_and_float() -> None:
    circle, background = (200, 30, 30), (20, 20, 220)
    truth = _square(16, 4, 4, 6)
    image = np.empty((16, 16, 3), np.uint8)
    image[...] = background
    image[truth] = (180, 60, 40)  # near the circle colour, not equal
    assert np.array_equal(circle_mask_from_colors(image, circle, background), truth)
    assert np.array_equal(circle_mask_from_colors(image / 255.0, circle, background), truth)


def test_circle_mask_recovers_fill50k_target() -> None:
    sample = sample_fill50k(sample_rng(0, 7), 32)
    mask = circle_mask_from_colors(sample["target"], sample["circle_rgb"], sample["background_rgb"])
    assert iou(mask, sample["mask"]) == 1.0


def test_color_accuracy_exact_values() -> None:
    circle, background = (255, 255, 255), (0, 0, 0)
    mask = _square(10, 2, 2, 4)
    perfect = np.zeros((10, 10, 3), np.uint8)
    perfect[mask] = circle
    assert color_accuracy(perfect, mask, circle, background) == 1.0
    # All black: inside error 1 (black vs white), outside error 0 -> 1 - (1 + 0) / 2.
    assert color_accuracy(np.zeros((10, 10, 3), np.uint8), mask, circle, background) == 0.5
    # Swapped colours: every pixel maximally wrong.
    assert color_accuracy(255 - perfect, mask, circle, background) == 0.0
    # Regions weigh equally, not by area: one wrong pixel inside a 1-px circle costs half.
    tiny = _square(10, 0, 0, 1)
    assert color_accuracy(np.zeros((10, 10, 3), np.uint8), tiny, circle, background) == 0.5


def test_color_accuracy_partial_error_and_float_input() -> None:
    circle, background = (100, 100, 100), (0, 0, 0)
    mask = _square(8, 0, 0, 4)
    image = np.zeros((8, 8, 3), np.uint8)
    image[mask] = (130, 100, 100)  # inside error 30 on one channel
    expected = 1.0 - (30.0 / MAX_RGB_DISTANCE + 0.0) / 2.0
    assert color_accuracy(image, mask, circle, background) == pytest.approx(expected, abs=1e-12)
    assert color_accuracy(image / 255.0, mask, circle, background) == pytest.approx(expected, abs=1e-12)
    # Empty mask: only the background region counts.
    assert color_accuracy(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8), bool), circle, background) == 1.0


def _bright_square(size: int = 32) -> np.ndarray:
    image = np.zeros((size, size, 3), np.uint8)
    image[_square(size, 8, 8, 16)] = 255
    return image


def test_edge_f1_exact_values() -> None:
    image = _bright_square()
    edges = canny_edges(image)
    n = int(edges.sum())
    assert n > 0
    assert edge_f1(image, edges) == 1.0
    # Hint holds every other edge pixel: precision kept/n, recall 1 -> F1 = 2PR / (P + R).
    half = edges.copy()
    ys, xs = np.nonzero(edges)
    half[ys[::2], xs[::2]] = False
    kept = int(half.sum())
    precision, recall = kept / n, 1.0
    assert edge_f1(image, half) == pytest.approx(2 * precision * recall / (precision + recall), abs=1e-12)
    # Uint8 three-channel hint (as a Canny control image) works the same.
    hint_rgb = np.repeat(edges[:, :, None].astype(np.uint8) * 255, 3, axis=2)
    assert edge_f1(image, hint_rgb) == 1.0
    assert edge_f1(image.astype(np.float32) / 255.0, hint_rgb.astype(np.float32) / 255.0) == 1.0


def test_edge_f1_tolerance() -> None:
    # A vertical step: Canny marks exactly one full-height column, so shifts give exact answers.
    image = np.zeros((16, 32, 3), np.uint8)
    image[:, 16:] = 255
    edges = canny_edges(image)
    assert edges.sum() == 16 and np.count_nonzero(edges.any(axis=0)) == 1
    shifted = np.roll(edges, 1, axis=1)
    assert edge_f1(image, shifted) == 0.0
    assert edge_f1(image, shifted, tolerance=1) == 1.0
    assert edge_f1(image, np.roll(edges, 2, axis=1), tolerance=1) == 0.0
    # Hint with the true column plus a spurious one: P = 1, R = 1/2 -> F1 = 2/3.
    assert edge_f1(image, edges | np.roll(edges, 8, axis=1)) == pytest.approx(2 / 3, abs=1e-12)
    with pytest.raises(ValueError):
        edge_f1(image, edges, tolerance=-1)


def test_edge_f1_empty_cases() -> None:
    blank = np.zeros((16, 16, 3), np.uint8)
    no_edges = np.zeros((16, 16), bool)
    assert edge_f1(blank, no_edges) == 1.0
    assert edge_f1(_bright_square(16), no_edges) == 0.0
    assert edge_f1(blank, _square(16, 4, 4, 2)) == 0.0
    with pytest.raises(ValueError):
        edge_f1(blank, np.zeros((8, 8), bool))


def test_edge_f1_in_unit_interval_on_fill50k() -> None:
    sample = sample_fill50k(sample_rng(0, 1), 64)
    score = edge_f1(sample["target"], sample["source"], tolerance=2)
    assert 0.0 < score <= 1.0 and not math.isnan(score)
