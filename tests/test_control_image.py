"""Control-image preparation ops: exact results on small arrays."""

from __future__ import annotations

import numpy as np
import pytest

from cldm.control_image import (
    invert,
    pixel_perfect_resolution,
    resize_for_output,
    resize_image_to_resolution,
    rgb_to_bgr,
    to_rgb_uint8,
)


def _ramp(h: int, w: int) -> np.ndarray:
    """Distinct values per pixel and channel, to see exactly where each pixel went."""
    return (np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3) * 3).astype(np.uint8)


def test_invert_and_bgr() -> None:
    img = np.array([[[0, 255, 10], [1, 2, 3]]], dtype=np.uint8)
    np.testing.assert_array_equal(invert(img), [[[255, 0, 245], [254, 253, 252]]])
    assert invert(img).dtype == np.uint8
    bgr = rgb_to_bgr(img)
    np.testing.assert_array_equal(bgr, [[[10, 255, 0], [3, 2, 1]]])
    assert bgr.flags["C_CONTIGUOUS"]


def test_just_resize_nearest_repeats_pixels() -> None:
    src = _ramp(2, 2)
    out = resize_for_output(src, 4, 4, "just_resize", nearest=True)
    np.testing.assert_array_equal(out, np.repeat(np.repeat(src, 2, axis=0), 2, axis=1))


def test_crop_and_resize_scales_to_cover_then_crops_centre() -> None:
    src = _ramp(2, 4)  # h=2, w=4 -> cover 4x4 needs x2: 4x8, crop the middle 4 columns
    out = resize_for_output(src, 4, 4, "crop_and_resize", nearest=True)
    expected = np.repeat(np.repeat(src[:, 1:3], 2, axis=0), 2, axis=1)
    np.testing.assert_array_equal(out, expected)


def test_resize_and_fill_fits_and_pads_with_black() -> None:
    src = _ramp(2, 4)  # fits 4x4 at scale 1: rows 1-2 hold the image, rows 0 and 3 are black
    out = resize_for_output(src, 4, 4, "resize_and_fill", nearest=True)
    expected = np.zeros((4, 4, 3), dtype=np.uint8)
    expected[1:3] = src
    np.testing.assert_array_equal(out, expected)
    tall = resize_for_output(np.full((4, 2, 3), 200, np.uint8), 8, 4, "resize_and_fill")
    assert tall.shape == (4, 8, 3)
    np.testing.assert_array_equal(tall[:, 3:5], 200)
    assert tall[:, :3].max() == 0 and tall[:, 5:].max() == 0


def test_shrinking_uses_area_averaging_and_keeps_channels() -> None:
    checker = np.zeros((4, 4, 3), dtype=np.uint8)
    checker[::2, ::2] = 255
    checker[1::2, 1::2] = 255
    out = resize_for_output(checker, 2, 2, "just_resize")
    assert out.shape == (2, 2, 3)
    assert np.all(np.abs(out.astype(int) - 128) <= 1)  # INTER_AREA averages 2x2 blocks
    single = resize_for_output(np.full((6, 6, 1), 7, np.uint8), 3, 9, "crop_and_resize")
    assert single.shape == (9, 3, 1)
    np.testing.assert_array_equal(single, 7)


def test_resize_rejects_unknown_mode() -> None:
    with pytest.raises(ValueError, match="resize mode"):
        resize_for_output(np.zeros((2, 2, 3), np.uint8), 2, 2, "stretch")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("image_hw", "target_hw", "mode", "expected"),
    [
        ((512, 768), (512, 512), "just_resize", 512),
        ((512, 768), (512, 512), "crop_and_resize", 512),
        ((512, 768), (512, 512), "resize_and_fill", 341),
        ((300, 400), (600, 600), "just_resize", 600),
        ((300, 400), (600, 600), "resize_and_fill", 450),
        ((1024, 1024), (512, 768), "crop_and_resize", 768),
    ],
)
def test_pixel_perfect_resolution(
    image_hw: tuple[int, int], target_hw: tuple[int, int], mode: str, expected: int
) -> None:
    assert pixel_perfect_resolution(image_hw, target_hw, mode) == expected  # type: ignore[arg-type]


def test_to_rgb_uint8_gray_and_float() -> None:
    gray = np.array([[0, 100], [200, 255]], dtype=np.uint8)
    out = to_rgb_uint8(gray)
    assert out.shape == (2, 2, 3)
    np.testing.assert_array_equal(out[..., 1], gray)
    np.testing.assert_array_equal(to_rgb_uint8(gray[:, :, None]), out)
    floats = np.array([[0.0, 0.5, 1.0, 2.0]], dtype=np.float32)
    np.testing.assert_array_equal(to_rgb_uint8(floats)[0, :, 0], [0, 128, 255, 255])


def test_to_rgb_uint8_rgba_composites_on_white() -> None:
    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0], [0, 0, 0, 51]]], dtype=np.uint8)
    out = to_rgb_uint8(rgba)
    np.testing.assert_array_equal(out[0, 0], [10, 20, 30])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])
    np.testing.assert_array_equal(out[0, 2], [204, 204, 204])  # 20% black ink on white


def test_to_rgb_uint8_16_bit_scales() -> None:
    img = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    np.testing.assert_array_equal(to_rgb_uint8(img)[0, :, 2], [0, 100, 255])


def test_resize_image_to_resolution_multiples_of_64() -> None:
    out = resize_image_to_resolution(np.zeros((300, 400, 3), np.uint8), 512)
    assert out.shape == (512, 704, 3)  # 400 * 512/300 = 682.7 -> 704
    small = resize_image_to_resolution(np.full((1024, 512), 9, np.uint8), 256)
    assert small.shape == (512, 256, 3)
    np.testing.assert_array_equal(small, 9)
