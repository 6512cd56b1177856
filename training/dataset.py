"""Paired (hint, target, prompt) data set read from a ``prompt.json`` file, validated before training.

``root/prompt.json`` holds one JSON object per line, ``{"source": ..., "target": ..., "prompt": ...}``,
with image paths relative to ``root`` (the Fill50K layout). Items match the original ControlNet tutorial
data set: ``jpg`` is the target as float32 HWC RGB in [-1, 1], ``hint`` the source as float32 HWC RGB
in [0, 1], ``txt`` the prompt.

Why validate at construction: a typo on line 31 207 of a 50k-line file should fail in a second, naming the
line, not hours into an epoch. Construction therefore parses every line and opens every image header
(PIL reads only the header, so this is cheap); pixels are decoded lazily in ``__getitem__``. A file whose
header is fine but whose pixel data is corrupt is only caught on reading; it then raises ``DatasetError``
naming the file and line.

Conversions applied on reading (not errors): grayscale -> RGB; 16-bit -> 8-bit (rounded, v / 257);
palette -> RGB (done by OpenCV); images with alpha are composited, sources onto black (transparent means
"no control signal", and hints are drawn on black) and targets onto white (the usual matte for photos
with transparency).
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ldm.errors import UserError

REQUIRED_KEYS = ("source", "target", "prompt")


class DatasetError(UserError, ValueError):
    """A problem with the data set's files, reported as one line naming the file (and line when known)."""


class BadLine(NamedTuple):
    """A ``prompt.json`` line that was skipped: 1-based line number, the file at fault, and why."""

    line: int
    file: str
    reason: str


class _Record(NamedTuple):
    line: int
    source: Path
    target: Path
    prompt: str
    size: tuple[int, int]


#: Largest image (in pixels) this data set decodes: PIL's decompression-bomb limit, about 89 megapixels.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


