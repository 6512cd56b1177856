"""Generate a Fill50K-style data set: circle outlines (hints), filled circles (targets), prompts.

The original ControlNet tutorial trains on "Fill50K": each sample is a circle outline on black (the
control hint), the same circle filled with a named colour on a background of another named colour (the
target), and a prompt naming both colours. This script regenerates an equivalent set from a seed, so the
tutorial does not depend on a download, and so that held-out samples come with their exact circle mask
and colours for control-fidelity metrics (see ``sample_fill50k``).

Layout written under ``--out``::

    source/{i}.png   white circle outline on black (hint)
    target/{i}.png   filled circle on a coloured background
    prompt.json      one JSON object per line:
                     {"source": "source/0.png", "target": "target/0.png", "prompt": "..."}

Choices:

* The outline is pure white (255, 255, 255) on black, whatever the circle colour: the hint carries only
  geometry, so the colours must come from the prompt.
* Drawing is exact (no anti-aliasing): a pixel belongs to the disc when the distance from its centre to
  the circle's centre is at most the radius; the outline is the band of disc pixels within
  ``outline_width`` pixels of a pixel outside the disc. Masks recomputed from ``center``/``radius``
  therefore match the target pixels exactly.
* Sample ``i`` is drawn from ``numpy.random.default_rng([seed, i])``: it does not depend on ``n`` or on
  other samples, so sets are reproducible, prefixes of larger sets, and can be written in parallel.

Usage::

    python training/make_fill50k.py --out ./training/fill50k --n 50000 --size 512 --seed 0
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ldm.errors import DEBUG_HELP, InputError, OutputExistsError, UserError, command_line

# CSS/X11 colour names written as words, with their sRGB values.
NAMED_COLORS: dict[str, tuple[int, int, int]] = {
    "aquamarine": (127, 255, 212),
    "blue violet": (138, 43, 226),
    "brown": (165, 42, 42),
    "burly wood": (222, 184, 135),
    "cadet blue": (95, 158, 160),
    "chartreuse": (127, 255, 0),
    "chocolate": (210, 105, 30),
    "coral": (255, 127, 80),
    "cornflower blue": (100, 149, 237),
    "crimson": (220, 20, 60),
    "dark cyan": (0, 139, 139),
    "dark golden rod": (184, 134, 11),
    "dark green": (0, 100, 0),
    "dark khaki": (189, 183, 107),
    "dark magenta": (139, 0, 139),
    "dark olive green": (85, 107, 47),
    "dark orange": (255, 140, 0),
    "dark orchid": (153, 50, 204),
    "dark salmon": (233, 150, 122),
    "dark sea green": (143, 188, 143),
    "dark slate blue": (72, 61, 139),
    "dark slate gray": (47, 79, 79),
    "dark turquoise": (0, 206, 209),
    "deep pink": (255, 20, 147),
    "deep sky blue": (0, 191, 255),
    "dodger blue": (30, 144, 255),
    "fire brick": (178, 34, 34),
    "forest green": (34, 139, 34),
    "gold": (255, 215, 0),
    "golden rod": (218, 165, 32),
    "hot pink": (255, 105, 180),
    "indian red": (205, 92, 92),
    "indigo": (75, 0, 130),
    "khaki": (240, 230, 140),
    "lavender": (230, 230, 250),
    "lawn green": (124, 252, 0),
    "light coral": (240, 128, 128),
    "light sea green": (32, 178, 170),
    "light sky blue": (135, 206, 250),
    "light steel blue": (176, 196, 222),
    "lime green": (50, 205, 50),
    "maroon": (128, 0, 0),
    "medium aquamarine": (102, 205, 170),
    "medium purple": (147, 112, 219),
    "midnight blue": (25, 25, 112),
    "navy": (0, 0, 128),
    "old lace": (253, 245, 230),
    "olive drab": (107, 142, 35),
    "orange red": (255, 69, 0),
    "orchid": (218, 112, 214),
    "pale golden rod": (238, 232, 170),
    "pale green": (152, 251, 152),
    "pale violet red": (219, 112, 147),
    "peach puff": (255, 218, 185),
    "peru": (205, 133, 63),
    "plum": (221, 160, 221),
    "powder blue": (176, 224, 230),
    "rebecca purple": (102, 51, 153),
    "rosy brown": (188, 143, 143),
    "royal blue": (65, 105, 225),
    "saddle brown": (139, 69, 19),
    "salmon": (250, 128, 114),
    "sea green": (46, 139, 87),
    "sienna": (160, 82, 45),
    "sky blue": (135, 206, 235),
    "slate blue": (106, 90, 205),
    "slate gray": (112, 128, 144),
    "spring green": (0, 255, 127),
    "steel blue": (70, 130, 180),
    "tan": (210, 180, 140),
    "teal": (0, 128, 128),
    "thistle": (216, 191, 216),
    "tomato": (255, 99, 71),
    "turquoise": (64, 224, 208),
    "violet": (238, 130, 238),
    "wheat": (245, 222, 179),
    "white smoke": (245, 245, 245),
    "yellow green": (154, 205, 50),
}

# Circle and background colours must be at least this far apart (Euclidean, 0-255 RGB), so that the
# circle is visible and a nearest-colour mask recovers it.
MIN_COLOR_DISTANCE = 100.0
OUTLINE_RGB = (255, 255, 255)
MIN_RADIUS_FRACTION = 0.10
MAX_RADIUS_FRACTION = 0.35
MIN_SIZE = 8


def outline_width(size: int) -> int:
    """Outline thickness in pixels: about 4 px at 512, never below 1, so hints stay visible when resized."""
    return max(1, round(size / 128))


def circle_mask(size: int, center: tuple[int, int], radius: int) -> np.ndarray:
    """Exact (non-anti-aliased) disc mask, ``size``x``size`` bool; ``center`` is (x, y) in pixels."""
    ys, xs = np.mgrid[0:size, 0:size]
    cx, cy = center
    return (xs - cx) ** 2 + (ys - cy) ** 2 <= radius**2


def outline_mask(size: int, center: tuple[int, int], radius: int, width: int) -> np.ndarray:
    """Disc pixels within ``width`` (Chebyshev) of a non-disc pixel: a closed ring on the disc's edge.

    Eroding the disc with a 3x3 square ``width`` times (rather than thresholding the distance) leaves
    no gaps in the ring, and every lit pixel lies on the target's circle, never outside it.
    """
    disc = circle_mask(size, center, radius).astype(np.uint8)
    inner = cv2.erode(disc, np.ones((3, 3), np.uint8), iterations=width, borderValue=0)
    return (disc > 0) & (inner == 0)


def _pick_colors(rng: np.random.Generator) -> tuple[str, str]:
    """Draw (circle, background) colour names at least ``MIN_COLOR_DISTANCE`` apart."""
    names = list(NAMED_COLORS)
    while True:
        i, j = rng.choice(len(names), size=2, replace=False)
        a, b = np.array(NAMED_COLORS[names[i]], float), np.array(NAMED_COLORS[names[j]], float)
        if np.linalg.norm(a - b) >= MIN_COLOR_DISTANCE:
            return names[i], names[j]


def sample_fill50k(rng: np.random.Generator, size: int) -> dict[str, Any]:
    """Draw one sample without writing it, with the ground truth that metrics need.

    Returns a dict with ``source`` (HxWx3 uint8 RGB outline hint), ``target`` (HxWx3 uint8 RGB filled
    circle), ``prompt`` (str), ``center`` ((x, y) ints), ``radius`` (int), ``circle_rgb`` and
    ``background_rgb`` ((r, g, b) ints), and ``mask`` (HxW bool disc, equal to the target's circle pixels).
    The circle lies fully inside the image.
    """
    if size < MIN_SIZE:
        raise InputError(f"size must be at least {MIN_SIZE}, got {size}")
    r_min = max(1, round(MIN_RADIUS_FRACTION * size))
    r_max = max(r_min, round(MAX_RADIUS_FRACTION * size))
    radius = int(rng.integers(r_min, r_max + 1))
    cx = int(rng.integers(radius, size - radius))
    cy = int(rng.integers(radius, size - radius))
    circle_name, background_name = _pick_colors(rng)
    circle_rgb, background_rgb = NAMED_COLORS[circle_name], NAMED_COLORS[background_name]

    mask = circle_mask(size, (cx, cy), radius)
    target = np.empty((size, size, 3), np.uint8)
    target[...] = background_rgb
    target[mask] = circle_rgb
    source = np.zeros((size, size, 3), np.uint8)
    source[outline_mask(size, (cx, cy), radius, outline_width(size))] = OUTLINE_RGB
    return {
        "source": source,
        "target": target,
        "prompt": f"{circle_name} circle with {background_name} background",
        "center": (cx, cy),
        "radius": radius,
        "circle_rgb": circle_rgb,
        "background_rgb": background_rgb,
        "mask": mask,
    }


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for sample ``index`` of a set made with ``seed`` (independent of the set's size)."""
    return np.random.default_rng([seed, index])


def _write_png(path: Path, rgb: np.ndarray) -> None:
    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise UserError(f"could not write {path} (is the disk full, or the folder not writable?)")


def _write_one(args: tuple[Path, int, int, int]) -> str:
    """Write sample ``index``; return its prompt.json line (module-level so worker processes can pickle)."""
    out, index, size, seed = args
    sample = sample_fill50k(sample_rng(seed, index), size)
    _write_png(out / "source" / f"{index}.png", sample["source"])
    _write_png(out / "target" / f"{index}.png", sample["target"])
    record = {"source": f"source/{index}.png", "target": f"target/{index}.png", "prompt": sample["prompt"]}
    return json.dumps(record)


def make_fill50k(
    out: Path, n: int, size: int, seed: int, *, overwrite: bool = False, workers: int = 1
) -> Path:
    """Write ``n`` samples under ``out`` and return the path of ``prompt.json``.

    Refuses a non-empty ``out`` (``FileExistsError``) unless ``overwrite``; then only ``source/``,
    ``target/`` and ``prompt.json`` are removed, never anything else in the folder. Output bytes depend
    only on (seed, index, size), not on ``workers``.
    """
    out = Path(out)
    if n < 1:
        raise InputError(f"n must be positive, got {n}")
    if size < MIN_SIZE:
        raise InputError(f"size must be at least {MIN_SIZE}, got {size}")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{out} exists and is not empty; pass --overwrite to replace it")
        for sub in ("source", "target"):
            shutil.rmtree(out / sub, ignore_errors=True)
        (out / "prompt.json").unlink(missing_ok=True)
    (out / "source").mkdir(parents=True, exist_ok=True)
    (out / "target").mkdir(parents=True, exist_ok=True)

    jobs = [(out, i, size, seed) for i in range(n)]
    if workers > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            lines = list(pool.map(_write_one, jobs, chunksize=64))
    else:
        lines = [_write_one(job) for job in jobs]
    prompt_path = out / "prompt.json"
    prompt_path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return prompt_path


@command_line
def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=DEBUG_HELP)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--n", type=int, default=50000, help="number of samples (default 50000)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing set in --out")
    args = parser.parse_args(argv)
    path = make_fill50k(args.out, args.n, args.size, args.seed, overwrite=args.overwrite, workers=args.workers)
    print(f"wrote {args.n} samples ({args.size}x{args.size}, seed {args.seed}) to {path.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
