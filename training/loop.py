"""What training needs besides the model: an exactly resumable data order, RNG state in checkpoints,
atomic checkpoint writes, a periodic `last.ckpt`, and a samples/s meter.

A run stopped and resumed from `last.ckpt` gives the same weights as one that was not stopped: the data
order is a function of (seed, position in the stream) and the position follows from the restored step;
the RNG states travel in the checkpoint and are put back right before the first resumed step.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """An endless stream of dataset indices: epoch e is a permutation drawn from (seed, e).

    The stream is split across data-parallel ranks by interleaving (rank r takes positions r, r + W, ...),
    and `start` (samples already consumed by all ranks together) skips what a resumed run has seen.
    """

    def __init__(self, dataset_size: int, seed: int = 0, shuffle: bool = True) -> None:
        if dataset_size <= 0:
            raise ValueError("the dataset is empty")
        self.dataset_size = dataset_size
        self.seed = seed
        self.shuffle = shuffle
        self.start = 0

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.dataset_size)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.dataset_size, generator=generator)

    def __iter__(self) -> Iterator[int]:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() \
            else (0, 1)
        position = self.start + rank
        epoch, order = -1, torch.empty(0, dtype=torch.long)
        while True:
            if position // self.dataset_size != epoch:
                epoch = position // self.dataset_size
                order = self._order(epoch)
            yield int(order[position % self.dataset_size])
            position += world


def _capture_rng() -> dict[str, Any]:
    numpy_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (numpy_state[0], torch.from_numpy(numpy_state[1].copy()), *numpy_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class ExactResume(pl.Callback):
    """Saves RNG states with each checkpoint and, on resume, restores them and the data position.

    RNG states are put back right before the first resumed step, after Lightning has set up data loading
    (which draws from the global RNG), so the resumed steps see the same noise and timesteps.
    """

    def __init__(self, sampler: ResumableSampler, samples_per_step: int) -> None:
        self.sampler = sampler
        self.samples_per_step = samples_per_step
        self._pending_rng: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "ExactResume"

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _capture_rng(), "samples_per_step": self.samples_per_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("samples_per_step") != self.samples_per_step:
            raise ValueError(
                f"cannot resume exactly: the checkpoint was trained with {state_dict.get('samples_per_step')} "
                f"samples per step, this run has {self.samples_per_step} (batch size x accumulation x devices)"
            )
        self._pending_rng = state_dict["rng"]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.sampler.start = trainer.global_step * self.samples_per_step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending_rng is not None:
            _restore_rng(self._pending_rng)
            self._pending_rng = None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file beside the target, then renames it into place.

    A crash or a full disk mid-write leaves the previous checkpoint intact.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
                        ) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise


class LastCheckpoint(pl.Callback):
    """Keeps `<dirpath>/last.ckpt` current: every `every_n_steps` optimizer steps and when training ends."""

    def __init__(self, dirpath: str | Path, every_n_steps: int) -> None:
        if every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be positive, got {every_n_steps}")
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_steps = every_n_steps
        self._saved_step = -1

    def _save(self, trainer: pl.Trainer) -> None:
        if trainer.global_step != self._saved_step:
            trainer.save_checkpoint(self.path, weights_only=False)  # optimizer and RNG too
            self._saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0:
            self._save(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer)


class Throughput(pl.Callback):
    """Logs training samples per second (all devices together) to the progress bar and the metrics."""

    def __init__(self, samples_per_batch: int) -> None:
        self.samples_per_batch = samples_per_batch
        self._last: float | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.perf_counter()
        if self._last is not None:
            rate = self.samples_per_batch * trainer.world_size / max(now - self._last, 1e-9)
            pl_module.log("samples_per_sec", rate, prog_bar=True, on_step=True, on_epoch=False, rank_zero_only=True)
        self._last = now
