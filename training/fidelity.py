"""Control fidelity during training: does the model draw what the hint says, and since which step?

The ControlNet paper's "sudden convergence" is the moment a ControlNet starts to follow its hints: for
thousands of steps samples ignore the hint, then within a few hundred steps they obey it. Loss curves do
not show it (the loss barely moves); a fidelity score on held-out hints does. `FidelityCallback` measures
one every N steps on a fixed held-out set, with fixed seeds, so that the curve moves only because the model
does:

- Fill50K (circle outlines): the held-out items are drawn fresh by `training.make_fill50k.sample_fill50k`,
  which also returns the true circle and the prompted colours. The score is the IoU between the true disc
  and the pixels of the generated image nearer the prompted circle colour than the background colour,
  plus the colour accuracy of the image (`cldm.metrics`).
- Edges (a user's own data): the held-out items are a fixed subset of the data set, and the score is the
  F1 between the Canny edges of the generated image and the hint (`cldm.metrics.edge_f1`).

Beside the score it keeps the no-control baseline: the same prompts and seeds sampled with
`c_concat: None`, i.e. by the base model alone. It writes `fidelity.csv`, `fidelity.png` (score against
step, baseline as a line, the sudden-convergence step marked) and a grid of the held-out samples per
evaluation under `fidelity_samples/`.

Score a trained Fill50K-style checkpoint on fresh held-out hints (the last line is `iou=... baseline=...`):

    python -m training.fidelity --config configs/demo_fill50k.yaml --ckpt runs/demo/last.ckpt --n 64 --seed 1
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image

from cldm.checkpoint import load_weights
from cldm.control import Control
from cldm.metrics import circle_mask_from_colors, color_accuracy, edge_f1, iou
from cldm.model import create_model, load_config
from ldm.errors import DEBUG_HELP, InputError, MissingFileError, command_line
from ldm.modules.encoders.conditioner import default_sizes
from ldm.util import settings_from
from training.dataset import ControlDataset, PairedDataset
from training.make_fill50k import sample_fill50k, sample_rng

KINDS = ("auto", "fill50k", "edges")
#: A held-out set of this kind is sampled (grids) but not scored: hints no measure applies to.
UNSCORED = "samples"
#: Hints whose fidelity edge F1 measures: edge maps.
EDGE_PREPROCESSORS = ("canny", "hed", "mlsd", "scribble")
#: Held-out Fill50K item i is sample HELDOUT_START + i of the seed's stream: an index no generated
#: training set reaches, so held-out hints are never training hints, whatever the seeds.
HELDOUT_START = 10**9
FILL50K_PROMPT = re.compile(r"^[a-z ]+ circle with [a-z ]+ background$")
#: Canny edges sit on either side of a boundary; one pixel of slack keeps F1 about shape, not that choice.
EDGE_TOLERANCE = 1


@dataclass(frozen=True)
class EvaluationSettings:
    """How a model is sampled when it is scored: its config's `evaluation:` section, else SD's usual values.

    The fidelity command line and callback, and training-time image grids, take these unless a flag says otherwise,
    so that a re-check of a checkpoint reproduces the figure its training curve showed.
    """

    guidance_scale: float = 9.0
    ddim_steps: int = 20

    @classmethod
    def of_config(cls, config_path: str | Path) -> EvaluationSettings:
        return settings_from(cls, load_config(config_path).get("evaluation"), f"{config_path}: evaluation")


# ----- held-out sets ---------------------------------------------------------------------------------------
@dataclass
class HeldOut:
    """Fixed evaluation items: hints and targets (N, H, W, 3) float in [0, 1], prompts, what scoring needs.

    Fill50K items carry the true disc masks and the prompted colours; edge items are scored against the
    hints themselves.
    """

    kind: str
    hints: np.ndarray
    targets: np.ndarray
    prompts: list[str]
    masks: np.ndarray | None = None
    circle_rgb: list[tuple[int, int, int]] = field(default_factory=list)
    background_rgb: list[tuple[int, int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)


def fill50k_heldout(n: int, seed: int, size: int) -> HeldOut:
    """`n` fresh Fill50K items at `size` pixels with their ground truth; a pure function of the arguments."""
    if n < 1:
        raise InputError(f"n must be positive, got {n}")
    samples = [sample_fill50k(sample_rng(seed, HELDOUT_START + i), size) for i in range(n)]
    return HeldOut(
        kind="fill50k",
        hints=np.stack([s["source"] for s in samples]).astype(np.float32) / 255.0,
        targets=np.stack([s["target"] for s in samples]).astype(np.float32) / 255.0,
        prompts=[s["prompt"] for s in samples],
        masks=np.stack([s["mask"] for s in samples]),
        circle_rgb=[s["circle_rgb"] for s in samples],
        background_rgb=[s["background_rgb"] for s in samples],
    )


def dataset_heldout(root: str | Path, n: int, seed: int, size: int | None) -> HeldOut:
    """A fixed subset of `n` items of the `prompt.json` data set at `root` (chosen by `seed`), scored as edges."""
    return heldout_of(ControlDataset(root, size=size), n, seed)


def heldout_of(dataset: PairedDataset, n: int, seed: int) -> HeldOut:
    """A fixed subset of `n` items of `dataset` (chosen by `seed`; of its first size, so they batch), as edges."""
    first_size = dataset.output_size(0)
    same_size = [i for i in range(len(dataset)) if dataset.output_size(i) == first_size]
    count = min(n, len(same_size))
    chosen = np.random.default_rng(seed).choice(len(same_size), size=count, replace=False).tolist()
    items = [dataset[same_size[i]] for i in sorted(chosen)]
    return HeldOut(kind="edges", hints=np.stack([item["hint"] for item in items]),
                   targets=(np.stack([item["jpg"] for item in items]) + 1.0) / 2.0,
                   prompts=[item["txt"] for item in items])


def looks_like_edges(hints: np.ndarray) -> bool:
    """Whether hints (N, H, W, 3 in [0, 1]) are edge maps: nearly two-tone, mostly dark, bright lines sparse."""
    grey = hints.mean(axis=-1)
    two_tone = float(((grey < 0.1) | (grey > 0.9)).mean())
    return two_tone > 0.95 and float((grey > 0.5).mean()) < 0.3


def validation_heldout(pairs: Sequence[tuple[str | Path, str]], size: tuple[int, int], scored: bool | None = None
                       ) -> HeldOut:
    """The `--validation_image` hints (made `size` = (width, height) as training items are: resized to cover,
    centre-cropped) with their prompts. Scored by edge F1 when `scored`, or (None) when they look like edge maps;
    otherwise only sampled."""
    from training.geometry import Geometry
    from training.images import HINT_MATTE, decode_image

    width, height = size
    hints = []
    for path, _ in pairs:
        if not Path(path).is_file():
            raise MissingFileError(f"{path}: validation image not found")
        try:
            hint = decode_image(Path(path), HINT_MATTE)
        except ValueError as err:
            raise InputError(f"{path}: validation image is not a readable image ({err})") from None
        placed, _, _ = Geometry(buckets=((width, height),), resolution=max(width, height)).place(hint, None)
        hints.append(placed.astype(np.float32) / 255.0)
    stacked = np.stack(hints)
    edges = looks_like_edges(stacked) if scored is None else scored
    return HeldOut(kind="edges" if edges else UNSCORED, hints=stacked, targets=stacked,
                   prompts=[prompt for _, prompt in pairs])


def looks_like_fill50k(prompts: Sequence[str]) -> bool:
    """True when every non-empty prompt reads "<colour> circle with <colour> background"."""
    named = [p.strip().lower() for p in prompts if p.strip()]
    return bool(named) and all(FILL50K_PROMPT.match(p) for p in named)


def _first_entries(data_root: str | Path, count: int) -> list[dict[str, Any]]:
    """The first `count` readable lines of `data_root/prompt.json`, without validating the whole set.

    The training data set validates every line already; this only peeks, so bad lines are skipped here.
    """
    entries = []
    with open(Path(data_root) / "prompt.json", encoding="utf-8") as f:
        for line in f:
            if len(entries) >= count:
                break
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(entry, dict) and isinstance(entry.get("prompt"), str):
                entries.append(entry)
    if not entries:
        raise InputError(f"{Path(data_root) / 'prompt.json'}: no readable lines")
    return entries


def detect_kind(data_root: str | Path | None, probe: int = 200) -> str:
    """`fill50k` for Fill50K-style data (or no data at all), else `edges`; reads the first `probe` lines."""
    if data_root is None:
        return "fill50k"
    return "fill50k" if looks_like_fill50k([e["prompt"] for e in _first_entries(data_root, probe)]) else "edges"


def dataset_image_size(data_root: str | Path) -> int:
    """Side of the data set's first target image: the size a Fill50K held-out set must match."""
    target = Path(data_root) / _first_entries(data_root, 1)[0]["target"]
    with Image.open(target) as image:
        return int(image.size[1])


