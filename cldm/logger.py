"""ImageLogger: grids of control, reconstruction, prompt and samples every N training steps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image


def make_grid(images: torch.Tensor, nrow: int = 4, padding: int = 2) -> np.ndarray:
    """Tile N images (N, C, H, W) in [0, 1] into one HWC uint8 array, `nrow` images per row."""
    n, c, h, w = images.shape
    cols = min(nrow, n)
    rows = (n + cols - 1) // cols
    grid = torch.zeros(c, rows * (h + padding) + padding, cols * (w + padding) + padding)
    for i in range(n):
        top, left = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        grid[:, top:top + h, left:left + w] = images[i]
    array = (grid.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return array[..., 0] if c == 1 else array


class ImageLogger(pl.Callback):
    """Every `batch_frequency` optimizer steps, save `model.log_images(batch)` as PNG grids.

    Files go to `<save_dir>/image_log/train/<key>_gs-<step>_e-<epoch>_b-<batch>.png` as in the original.
    Sampling runs in eval mode without gradients, in chunks of `sample_batch_size` images (the
    unconditional half of guidance doubles each chunk) so that logging does not run out of memory
    where training fits, and on a forked RNG so that logging does not change the training run.
    """

    def __init__(self, batch_frequency: int = 2000, max_images: int = 4, clamp: bool = True,
                 rescale: bool = True, disabled: bool = False, log_first_step: bool = False,
                 save_dir: str | Path | None = None, seed: int = 0,
                 log_images_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        if batch_frequency <= 0:
            raise ValueError(f"batch_frequency must be positive, got {batch_frequency}")
        self.batch_freq = batch_frequency
        self.max_images = max_images
        self.clamp = clamp
        self.rescale = rescale
        self.disabled = disabled
        self.log_first_step = log_first_step
        self.save_dir = None if save_dir is None else Path(save_dir)
        self.seed = seed
        self.log_images_kwargs = {"sample_batch_size": 1, **(log_images_kwargs or {})}
        self._last_logged_step = -1

    def _root(self, trainer: pl.Trainer) -> Path:
        base = self.save_dir or Path(trainer.default_root_dir)
        return base / "image_log"

    def log_local(self, root: Path, split: str, images: dict[str, torch.Tensor], global_step: int,
                  current_epoch: int, batch_idx: int) -> list[Path]:
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        written = []
        for key, batch in images.items():
            grid = make_grid((batch + 1.0) / 2.0 if self.rescale else batch, nrow=4)
            path = folder / f"{key}_gs-{global_step:06}_e-{current_epoch:06}_b-{batch_idx:06}.png"
            Image.fromarray(grid).save(path)
            written.append(path)
        return written

    def should_log(self, global_step: int) -> bool:
        if global_step == self._last_logged_step:
            return False  # one log per optimizer step, whatever the gradient accumulation
        return global_step % self.batch_freq == 0 or (self.log_first_step and global_step == 1)

    @torch.no_grad()
    def log_img(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                split: str = "train") -> None:
        if not trainer.is_global_zero:
            return  # only rank zero writes images; sampling elsewhere would be wasted
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.random.fork_rng(devices=[pl_module.device] if pl_module.device.type == "cuda" else []):
                torch.manual_seed(self.seed)
                images = pl_module.log_images(batch, split=split, N=self.max_images, **self.log_images_kwargs)
        finally:
            pl_module.train(was_training)
        prepared = {}
        for key, value in images.items():
            value = value[: self.max_images].detach().float().cpu()
            prepared[key] = value.clamp(-1.0, 1.0) if self.clamp else value
        self.log_local(self._root(trainer), split, prepared, trainer.global_step, trainer.current_epoch, batch_idx)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.disabled or self.max_images <= 0 or not hasattr(pl_module, "log_images"):
            return
        if self.should_log(trainer.global_step):
            self._last_logged_step = trainer.global_step
            self.log_img(trainer, pl_module, batch, batch_idx)
