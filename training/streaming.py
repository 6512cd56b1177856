"""Tar shards in WebDataset's layout, streamed: never extracted, each rank and each loader worker reading shards of
its own, resumed exactly where the stream stopped.

A shard holds samples as consecutive members sharing a key: `KEY.jpg|jpeg|png|webp` (the target), optionally
`KEY.hint.png` (the hint; any image suffix after `hint.`), and `KEY.txt` or `KEY.json` (the caption; a JSON object's
`caption`, `text` or `prompt`). `training/make_webdataset.py` writes any other layout as shards.

Order. Epoch e visits the shards in `epoch_permutation(n_shards, seed, e)`, the permutation the map-style sampler
draws; of S = ranks x workers *slots*, slot s reads every S-th shard from s on, each shard's samples in file order.
With one sample per shard and one slot this is exactly `ResumableSampler`'s order. Shards are shuffled, samples
within a shard are not: write shards from shuffled items (`make_webdataset.py --shuffle`).

Position. A batch comes whole from one slot and carries `stream_position` = (slot, epoch, shard, item, skipped):
where that slot reads next. `ExactResume` notes the batches training consumed and saves every slot's position with
the checkpoint; a resumed slot reopens its shard and passes over the samples it had read. The loader takes batches
from its workers in turn, so after B batches worker w takes up slot (w + B) mod W: the resumed batches come in the
uninterrupted run's order. Memory stays flat however long the stream: a slot holds one shard's reader and one
batch.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ldm.errors import InputError, MissingFileError
from ldm.modules.encoders.conditioner import SIZE_KEYS
from training.dataset import place_pair, training_item
from training.geometry import Geometry
from training.hints import HintMaker
from training.images import HINT_MATTE, TARGET_MATTE, ImageTooLarge, decode_image, image_size
from training.loop import worker_init
from training.order import DataOrder, epoch_permutation, rank_and_world
from training.sources import DatasetError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
HINT_EXTENSIONS = tuple(f"hint.{suffix}" for suffix in IMAGE_EXTENSIONS)
CAPTION_FIELDS = ("caption", "text", "prompt")
POSITION_KEY = "stream_position"
Position = tuple[int, int, int, int]  # epoch, shard (in the slot's list), samples read of it, skipped so far


def _webdataset() -> Any:
    try:
        from webdataset import tariterators
    except ImportError:
        raise InputError("tar shards need the webdataset package: pip install webdataset") from None
    return tariterators


def expand_shards(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """The shard files of `spec`: brace patterns (`data/{00000..00099}.tar`), a folder of `.tar` files, or a list."""
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    paths: list[Path] = []
    for item in specs:
        text = str(item)
        if "{" not in text and Path(text).is_dir():
            found = sorted(Path(text).glob("*.tar"))
            if not found:
                raise DatasetError(f"{text}: no .tar shards in this folder")
            paths += found
            continue
        from braceexpand import braceexpand  # installed with webdataset

        paths += [Path(name) for name in braceexpand(text)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise MissingFileError(f"{missing[0]}: shard not found ({len(missing)} of {len(paths)} shards missing)")
    if not paths:
        raise DatasetError(f"{spec}: names no shards")
    return paths


def _unit_hash(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little")


class ShardStream(DataOrder, IterableDataset):
    """Training batches streamed from tar shards (see the module docstring), items made as every layout's are
    (`training.dataset.place_pair`). Iterate `loader()`, which batches in the workers and knows the rank.

    Args:
        shards: brace pattern(s), a folder of `.tar` files, or a list of shard paths.
        batch_size: items per batch (a batch comes from one slot).
        num_workers: loader worker processes; a resumed run must use the same number.
        geometry, hint_maker: as `PairedDataset`'s.
        drop_prompt: probability of an item's prompt becoming `""`, fixed per item from (seed, shard, key).
        seed: shard order and per-item randomness.
        skip_bad: skip unusable samples (each named on stderr, counted in `stream_position`) instead of failing.
        shuffle: shuffle the shards each epoch (off: shard order as given, every epoch).
        size_conditioning: also give each item's original size, crop and output size (SDXL's conditionings).
    """

    def __init__(self, shards: str | Path | Sequence[str | Path], *, batch_size: int, num_workers: int = 0,
                 geometry: Geometry | None = None, hint_maker: HintMaker | None = None, drop_prompt: float = 0.0,
                 seed: int = 0, skip_bad: bool = False, shuffle: bool = True, size_conditioning: bool = False) -> None:
        _webdataset()
        self.size_conditioning = size_conditioning
        if not 0.0 <= drop_prompt <= 1.0:
            raise ValueError(f"drop_prompt must be in [0, 1], got {drop_prompt}")
        self.shards = expand_shards(shards)
        self.description = f"{len(self.shards)} shards ({self.shards[0]}{' ...' if len(self.shards) > 1 else ''})"
        self.batch_size, self.num_workers = batch_size, num_workers
        self.geometry, self.hint_maker = geometry or Geometry(), hint_maker
        self.drop_prompt, self.seed, self.skip_bad, self.shuffle = drop_prompt, seed, skip_bad, shuffle
        #: Where each slot reads next, from the batches training consumed (and the checkpoint resumed from).
        self.positions: dict[int, Position] = {}
        self.rank, self.world = 0, 1
        self._resume_steps, self._samples_per_step = 0, 0

    # ----- DataOrder ---------------------------------------------------------------------------------------
    def resume_at(self, steps: int, samples_per_step: int) -> None:
        self._resume_steps, self._samples_per_step = steps, samples_per_step

    def observe(self, batch: Any) -> None:
        slot, *position = (int(v) for v in batch[POSITION_KEY].tolist())
        self.positions[slot] = tuple(position)  # type: ignore[assignment]

    def state_dict(self) -> dict[str, Any]:
        positions = dict(self.positions)
        if dist.is_available() and dist.is_initialized():  # each rank knows its own slots: the checkpoint has all
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, positions)
            positions = {slot: pos for part in gathered for slot, pos in part.items()}
        return {"positions": {slot: list(pos) for slot, pos in positions.items()}, "workers": self.num_workers,
                "shards": len(self.shards)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("workers") != self.num_workers:
            raise InputError(f"cannot resume the stream exactly: the checkpoint's run had --num_workers "
                             f"{state.get('workers')}, this one {self.num_workers}: resume with the same number")
        if state.get("shards") != len(self.shards):
            raise InputError(f"cannot resume the stream exactly: the checkpoint's run read {state.get('shards')} "
                             f"shards, this one names {len(self.shards)}: resume with the same --data")
        self.positions = {int(slot): tuple(pos) for slot, pos in state["positions"].items()}  # type: ignore[misc]

    # ----- iteration ---------------------------------------------------------------------------------------
    def loader(self, pin_memory: bool = False) -> DataLoader:
        """The data loader to train from: batches made in the workers, the rank noted as iteration starts."""
        return _StreamLoader(self, batch_size=None, num_workers=self.num_workers,
                             persistent_workers=self.num_workers > 0, pin_memory=pin_memory, worker_init_fn=worker_init)

    def skipped(self) -> int:
        """Samples skipped so far by the slots whose batches this process consumed."""
        return sum(position[3] for position in self.positions.values())

    def report(self) -> str:
        return (f"{self.description}: streamed, {self.skipped()} samples skipped so far"
                f"{' (each named above)' if self.skipped() else ''}")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        slots = self.world * workers
        if len(self.shards) < slots:
            raise DatasetError(f"{self.description}: {len(self.shards)} shards for {self.world} ranks x {workers} "
                               f"loader workers: each reads shards of its own, so write at least {slots} shards "
                               "(make_webdataset.py --shard_size) or use fewer workers")
        per_rank_batches = self._resume_steps * self._samples_per_step // (self.batch_size * self.world)
        slot = self.rank * workers + (worker + per_rank_batches) % workers
        return self._batches(slot, slots)

    def _shard_list(self, epoch: int, slot: int, slots: int) -> list[int]:
        order = epoch_permutation(len(self.shards), self.seed, epoch) if self.shuffle else range(len(self.shards))
        return list(order)[slot::slots]

    def _batches(self, slot: int, slots: int) -> Iterator[dict[str, Any]]:
        epoch, shard, start, skipped = self.positions.get(slot, (0, 0, 0, 0))
        items: list[dict[str, Any]] = []
        wheres: list[str] = []
        while True:
            whole_epoch, found = shard == 0 and start == 0, False
            shard_list = self._shard_list(epoch, slot, slots)
            for shard in range(shard, len(shard_list)):  # noqa: B020 - resumes at the saved shard
                path = self.shards[shard_list[shard]]
                for read, sample in self._samples(path, start):
                    item = None if sample is None else self._item(sample, path, epoch)
                    if item is None:
                        skipped += 1
                        continue
                    found = True
                    items.append(item)
                    wheres.append(f"{path} key {sample['__key__']}")  # type: ignore[index]
                    if len(items) == self.batch_size:
                        yield self._collate(items, wheres, [slot, epoch, shard, read, skipped])
                        items, wheres = [], []
                start = 0
            if whole_epoch and not found:
                raise DatasetError(f"{self.description}: the shards of loader slot {slot} hold no usable sample")
            epoch, shard = epoch + 1, 0

    def _samples(self, path: Path, start: int) -> Iterator[tuple[int, dict[str, Any] | None]]:
        """(samples read so far, sample) of one shard, from sample `start` on. A truncated or corrupt tar is an
        error naming the shard; with `skip_bad` its rest is skipped, marked by one `(read, None)`."""
        tariterators = _webdataset()
        read = 0
        try:
            with open(path, "rb") as stream:
                members = ({**member, "__url__": str(path)} for member in tariterators.tar_file_iterator(stream))
                for sample in tariterators.group_by_keys(members):
                    read += 1
                    if read > start:
                        yield read, sample
        except (tarfile.TarError, OSError, EOFError, ValueError) as err:
            message = f"{path}: corrupt or truncated shard after {read} samples ({str(err).splitlines()[0]})"
            if not self.skip_bad:
                raise DatasetError(message) from None
            print(f"skipped: {message}", file=sys.stderr)
            yield read, None

    def _item(self, sample: dict[str, Any], path: Path, epoch: int) -> dict[str, Any] | None:
        key = sample["__key__"]
        where = f"{path} key {key}"
        try:
            target_suffix = next((s for s in IMAGE_EXTENSIONS if s in sample), None)
            if target_suffix is None:
                members = ", ".join(f"{key}.{s}" for s in sample if not s.startswith("__"))
                raise DatasetError(f"{where}: no target image ({key}.jpg, .png or .webp); found {members}")
            caption = self._caption(sample, where)
            target = self._decode(sample[target_suffix], TARGET_MATTE, f"{where}: {key}.{target_suffix}")
            hint = None
            hint_suffix = next((s for s in HINT_EXTENSIONS if s in sample), None)
            if hint_suffix is not None and self.hint_maker is None:
                hint = self._decode(sample[hint_suffix], HINT_MATTE, f"{where}: {key}.{hint_suffix}")
            rng = np.random.default_rng(_unit_hash(self.seed, path.name, key, epoch))
            target, hint, placement = place_pair(target, hint, self.geometry, self.hint_maker, rng, where)
        except DatasetError as err:
            if not self.skip_bad:
                raise
            print(f"skipped: {err}", file=sys.stderr)
            return None
        dropped = _unit_hash("drop", self.seed, path.name, key) / 2.0**64 < self.drop_prompt
        return training_item(target, hint, "" if dropped else caption,
                             placement if self.size_conditioning else None)

    @staticmethod
    def _caption(sample: dict[str, Any], where: str) -> str:
        if "txt" in sample:
            try:
                return sample["txt"].decode("utf-8").strip()
            except UnicodeDecodeError:
                raise DatasetError(f"{where}: caption .txt is not UTF-8 text") from None
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise DatasetError(f"{where}: .json is not valid JSON ({err})") from None
            field = next((f for f in CAPTION_FIELDS if isinstance(meta, dict) and isinstance(meta.get(f), str)), None)
            if field is None:
                raise DatasetError(f"{where}: .json has no text field {', '.join(CAPTION_FIELDS)}")
            return meta[field].strip()
        raise DatasetError(f"{where}: no caption (.txt or .json)")

    @staticmethod
    def _decode(data: bytes, matte: int, what: str) -> np.ndarray:
        try:
            image_size(data)
            return decode_image(data, matte)
        except ImageTooLarge as err:
            raise DatasetError(f"{what} is too large: {err}") from None
        except (OSError, ValueError) as err:
            raise DatasetError(f"{what} is not a readable image ({str(err).splitlines()[0]})") from None

    def _collate(self, items: list[dict[str, Any]], wheres: list[str], position: list[int]) -> dict[str, Any]:
        shapes = {item["jpg"].shape for item in items}
        if len(shapes) > 1:
            first = items[0]["jpg"].shape
            odd = next(i for i, item in enumerate(items) if item["jpg"].shape != first)
            raise DatasetError(f"{wheres[odd]}: is {items[odd]['jpg'].shape[1]}x{items[odd]['jpg'].shape[0]} but "
                               f"{wheres[0]} is {first[1]}x{first[0]}; a batch needs one size: pass --resolution N "
                               "(or --image_size N)")
        batch = {"jpg": torch.from_numpy(np.stack([item["jpg"] for item in items])),
                 "hint": torch.from_numpy(np.stack([item["hint"] for item in items])),
                 "txt": [item["txt"] for item in items],
                 POSITION_KEY: torch.tensor(position, dtype=torch.long)}
        for key in SIZE_KEYS:  # SDXL's size conditionings, when the items carry them
            if key in items[0]:
                batch[key] = torch.from_numpy(np.stack([item[key] for item in items]))
        return batch


class _StreamLoader(DataLoader):
    """Notes the rank in the stream before workers copy it (in a worker, the process group is not visible)."""

    def __iter__(self) -> Any:
        self.dataset.rank, self.dataset.world = rank_and_world()  # type: ignore[attr-defined]
        return super().__iter__()