# ----- sampling and scoring ----------------------------------------------------------------------------------
def model_image_size(model: Any) -> int:
    """The image side a model was configured for (its latent size times the first stage's factor)."""
    return int(model.image_size) * model.latent_factor


def item_noise(shape: Sequence[int], seed: int, index: int) -> torch.Tensor:
    """Starting noise of held-out item `index`: fixed by (seed, index), whatever the batch it is drawn in."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.randn(tuple(shape), generator=generator)


@torch.no_grad()
def generate(model: Any, prompts: Sequence[str], hints: np.ndarray | None, seed: int, *, ddim_steps: int = 20,
             guidance_scale: float = 9.0, batch_size: int = 16) -> np.ndarray:
    """Sample one image per prompt, with its hint (or with none: the base model alone), as (N, H, W, 3) in [0, 1].

    DDIM with eta 0 from per-item noise (`item_noise`), so an item's image depends only on the model, its
    prompt, hint and index. The unconditional half of guidance keeps the hint and drops the prompt, as the
    original ControlNet samples. The caller sets eval mode; the global RNG is not touched.
    """
    model.materialize()
    device = model.betas.device
    factor = model.latent_factor  # 1 in pixel space, 8 for SD's VAE
    size = model_image_size(model) if hints is None else hints.shape[1]
    if size % factor:
        raise InputError(f"image size {size} is not a multiple of the first stage's factor {factor}")
    shape = (model.channels, size // factor, size // factor)
    images = []
    for start in range(0, len(prompts), batch_size):
        stop = min(start + batch_size, len(prompts))
        n = stop - start
        x = torch.stack([item_noise(shape, seed, i) for i in range(start, stop)]).to(device)
        controls = [] if hints is None else [
            Control(model.control_model, torch.from_numpy(hints[start:stop]).permute(0, 3, 1, 2).float().to(device))]
        sizes = default_sizes(n, size, size) if model.has_conditioner else None  # SDXL: the images', shown whole
        z = model.sample_latents(x, model.get_learned_conditioning(list(prompts[start:stop]), sizes), controls,
                                 model.get_unconditional_conditioning(n, sizes), guidance_scale, steps=ddim_steps)
        image = model.decode_first_stage(z)
        images.append(((image.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(images)


def score_fill50k(images: np.ndarray, heldout: HeldOut) -> dict[str, float]:
    """Mean IoU (painted circle vs true disc) and mean colour accuracy of generated Fill50K images."""
    if heldout.masks is None:
        raise ValueError("score_fill50k needs a Fill50K held-out set (with masks and colours)")
    ious, accs = [], []
    for image, mask, circle, background in zip(images, heldout.masks, heldout.circle_rgb, heldout.background_rgb):
        ious.append(iou(circle_mask_from_colors(image, circle, background), mask))
        accs.append(color_accuracy(image, mask, circle, background))
    return {"iou": float(np.mean(ious)), "color_acc": float(np.mean(accs))}


def score_edges(images: np.ndarray, heldout: HeldOut) -> dict[str, float]:
    """Mean edge F1 between the Canny edges of generated images and their hints."""
    return {"edge_f1": float(np.mean([edge_f1(image, hint, tolerance=EDGE_TOLERANCE)
                                      for image, hint in zip(images, heldout.hints)]))}


def score(images: np.ndarray, heldout: HeldOut) -> dict[str, float]:
    """The held-out set's scores; the first key is the headline metric (none for an unscored set)."""
    if heldout.kind == UNSCORED:
        return {}
    return score_fill50k(images, heldout) if heldout.kind == "fill50k" else score_edges(images, heldout)