class ImageTooLarge(ValueError):
    """An image over `MAX_IMAGE_PIXELS`: decoding it could exhaust memory."""


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the header only; raises ``OSError``/``UnidentifiedImageError`` if unreadable and
    ``ImageTooLarge`` for an image over ``MAX_IMAGE_PIXELS``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                width, height = image.size
        except Image.DecompressionBombError as err:  # over twice the limit: PIL gives the pixel count only
            found = re.search(r"\((\d+) pixels\)", str(err))
            shown = f"{int(found.group(1)) / 1e6:.0f} megapixels" if found else "far too large"
            raise ImageTooLarge(f"it is {shown}, more than the {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels this data set "
                                "decodes: downscale it first") from err
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLarge(f"it is {width}x{height} ({width * height / 1e6:.0f} megapixels), more than the "
                            f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels this data set decodes: downscale it first")
    return width, height


def _to_uint8_rgb(array: np.ndarray, matte: int) -> np.ndarray:
    """Convert an OpenCV ``IMREAD_UNCHANGED`` array (gray/BGR/BGRA, 8 or 16 bit) to uint8 RGB.

    Alpha is composited onto a constant ``matte`` grey level (0 = black, 255 = white).
    """
    if array.dtype == np.uint16:
        array = ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"unsupported pixel type {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    channels = array.shape[2]
    if channels in (2, 4):
        color, alpha = array[:, :, :-1].astype(np.float32), array[:, :, -1:].astype(np.float32) / 255.0
        array = np.rint(color * alpha + matte * (1.0 - alpha)).astype(np.uint8)
        channels -= 1
    if channels == 1:
        return np.repeat(array, 3, axis=2)
    if channels == 3:
        return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    raise ValueError(f"unsupported channel count {array.shape[2]}")


class ControlDataset(Dataset):
    """ControlNet training pairs listed in ``root/prompt.json``.

    Args:
        root: folder holding ``prompt.json``; image paths in it are relative to this folder.
        skip_bad: when False (default) the first bad line raises ``DatasetError``; when True bad lines are
            skipped and recorded in ``skipped`` (see ``report()``).
        drop_prompt: probability of replacing an item's prompt with ``""`` (classifier-free guidance
            training). The choice is fixed per item: a boolean mask over the usable items is drawn once
            from ``numpy.random.default_rng(seed)``, so the same items lose their prompt in every epoch
            and in every run with the same seed and data.
        seed: seed for the prompt-dropout mask.
        size: if given, both images are resized to ``size`` x ``size`` (aspect ratio is not kept).

    Raises:
        DatasetError: missing ``prompt.json``, a bad line (unless ``skip_bad``), or no usable lines.
    """

    def __init__(
        self,
        root: str | Path,
        *,
        skip_bad: bool = False,
        drop_prompt: float = 0.0,
        seed: int = 0,
        size: int | None = None,
    ) -> None:
        if not 0.0 <= drop_prompt <= 1.0:
            raise ValueError(f"drop_prompt must be in [0, 1], got {drop_prompt}")
        if size is not None and size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.root = Path(root)
        self.prompt_path = self.root / "prompt.json"
        self.skip_bad = skip_bad
        self.drop_prompt = drop_prompt
        self.seed = seed
        self.size = size
        self.skipped: list[BadLine] = []
        self._records: list[_Record] = []
        self._scan()
        if not self._records:
            raise DatasetError(f"{self.prompt_path}: no usable lines ({len(self.skipped)} skipped)")
        if size is None:
            self._check_one_size()
        self.empty_prompts = sum(1 for record in self._records if not record.prompt)
        self._dropped = np.random.default_rng(seed).random(len(self._records)) < drop_prompt

    # -- validation -------------------------------------------------------------------------------

    def _bad(self, line: int, file: str, reason: str) -> None:
        """Raise, or record the line as skipped, depending on ``skip_bad``."""
        if not self.skip_bad:
            raise DatasetError(f"{self.prompt_path}:{line}: {reason}")
        self.skipped.append(BadLine(line, file, reason))

    def _scan(self) -> None:
        try:
            raw = self.prompt_path.read_bytes()
        except FileNotFoundError:
            raise DatasetError(f"{self.prompt_path}: not found") from None
        except OSError as exc:
            raise DatasetError(f"{self.prompt_path}: cannot read ({exc.strerror})") from None
        for number, raw_line in enumerate(raw.splitlines(), start=1):
            if raw_line.strip():  # blank lines (e.g. a trailing one) are ignored
                record = self._parse(number, raw_line)
                if record is not None:
                    self._records.append(record)

    def _parse(self, number: int, raw_line: bytes) -> _Record | None:
        """Check one line: JSON object, keys and types, both images readable and of the same size."""
        where = str(self.prompt_path)
        try:
            entry = json.loads(raw_line.decode("utf-8"))
        except UnicodeDecodeError:
            return self._bad(number, where, "not valid UTF-8")
        except json.JSONDecodeError as exc:
            return self._bad(number, where, f"not valid JSON ({exc.msg} at column {exc.colno})")
        if not isinstance(entry, dict):
            return self._bad(number, where, f"expected a JSON object, got {type(entry).__name__}")
        for key in REQUIRED_KEYS:
            if key not in entry:
                return self._bad(number, where, f'missing key "{key}"')
            if not isinstance(entry[key], str):
                return self._bad(number, where, f'"{key}" must be a string, got {type(entry[key]).__name__}')
        sizes = {}
        for key in ("source", "target"):
            name = entry[key]
            path = self.root / name
            if not path.is_file():
                return self._bad(number, str(path), f"{key} image {name} not found")
            try:
                sizes[key] = _image_size(path)
            except ImageTooLarge as exc:
                return self._bad(number, str(path), f"{key} image {name} is too large: {exc}")
            except (OSError, UnidentifiedImageError, ValueError) as exc:
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                return self._bad(number, str(path), f"{key} image {name} is not a readable image ({reason})")
        if sizes["source"] != sizes["target"]:
            (sw, sh), (tw, th) = sizes["source"], sizes["target"]
            source, target = entry["source"], entry["target"]
            return self._bad(
                number,
                str(self.root / source),
                f"source image {source} is {sw}x{sh} but target image {target} is {tw}x{th}",
            )
        return _Record(number, self.root / entry["source"], self.root / entry["target"], entry["prompt"],
                       sizes["target"])

    def _check_one_size(self) -> None:
        """Items are stacked into batches, which needs one image size: say which lines differ, and what to pass."""
        first: dict[tuple[int, int], int] = {}
        for record in self._records:
            first.setdefault(record.size, record.line)
        if len(first) > 1:
            shown = ", ".join(f"{w}x{h} (first on line {line})" for (w, h), line in list(first.items())[:3])
            more = f" and {len(first) - 3} more" if len(first) > 3 else ""
            raise DatasetError(f"{self.prompt_path}: images of {len(first)} sizes: {shown}{more}; a batch needs one "
                               "size: resize them all with size=N (tutorial_train.py --image_size N)")

    def report(self) -> str:
        """One-paragraph summary: usable items, empty prompts, and each skipped line with its reason."""
        lines = [
            f"{self.prompt_path}: {len(self._records)} items, {len(self.skipped)} skipped, "
            f"{self.empty_prompts} with empty prompt"
        ]
        lines += [f"  line {bad.line}: {bad.reason} [{bad.file}]" for bad in self.skipped]
        return "\n".join(lines)

    # -- reading ----------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._records)

    def _load(self, record: _Record, path: Path, matte: int) -> np.ndarray:
        """Decode one image to uint8 RGB (resized if ``size``), or raise ``DatasetError`` naming it."""
        array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if array is None:
            raise DatasetError(f"{self.prompt_path}:{record.line}: cannot decode image {path}")
        try:
            rgb = _to_uint8_rgb(array, matte)
        except ValueError as exc:
            raise DatasetError(f"{self.prompt_path}:{record.line}: image {path}: {exc}") from None
        if self.size is not None and rgb.shape[:2] != (self.size, self.size):
            shrinking = self.size < max(rgb.shape[:2])
            interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
            rgb = cv2.resize(rgb, (self.size, self.size), interpolation=interpolation)
        return rgb

    def prompt(self, index: int) -> str:
        """The prompt item ``index`` will carry (after dropout), without decoding its images."""
        return "" if self._dropped[index] else self._records[index].prompt

    def target_path(self, index: int) -> Path:
        """The file of item ``index``'s target image (what a latent cache keys on)."""
        return self._records[index].target

    def hint(self, index: int) -> np.ndarray:
        """Item ``index``'s hint alone, as ``self[index]["hint"]`` (HWC float32 in [0, 1]); the target is not read."""
        record = self._records[index]
        return self._load(record, record.source, matte=0).astype(np.float32) / 255.0

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._records[index]
        target = self._load(record, record.target, matte=255)
        return {
            "jpg": target.astype(np.float32) / 127.5 - 1.0,
            "txt": self.prompt(index),
            "hint": self.hint(index),
        }
