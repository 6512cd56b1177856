"""What training needs besides the model: an exactly resumable data order, RNG state in checkpoints,
atomic checkpoint writes, a periodic `last.ckpt` that never holds non-finite weights, and a samples/s meter.

A run stopped and resumed from `last.ckpt` gives the same weights as one that was not stopped: the data
order is a function of (seed, position in the stream) and the position follows from the restored step;
the RNG states travel in the checkpoint and are put back right before the first resumed step.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.seed import pl_worker_init_function
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.nn.utils import get_total_norm

from cldm.checkpoint import CheckpointError, atomic_write, check_resumable, stale_temporaries
from ldm.errors import InputError, TrainingDiverged
from training.order import DataOrder, ResumableSampler

#: Where `--keep_last` keeps numbered checkpoints, under the run's folder.
NUMBERED_DIR = "checkpoints"

__all__ = ["AtomicCheckpointIO", "DataOrder", "ExactResume", "LastCheckpoint", "ResumableSampler",
           "StopOnNonFiniteGradients", "Throughput", "newest_resumable", "non_finite", "numbered_checkpoints",
           "worker_init"]


def worker_init(worker_id: int) -> None:
    """A DataLoader worker's start: it ignores Ctrl-C, which a terminal sends to every process of the run, so that
    the main process can finish its step and save (`LastCheckpoint`); then the seeding that Lightning gives workers
    when no `worker_init_fn` is set (`seed_everything(workers=True)`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pl_worker_init_function(worker_id)


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
    """Saves RNG states and the data position with each checkpoint and, on resume, restores them.

    The data position is set as the checkpoint is loaded, before Lightning creates the data loader's iterator
    (which starts drawing indices, and starts worker processes, before `on_train_start`). RNG states are put back
    right before the first resumed step, after Lightning has set up data loading (which draws from the global
    RNG), so the resumed steps see the same noise and timesteps.
    """

    def __init__(self, order: DataOrder, samples_per_step: int) -> None:
        self.order = order
        self.samples_per_step = samples_per_step
        self._pending_rng: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "ExactResume"

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _capture_rng(), "samples_per_step": self.samples_per_step, "order": self.order.state_dict()}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
                           ) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is None:
            raise InputError("cannot resume exactly: the checkpoint holds no data position (it was not written by "
                             "tutorial_train.py); train from it with --resume_path instead of --resume")
        if state.get("samples_per_step") != self.samples_per_step:
            raise InputError(
                f"cannot resume exactly: the checkpoint was trained with {state.get('samples_per_step')} "
                f"samples per step, this run has {self.samples_per_step} (batch size x accumulation x devices): "
                "resume with the same --batch_size, --accumulate_grad_batches and --devices"
            )
        self.order.load_state_dict(state.get("order", {}))
        self.order.resume_at(int(checkpoint["global_step"]), self.samples_per_step)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_rng = state_dict["rng"]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending_rng is not None:
            _restore_rng(self._pending_rng)
            self._pending_rng = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.order.observe(batch)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint with `cldm.checkpoint.atomic_write`: a crash or a full disk mid-write leaves the
    previous checkpoint intact (and at worst a `.last.ckpt.*.tmp`, which `LastCheckpoint` removes next time)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
                        ) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(target, lambda tmp: torch.save(checkpoint, tmp), overwrite=True)