def sudden_convergence_step(steps: Sequence[int], scores: Sequence[float], baseline: float) -> int | None:
    """First step whose score reaches halfway from the baseline to the final score; None if it never rises.

    The halfway crossing marks where the curve turns from "ignores the hint" to "follows it" without a
    threshold tuned to one data set.
    """
    if not scores or scores[-1] <= baseline:
        return None
    halfway = baseline + 0.5 * (scores[-1] - baseline)
    return next(step for step, value in zip(steps, scores) if value >= halfway)


# ----- files -------------------------------------------------------------------------------------------------
def save_grid(rows: Sequence[np.ndarray], path: Path, max_items: int = 8, padding: int = 1) -> None:
    """Save image rows (each (N, H, W, 3) in [0, 1]) as one PNG, the first `max_items` of each row."""
    rows = [row[:max_items] for row in rows]
    n, h, w = rows[0].shape[:3]
    canvas = np.ones((len(rows) * (h + padding) + padding, n * (w + padding) + padding, 3), np.float32)
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            top, left = padding + r * (h + padding), padding + c * (w + padding)
            canvas[top:top + h, left:left + w] = image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.rint(canvas.clip(0, 1) * 255).astype(np.uint8)).save(path)


def write_csv(path: Path, metrics: Sequence[str], rows: Sequence[dict[str, float]]) -> None:
    """`step, <metrics...>, baseline`, one line per evaluation."""
    columns = ["step", *metrics, "baseline"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (int(v) if k == "step" else f"{v:.4f}") for k, v in row.items() if k in columns})


