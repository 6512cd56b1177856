"""Paired (hint, target, prompt) training items, from any layout (`training/sources.py`), made to one geometry.

Items match the original ControlNet tutorial data set: `jpg` is the target as float32 HWC RGB in [-1, 1], `hint`
the hint as float32 HWC RGB in [0, 1], `txt` the prompt. `ControlDataset` is the tutorial's `prompt.json` folder;
`open_dataset` opens any layout.

Why validate at construction: a typo on line 31 207 of a 50k-line file should fail in a second, naming the line,
not hours into an epoch. Construction therefore parses every line or row and opens every image header (only the
header: this is cheap); pixels are decoded lazily in `__getitem__`. A file whose header is fine but whose pixel data
is corrupt is only caught on reading; it then raises `DatasetError` naming the file and line.

Indices may carry the epoch (`epoch * len + item`, as `ResumableSampler(..., with_epochs=True)` and
`BucketBatchSampler` give them): per-epoch randomness (a random crop, random canny thresholds) is then drawn from
(seed, epoch, item), so runs repeat and resume exactly. Image conversions are those of `training/images.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from training.geometry import Geometry, Placement
from training.hints import HintMaker
from training.sources import (
    BadLine,
    Columns,
    DatasetError,
    ItemSource,
    PromptJsonSource,
    first_of_each_size,
    open_source,
)

__all__ = ["BadLine", "ControlDataset", "DatasetError", "PairedDataset", "open_dataset", "place_pair", "training_item"]


class PairedDataset(Dataset):
    """Training items from `source`, placed by `geometry`, hints made by `hint_maker` where the source has none.

    Args:
        source: where items come from (`training.sources`).
        geometry: the size items are made to (`training.geometry`); by default as stored, which needs one size.
        hint_maker: makes a hint from the placed target (`--hint`); used for every item when given.
        drop_prompt: probability of replacing an item's prompt with `""` (classifier-free guidance training). The
            choice is fixed per item: a boolean mask over the items is drawn once from
            `numpy.random.default_rng(seed)`, so the same items lose their prompt in every epoch and run.
        seed: seed of the dropout mask and of per-item randomness.
    """

    def __init__(self, source: ItemSource, *, geometry: Geometry | None = None, hint_maker: HintMaker | None = None,
                 drop_prompt: float = 0.0, seed: int = 0, size_conditioning: bool = False) -> None:
        if not 0.0 <= drop_prompt <= 1.0:
            raise ValueError(f"drop_prompt must be in [0, 1], got {drop_prompt}")
        self.size_conditioning = size_conditioning
        self.source = source
        self.geometry = geometry or Geometry()
        self.hint_maker = hint_maker
        self.drop_prompt = drop_prompt
        self.seed = seed
        self.skipped: list[BadLine] = source.skipped
        if not len(source):
            raise DatasetError(f"{source.description}: no usable {source.unit} ({len(self.skipped)} skipped)")
        if self.geometry == Geometry():
            self._check_one_size()
        self.empty_prompts = sum(1 for i in range(len(source)) if not source.caption(i))
        self._dropped = np.random.default_rng(seed).random(len(source)) < drop_prompt

    def _check_one_size(self) -> None:
        """Items are stacked into batches, which needs one image size: say which items differ, and what to pass."""
        first = first_of_each_size(self.source, range(len(self.source)))
        if len(first) > 1:
            shown = ", ".join(f"{w}x{h} (first on {self.source.first_line_of(i)})"
                              for (w, h), i in list(first.items())[:3])
            more = f" and {len(first) - 3} more" if len(first) > 3 else ""
            raise DatasetError(f"{self.source.description}: images of {len(first)} sizes: {shown}{more}; a batch "
                               "needs one size: resize them all with size=N (tutorial_train.py --image_size N), or "
                               "--resolution N (with --buckets to keep aspect ratios)")

    @property
    def varies(self) -> bool:
        """Whether items differ between epochs (then indices should carry the epoch)."""
        return self.geometry.varies or bool(self.hint_maker and self.hint_maker.varies)

    def report(self) -> str:
        """One-paragraph summary: usable items, empty prompts, and each skipped item with its reason."""
        lines = [f"{self.source.description}: {len(self)} items, {len(self.skipped)} skipped, "
                 f"{self.empty_prompts} with empty prompt"]
        lines += [f"  {'line ' + str(bad.line) + ': ' if bad.line else ''}{bad.reason} [{bad.file}]"
                  for bad in self.skipped]
        return "\n".join(lines)

    def __len__(self) -> int:
        return len(self.source)

    def prompt(self, index: int) -> str:
        """The prompt item `index` will carry (after dropout), without decoding its images."""
        index %= len(self)
        return "" if self._dropped[index] else self.source.caption(index)

    def output_size(self, index: int) -> tuple[int, int]:
        """The (width, height) item `index` comes out at: its bucket, with `--buckets`."""
        return self.geometry.output_size(*self.source.size(index % len(self)))

    def cache_identity(self, index: int) -> str:
        """What a cached latent of this item depends on: the target's bytes and the geometry."""
        if self.varies:
            raise DatasetError("items that change between epochs (a random crop) cannot be cached: drop --cache, or "
                               "use --crop center")
        return f"{self.source.identity(index % len(self))}:{self.geometry}"

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index // len(self), index % len(self)])

    def placed(self, index: int) -> tuple[np.ndarray, np.ndarray, Placement]:
        """Target and hint (uint8 RGB) at the output geometry, and where they came from."""
        item = index % len(self)
        raw = self.source.load(item)
        return place_pair(raw.target, raw.hint, self.geometry, self.hint_maker, self._rng(index),
                          self.source.where(item))

    def hint(self, index: int) -> tuple[np.ndarray, Placement]:
        """Item `index`'s hint as `self[index]["hint"]` (HWC float32 in [0, 1]) and its placement, without the
        target (what a cached item needs)."""
        _, hint, placement = self.placed(index)
        return hint.astype(np.float32) / 255.0, placement

    def __getitem__(self, index: int) -> dict[str, Any]:
        target, hint, placement = self.placed(index)
        return training_item(target, hint, self.prompt(index), placement if self.size_conditioning else None)