def non_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether any element of `tensors` is inf or NaN: one fused max-abs pass, which (unlike a sum of squares)
    does not overflow on large but finite values."""
    return bool(tensors) and not bool(torch.isfinite(get_total_norm(tensors, float("inf"))))


class LastCheckpoint(pl.Callback):
    """Keeps `<dirpath>/last.ckpt` current: every `every_n_steps` optimizer steps, when training ends, and when it is
    stopped by SIGTERM (a cluster's preemption, `kill`): Lightning then ends the batch under way and stops, and when
    that batch completed an optimizer step the state is one a resume continues exactly. Stopped between the batches
    of one accumulated step (`--accumulate_grad_batches`), nothing is saved: the last periodic checkpoint stands.

    The first Ctrl-C (SIGINT) asks for a stop rather than raising in the middle of an update: training goes on to
    the end of the optimizer step under way, saves there (a periodic save's state, which resumes exactly) and
    stops; `interrupted_at` is then that step. Every rank stops at the same step (the request is reduced across
    them). A second Ctrl-C raises KeyboardInterrupt at once, as usual, and saves nothing. The handler is set when
    training starts (after Lightning saved the handlers it restores at the end, whatever way fit ends) and put back
    at teardown or on an exception; where SIGINT was ignored (a script's background job) it stays so. DataLoader
    workers ignore Ctrl-C themselves (`worker_init`).

    Never from non-finite weights: before each write the trainable weights are checked, and if the last update
    made any of them inf or NaN nothing is written and training stops (`TrainingDiverged`), so `last.ckpt` always
    holds the last finite state. `status()` names it for messages. At the start, temporary files that a killed
    write left beside `last.ckpt` are removed (they can be as large as a checkpoint).
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int, keep_last: int = 0) -> None:
        if every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be positive, got {every_n_steps}")
        if keep_last < 0:
            raise ValueError(f"keep_last must be 0 or more, got {keep_last}")
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_steps = every_n_steps
        self.keep_last = keep_last
        #: The step of the state `last.ckpt` holds, when this run wrote it or resumed from it.
        self.written_step: int | None = None
        #: Whether the last batch completed an optimizer step (not one batch of several accumulated).
        self._at_step_boundary = False
        self._seen_step = 0
        #: The step at which a Ctrl-C stopped training (saved there), or None.
        self.interrupted_at: int | None = None
        self._stop_requested = False
        self._sigint_installed = False
        self._previous_sigint: Any = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_requested, self.interrupted_at = False, None
        if trainer.is_global_zero:
            stale = stale_temporaries(self.path)
            for path in stale:
                path.unlink(missing_ok=True)
            if stale:
                print(f"removed {len(stale)} temporary file(s) that an interrupted write of {self.path} left behind")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen_step = trainer.global_step
        if trainer.ckpt_path is not None and Path(trainer.ckpt_path) == self.path:
            self.written_step = trainer.global_step  # resumed from it
        main_thread = threading.current_thread() is threading.main_thread()  # the only one that may set handlers
        if main_thread and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_ctrl_c)
            self._sigint_installed = True

    def _on_ctrl_c(self, signum: int, frame: Any) -> None:
        """The first Ctrl-C: stop at the end of this optimizer step; the next one interrupts as Python does."""
        if self._stop_requested:
            self._restore_sigint()
            raise KeyboardInterrupt
        self._stop_requested = True
        print(f"\nCtrl-C: stopping at the end of this step and saving {self.path} (press Ctrl-C again to stop at "
              "once, without saving)", file=sys.stderr, flush=True)

    def _restore_sigint(self) -> None:
        if self._sigint_installed:
            # None: the handler was not set from Python; Python's own one stands in for it.
            signal.signal(signal.SIGINT, signal.default_int_handler if self._previous_sigint is None
                          else self._previous_sigint)
            self._sigint_installed = False

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_sigint()

    def _save(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step == self.written_step:
            return
        weights = [p.detach() for p in pl_module.parameters() if p.requires_grad]
        if non_finite(weights):
            raise TrainingDiverged(f"the update of step {trainer.global_step} made the weights non-finite: they "
                                   "were not saved and training stopped (try a lower learning rate)")
        trainer.save_checkpoint(self.path, weights_only=False)  # optimizer and RNG too
        self.written_step = trainer.global_step
        if self.keep_last and trainer.is_global_zero:
            self._keep_numbered(trainer.global_step)

    def _keep_numbered(self, step: int) -> None:
        """`checkpoints/step-N.ckpt` beside `last.ckpt` (a hard link where the file system has them: no copy),
        and only the newest `keep_last` of them."""
        folder = self.path.parent / NUMBERED_DIR
        folder.mkdir(exist_ok=True)
        numbered = folder / f"step-{step:08d}.ckpt"
        numbered.unlink(missing_ok=True)
        try:
            os.link(self.path, numbered)
        except OSError:
            atomic_write(numbered, lambda tmp: shutil.copyfile(self.path, tmp), overwrite=True)
        for old in numbered_checkpoints(self.path.parent)[self.keep_last:]:
            old.unlink(missing_ok=True)

    def status(self) -> str:
        """Which checkpoint holds the last finite state, in words."""
        if self.written_step is not None:
            return f"last finite checkpoint: {self.path} (step {self.written_step})"
        if self.path.is_file():
            return f"no checkpoint was written by this run ({self.path} is from an earlier one)"
        return "no checkpoint was written yet"

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._at_step_boundary = trainer.global_step != self._seen_step
        self._seen_step = trainer.global_step
        if not self._at_step_boundary:
            return
        stopping = trainer.strategy.reduce_boolean_decision(self._stop_requested, all=False)
        if stopping or trainer.global_step % self.every_n_steps == 0:
            self._save(trainer, pl_module)
        if stopping:
            self.interrupted_at = trainer.global_step
            trainer.should_stop = True

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()  # Lightning calls no teardown hooks after an exception
        if isinstance(exception, SIGTERMException) and trainer.global_step > 0 and self._at_step_boundary:
            self._save(trainer, pl_module)


def numbered_checkpoints(out: str | Path) -> list[Path]:
    """The numbered checkpoints `--keep_last` keeps under OUT, newest first."""
    return sorted((Path(out) / NUMBERED_DIR).glob("step-*.ckpt"), reverse=True)


def newest_resumable(out: str | Path) -> Path | None:
    """The checkpoint `--resume` continues from: `last.ckpt`, or where it is missing or damaged the newest intact
    numbered one; None when OUT has none. A damaged one is named on stdout and passed over."""
    damaged: list[str] = []
    for candidate in [Path(out) / "last.ckpt", *numbered_checkpoints(out)]:
        if not candidate.is_file():
            continue
        try:
            check_resumable(candidate)
        except CheckpointError as err:
            damaged.append(str(err))
            print(f"note: passing over {err}")
            continue
        return candidate
    if damaged:
        raise CheckpointError(f"{damaged[0]} (and no intact numbered checkpoint in {Path(out) / NUMBERED_DIR})")
    return None


class StopOnNonFiniteGradients(pl.Callback):
    """Stops training before an update whose gradients are inf or NaN (`TrainingDiverged`).

    Under `16-mixed` the gradient scaler skips such steps itself (they are part of finding the loss scale), so
    this callback leaves them to it.
    """

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if str(trainer.precision).startswith("16"):
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if non_finite(grads):
            raise TrainingDiverged(f"the gradients of step {trainer.global_step + 1} are non-finite: training "
                                   "stopped before the update (try a lower learning rate, or --precision 32)")


class Throughput(pl.Callback):
    """Logs training samples per second (all devices together) to the progress bar and the metrics, over whole
    optimizer steps: with `--accumulate_grad_batches` Lightning logs only a step's last batch, which alone also
    runs the update, so a per-batch rate would misstate the step."""

    def __init__(self, samples_per_batch: int) -> None:
        self.samples_per_batch = samples_per_batch
        self._last: float | None = None
        self._step = -1
        self._batches = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._batches += 1
        if trainer.global_step == self._step:  # inside an accumulated step
            return
        now = time.perf_counter()
        if self._last is not None:
            rate = self._batches * self.samples_per_batch * trainer.world_size / max(now - self._last, 1e-9)
            pl_module.log("samples_per_sec", rate, prog_bar=True, on_step=True, on_epoch=False, rank_zero_only=True)
        self._last, self._step, self._batches = now, trainer.global_step, 0