def read_csv(path: Path, metrics: Sequence[str]) -> list[dict[str, float]]:
    """Rows of an earlier `write_csv` with the same columns (a resumed run continues its curve), else []."""
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != ["step", *metrics, "baseline"]:
            return []
        return [{k: float(v) for k, v in row.items()} for row in reader]


def plot_fidelity(path: Path, rows: Sequence[dict[str, float]], metric: str, baseline: float,
                  secondary: str | None = None) -> int | None:
    """Score against step, the no-control baseline, and the sudden-convergence marker; returns that step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [int(r["step"]) for r in rows]
    values = [r[metric] for r in rows]
    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    ax.plot(steps, values, "o-", color="tab:blue", label=f"held-out {metric} with control")
    if secondary is not None:
        ax.plot(steps, [r[secondary] for r in rows], ".-", color="tab:green", alpha=0.5, label=secondary)
    ax.axhline(baseline, ls="--", color="gray", label=f"no control (base model): {baseline:.3f}")
    jump = sudden_convergence_step(steps, values, baseline)
    if jump is not None:
        ax.axvline(jump, ls=":", color="tab:red")
        ax.plot([jump], [values[steps.index(jump)]], "*", color="tab:red", ms=14,
                label=f"sudden convergence: step {jump}")
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)
    ax.set_ylim(0.0, 1.0)
    ax.set_title("Control fidelity on held-out hints")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    return jump


# ----- the callback ------------------------------------------------------------------------------------------
class FidelityCallback(pl.Callback):
    """At the start, every `every_n_steps` optimizer steps and at the end, score the model on a fixed held-out set.

    `make_heldout()` builds the set once, when training starts, so constructing the callback reads no data.
    Sampling runs on rank zero, in eval mode and without gradients; the module is put back in the mode it
    was in and the global RNG is left as it was, so a run trains the same with and without this callback.
    """

    def __init__(self, every_n_steps: int, out_dir: str | Path, make_heldout: Callable[[], HeldOut], *,
                 seed: int = 0, guidance_scale: float = 9.0, ddim_steps: int = 20, batch_size: int = 16,
                 name: str = "fidelity", samples_subdir: str = "fidelity_samples") -> None:
        super().__init__()
        self.name, self.samples_dir = name, Path(out_dir) / samples_subdir
        if every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be positive, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.out_dir = Path(out_dir)
        self.make_heldout = make_heldout
        self.seed = seed
        self.guidance_scale = guidance_scale
        self.ddim_steps = ddim_steps
        self.batch_size = batch_size
        self.heldout: HeldOut | None = None
        self.baseline: float | None = None
        self.rows: list[dict[str, float]] = []
        self.sudden_convergence: int | None = None
        self._last_scored = -1
        self._started = False

    @property
    def state_key(self) -> str:
        return f"{type(self).__name__}[{self.name}]"

    @property
    def metrics(self) -> list[str]:
        """CSV columns between step and baseline; the first is the headline score."""
        if self.heldout is None:
            raise RuntimeError("the held-out set is built when training starts")
        if self.heldout.kind == UNSCORED:
            return []
        return ["iou", "color_acc"] if self.heldout.kind == "fill50k" else ["edge_f1"]

    def _sample(self, pl_module: pl.LightningModule, with_control: bool) -> np.ndarray:
        assert self.heldout is not None
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                return generate(pl_module, self.heldout.prompts, self.heldout.hints if with_control else None,
                                self.seed, ddim_steps=self.ddim_steps, guidance_scale=self.guidance_scale,
                                batch_size=self.batch_size)
        finally:
            pl_module.train(was_training)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if self.heldout is None:
            self.heldout = self.make_heldout()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        images = self._sample(pl_module, with_control=False)
        save_grid([self.heldout.hints, self.heldout.targets, images], self.samples_dir / "baseline.png")
        if self.metrics:
            self.rows = [r for r in read_csv(self.out_dir / "fidelity.csv", self.metrics)
                         if r["step"] <= trainer.global_step]
            self.baseline = score(images, self.heldout)[self.metrics[0]]
            print(f"{self.name}: no-control baseline {self.metrics[0]}={self.baseline:.3f} "
                  f"on {len(self.heldout)} held-out {self.heldout.kind} hints")
        self._started = True
        if trainer.global_step == 0:  # the curve's first point: a fresh ControlNet changes nothing yet
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Score the model now, append a CSV row, redraw the plot and save the held-out samples' grid."""
        assert self.heldout is not None
        step = trainer.global_step
        self._last_scored = step
        images = self._sample(pl_module, with_control=True)
        grid = self.samples_dir / f"step_{step:06d}.png"
        save_grid([self.heldout.hints, self.heldout.targets, images], grid)
        scores = score(images, self.heldout)
        if not scores:  # hints no measure applies to: samples only
            print(f"{self.name}: step {step}: samples in {grid}")
            return scores
        assert self.baseline is not None
        row = {"step": float(step), **scores, "baseline": self.baseline}
        self.rows = [r for r in self.rows if r["step"] != step] + [row]
        write_csv(self.out_dir / "fidelity.csv", self.metrics, self.rows)
        secondary = self.metrics[1] if len(self.metrics) > 1 else None
        self.sudden_convergence = plot_fidelity(self.out_dir / "fidelity.png", self.rows, self.metrics[0],
                                                self.baseline, secondary)
        shown = " ".join(f"{k}={v:.3f}" for k, v in scores.items())
        print(f"{self.name}: step {step}: {shown} (baseline {self.baseline:.3f})")
        if pl_module.logger is not None:  # a CSV logger puts the curve beside the loss
            pl_module.logger.log_metrics({f"{self.name}/{k}": v for k, v in scores.items()}, step=step)
        return scores

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if trainer.is_global_zero and step % self.every_n_steps == 0 and step != self._last_scored:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self._started and trainer.global_step != self._last_scored:
            self.evaluate(trainer, pl_module)


