"""The size every training item is made to, the same for its target and its hint (one crop box, one scale).

Three ways, one per option of `tutorial_train.py`:

- `--image_size N` (the original's): both images resized to N x N; the aspect ratio is not kept;
- `--resolution N --crop center|random` (diffusers' behaviour): the short side resized to N, then an N x N crop;
- `--resolution N --buckets` (kohya's aspect-ratio bucketing): each item goes to the bucket, of about N x N pixels
  with sides multiples of 64, whose aspect ratio is nearest its own; it is resized to cover the bucket and
  cropped to it. The bucket follows from the item's size alone, so runs repeat; `training.order.BucketBatchSampler`
  makes every batch from one bucket.

`Placement` records what happened (original size, crop offsets, output size): SDXL's size conditioning needs it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from ldm.errors import InputError

CROPS = ("center", "random")
BUCKET_STEP = 64


@dataclass(frozen=True)
class Placement:
    """Where an item's output came from: its original (width, height), the crop's (left, top) in the resized image,
    and the output (width, height)."""

    original_size: tuple[int, int]
    crop_offset: tuple[int, int]
    output_size: tuple[int, int]


def make_buckets(resolution: int, step: int = BUCKET_STEP) -> tuple[tuple[int, int], ...]:
    """(width, height) buckets of at most `resolution**2` pixels, sides multiples of `step` from `resolution / 2` to
    `2 * resolution`, each width with the tallest height that fits."""
    if resolution < step or resolution % step:
        raise InputError(f"--buckets needs --resolution a multiple of {step}, got {resolution}")
    buckets = []
    for width in range(max(step, resolution // 2), 2 * resolution + 1, step):
        height = min(2 * resolution, (resolution * resolution // width) // step * step)
        if height >= max(step, resolution // 2):
            buckets.append((width, height))
    return tuple(buckets)


def nearest_bucket(buckets: Sequence[tuple[int, int]], width: int, height: int) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's (in log ratio); ties go to the larger bucket."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


@dataclass(frozen=True)
class Geometry:
    """Which of the three ways applies (`square`, or `resolution` with `crop` or `buckets`), or none: as stored."""

    square: int | None = None
    resolution: int | None = None
    crop: str = "center"
    buckets: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise InputError(f"crop must be one of {', '.join(CROPS)}, got {self.crop!r}")
        if self.square is not None and self.resolution is not None:
            raise InputError("--image_size and --resolution are two ways to size images: give one")
        for value in (self.square, self.resolution):
            if value is not None and value < 1:
                raise InputError(f"image sizes must be positive, got {value}")

    @classmethod
    def from_options(cls, image_size: int | None = None, resolution: int | None = None, crop: str = "center",
                     buckets: bool = False) -> Geometry:
        if buckets and resolution is None:
            raise InputError("--buckets needs --resolution (the buckets' size, e.g. 512)")
        return cls(image_size, resolution, crop, make_buckets(resolution) if buckets and resolution else None)

    @property
    def varies(self) -> bool:
        """Whether an item's output differs between epochs (a random crop)."""
        return self.crop == "random" and self.resolution is not None

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) an image of this size comes out at."""
        if self.square is not None:
            return self.square, self.square
        if self.buckets is not None:
            return nearest_bucket(self.buckets, width, height)
        if self.resolution is not None:
            return self.resolution, self.resolution
        return width, height

    def place(self, target: np.ndarray, hint: np.ndarray | None, rng: np.random.Generator | None = None
              ) -> tuple[np.ndarray, np.ndarray | None, Placement]:
        """Target and hint (same size, uint8 HWC) at the output size, through one scale and one crop box."""
        height, width = target.shape[:2]
        out_w, out_h = self.output_size(width, height)
        if (out_w, out_h) == (width, height):
            return target, hint, Placement((width, height), (0, 0), (width, height))
        if self.square is not None:  # the original's: no crop, the aspect ratio is not kept
            resized = [_resize(image, out_w, out_h) for image in (target, hint)]
            return resized[0], resized[1], Placement((width, height), (0, 0), (out_w, out_h))
        scale = max(out_w / width, out_h / height)
        new_w, new_h = max(out_w, round(width * scale)), max(out_h, round(height * scale))
        spare_x, spare_y = new_w - out_w, new_h - out_h
        if self.crop == "random" and rng is not None:
            left, top = int(rng.integers(0, spare_x + 1)), int(rng.integers(0, spare_y + 1))
        else:
            left, top = spare_x // 2, spare_y // 2
        placed = []
        for image in (target, hint):
            if image is None:
                placed.append(None)
                continue
            resized = _resize(image, new_w, new_h)
            placed.append(np.ascontiguousarray(resized[top:top + out_h, left:left + out_w]))
        return placed[0], placed[1], Placement((width, height), (left, top), (out_w, out_h))


def _resize(image: np.ndarray | None, width: int, height: int) -> np.ndarray | None:
    if image is None or image.shape[:2] == (height, width):
        return image
    shrinking = width * height < image.shape[0] * image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