def place_pair(target: np.ndarray, hint: np.ndarray | None, geometry: Geometry, hint_maker: HintMaker | None,
               rng: np.random.Generator, where: str) -> tuple[np.ndarray, np.ndarray, Placement]:
    """One item's target and hint (uint8 RGB) at `geometry`, the hint made from the placed target when
    `hint_maker` is given (then a stored hint is ignored): the one path every layout's items take."""
    if hint_maker is not None:
        hint = None
    elif hint is None:
        raise DatasetError(f"{where}: no hint (this layout has none here): make them with --hint PREPROCESSOR")
    if hint is not None and hint.shape[:2] != target.shape[:2]:
        raise DatasetError(f"{where}: hint is {hint.shape[1]}x{hint.shape[0]} but the target is "
                           f"{target.shape[1]}x{target.shape[0]}")
    target, hint, placement = geometry.place(target, hint, rng)
    if hint is None:
        hint = hint_maker(target, rng)  # type: ignore[misc]
    return target, hint, placement


def training_item(target: np.ndarray, hint: np.ndarray, prompt: str, placement: Placement | None = None
                  ) -> dict[str, Any]:
    """The original tutorial's item: `jpg` in [-1, 1], `hint` in [0, 1] (float32 HWC), `txt`; with `placement`,
    also SDXL's size conditionings as sgm's batch keys name them: the original (height, width), the crop's (top,
    left) in the resized image, and the output (height, width)."""
    item = {"jpg": target.astype(np.float32) / 127.5 - 1.0, "txt": prompt, "hint": hint.astype(np.float32) / 255.0}
    if placement is not None:
        item.update(size_conditionings(placement))
    return item


def size_conditionings(placement: Placement) -> dict[str, np.ndarray]:
    """SDXL's size conditionings of an item placed so, as sgm's batch keys name them: the original (height, width),
    the crop's (top, left) in the resized image, and the output (height, width)."""
    (width, height), (left, top), (out_w, out_h) = placement.original_size, placement.crop_offset, \
        placement.output_size
    return {"original_size_as_tuple": np.array([height, width], np.float32),
            "crop_coords_top_left": np.array([top, left], np.float32),
            "target_size_as_tuple": np.array([out_h, out_w], np.float32)}


class ControlDataset(PairedDataset):
    """ControlNet training pairs listed in `root/prompt.json` (the Fill50K layout), the original tutorial's.

    Args:
        root: folder holding `prompt.json`; image paths in it are relative to this folder.
        skip_bad: when False (default) the first bad line raises `DatasetError`; when True bad lines are skipped
            and recorded in `skipped` (see `report()`).
        drop_prompt, seed: as `PairedDataset`.
        size: if given, both images are resized to `size` x `size` (aspect ratio is not kept).
    """

    def __init__(self, root: str | Path, *, skip_bad: bool = False, drop_prompt: float = 0.0, seed: int = 0,
                 size: int | None = None) -> None:
        if size is not None and size < 1:
            raise ValueError(f"size must be positive, got {size}")
        self.source: PromptJsonSource = PromptJsonSource(root, skip_bad)
        self.root, self.prompt_path = self.source.root, self.source.prompt_path
        self.size, self.skip_bad = size, skip_bad
        super().__init__(self.source, geometry=Geometry(square=size), drop_prompt=drop_prompt, seed=seed)

    @property
    def _records(self) -> list[Any]:
        return self.source.records

    def target_path(self, index: int) -> Path:
        """The file of item `index`'s target image (what a latent cache keys on)."""
        return self.source.target_path(index % len(self))


def open_dataset(path: str | Path, *, data_format: str | None = None, columns: Columns | None = None,
                 conditioning_dir: str | Path | None = None, skip_bad: bool = False, geometry: Geometry | None = None,
                 hint_maker: HintMaker | None = None, drop_prompt: float = 0.0, seed: int = 0,
                 size_conditioning: bool = False) -> PairedDataset:
    """The training items of PATH, whatever its map-style layout (see `training/sources.py`); with
    `size_conditioning` (SDXL) each item also says its original size, crop and output size."""
    source = open_source(path, data_format, columns or Columns(), conditioning_dir, skip_bad,
                         need_hints=hint_maker is None)
    if isinstance(source, PromptJsonSource) and hint_maker is None and (geometry is None or geometry.square) \
            and not size_conditioning:
        return ControlDataset(path, skip_bad=skip_bad, drop_prompt=drop_prompt, seed=seed,
                              size=None if geometry is None else geometry.square)
    return PairedDataset(source, geometry=geometry, hint_maker=hint_maker, drop_prompt=drop_prompt, seed=seed,
                         size_conditioning=size_conditioning)