def fidelity_callback_from_args(kind: str, every_n_steps: int, n: int, seed: int, data_root: str | None,
                                image_size: int | None, out_dir: str, guidance_scale: float = 9.0,
                                ddim_steps: int = 20, dataset: PairedDataset | None = None) -> pl.Callback:
    """The callback `tutorial_train.py --fidelity_every N` adds, from its command-line values.

    `kind` `auto` picks `fill50k` when the data's prompts read "<colour> circle with <colour> background"
    (held-out hints drawn fresh, at `image_size` or the data's size), else `edges` (a fixed subset of `n`
    items of the data, chosen by `seed`). The data is `dataset` (any layout) or the `prompt.json` folder
    `data_root`; it is read when training starts.
    """
    if kind not in KINDS:
        raise InputError(f"fidelity kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if n < 1:
        raise InputError(f"the fidelity set needs at least one item, got n={n}")
    if kind == "edges" and data_root is None and dataset is None:
        raise InputError("edge fidelity scores a subset of the training data: give its folder")
    if kind != "edges" and data_root is None and dataset is None and image_size is None:
        raise InputError("fill50k fidelity without a data folder needs an image size")

    def make_heldout() -> HeldOut:
        if dataset is not None:
            captions = [dataset.source.caption(i) for i in range(min(200, len(dataset)))]
            resolved = kind if kind != "auto" else "fill50k" if looks_like_fill50k(captions) else "edges"
            if resolved == "edges":
                return heldout_of(dataset, n, seed)
            return fill50k_heldout(n, seed, image_size or dataset.output_size(0)[1])
        resolved = detect_kind(data_root) if kind == "auto" else kind
        if resolved == "edges":
            return dataset_heldout(data_root, n, seed, image_size)  # type: ignore[arg-type]
        return fill50k_heldout(n, seed, image_size or dataset_image_size(data_root))  # type: ignore[arg-type]

    return FidelityCallback(every_n_steps, out_dir, make_heldout, seed=seed, guidance_scale=guidance_scale,
                            ddim_steps=ddim_steps)


# ----- command line ------------------------------------------------------------------------------------------
def evaluate_checkpoint(config: str | Path, ckpt: str | Path, n: int, seed: int, size: int | None = None,
                        ddim_steps: int = 20, guidance_scale: float = 9.0, grid: Path | None = None
                        ) -> dict[str, float]:
    """Held-out Fill50K scores of a ControlLDM checkpoint, with and without its control."""
    model = create_model(config)
    load_weights(model, ckpt)
    model.eval()
    heldout = fill50k_heldout(n, seed, size or model_image_size(model))
    controlled = generate(model, heldout.prompts, heldout.hints, seed, ddim_steps=ddim_steps,
                          guidance_scale=guidance_scale)
    base = generate(model, heldout.prompts, None, seed, ddim_steps=ddim_steps, guidance_scale=guidance_scale)
    if grid is not None:
        save_grid([heldout.hints, heldout.targets, controlled, base], grid, max_items=16)
    with_control, without = score_fill50k(controlled, heldout), score_fill50k(base, heldout)
    return {**with_control, "baseline": without["iou"], "baseline_color_acc": without["color_acc"]}


@command_line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Score a Fill50K ControlNet checkpoint on fresh held-out hints.",
                                     epilog=DEBUG_HELP)
    parser.add_argument("--config", required=True, help="model YAML")
    parser.add_argument("--ckpt", required=True, help="ControlLDM checkpoint (e.g. runs/demo/last.ckpt)")
    parser.add_argument("--n", type=int, default=64, help="held-out hints (default 64)")
    parser.add_argument("--seed", type=int, default=1, help="held-out set and noise seed (default 1)")
    parser.add_argument("--size", type=int, default=None, help="image side in pixels (default: the config's)")
    parser.add_argument("--ddim_steps", type=int, default=None,
                        help="default: the config's evaluation section, else 20")
    parser.add_argument("--guidance_scale", type=float, default=None,
                        help="default: the config's evaluation section, else 9")
    parser.add_argument("--grid", type=Path, default=None,
                        help="write a PNG: rows of hints, true images, samples with control, without (first 16)")
    args = parser.parse_args(argv)
    settings = EvaluationSettings.of_config(args.config)
    guidance = settings.guidance_scale if args.guidance_scale is None else args.guidance_scale
    steps = settings.ddim_steps if args.ddim_steps is None else args.ddim_steps
    result = evaluate_checkpoint(args.config, args.ckpt, args.n, args.seed, args.size, steps, guidance, args.grid)
    print(f"sampled with guidance {guidance:g}, {steps} DDIM steps")
    print(f"n={args.n} seed={args.seed} color_acc={result['color_acc']:.3f} "
          f"baseline_color_acc={result['baseline_color_acc']:.3f}")
    print(f"iou={result['iou']:.3f} baseline={result['baseline']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
