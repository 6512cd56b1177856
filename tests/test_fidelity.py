"""The fidelity callback: its scoring on drawn images with exact values, its files, and its CLI.

`cldm.metrics` has its own tests; these check the wiring around them (which mask meets which colours, how
items are averaged, which step is "sudden convergence") and that the callback, run inside a real
`pl.Trainer` on the tiny config, writes its CSV and plot and hands the module back in train mode.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from training.dataset import ControlDataset
from training.fidelity import (
    HELDOUT_START,
    EvaluationSettings,
    FidelityCallback,
    HeldOut,
    detect_kind,
    fidelity_callback_from_args,
    fill50k_heldout,
    looks_like_fill50k,
    main,
    score_edges,
    score_fill50k,
    sudden_convergence_step,
)
from training.make_fill50k import make_fill50k, sample_fill50k, sample_rng

BLACK, WHITE = (0, 0, 0), (255, 255, 255)


def _square(size: int, top: int, left: int, side: int) -> np.ndarray:
    mask = np.zeros((size, size), bool)
    mask[top:top + side, left:left + side] = True
    return mask


def _paint(mask: np.ndarray, inside: tuple[int, int, int], outside: tuple[int, int, int]) -> np.ndarray:
    image = np.empty((*mask.shape, 3), np.float32)
    image[...] = np.asarray(outside, np.float32) / 255
    image[mask] = np.asarray(inside, np.float32) / 255
    return image


def test_score_fill50k_exact_values() -> None:
    """A 4x4 true disc and a painting shifted one column right: IoU 12/20, colour accuracy 1 - (4/16 + 4/48)/2.

    With black/white colours each wrong pixel has error exactly 1: inside the true mask 4 of 16 pixels are
    wrong, outside 4 of 48. The second item is perfect, so the means are (0.6 + 1) / 2 and (5/6 + 1) / 2.
    """
    true = _square(8, 2, 2, 4)
    shifted = _paint(_square(8, 2, 3, 4), WHITE, BLACK)
    heldout = HeldOut(kind="fill50k", hints=np.zeros((2, 8, 8, 3), np.float32),
                      targets=np.zeros((2, 8, 8, 3), np.float32), prompts=["white circle with black background"] * 2,
                      masks=np.stack([true, true]), circle_rgb=[WHITE, WHITE], background_rgb=[BLACK, BLACK])
    scores = score_fill50k(np.stack([shifted, _paint(true, WHITE, BLACK)]), heldout)
    assert scores["iou"] == pytest.approx((12 / 20 + 1.0) / 2, abs=1e-12)
    assert scores["color_acc"] == pytest.approx((1 - (4 / 16 + 4 / 48) / 2 + 1.0) / 2, abs=1e-12)


def test_score_fill50k_uses_the_prompted_colours() -> None:
    """The right shape in the wrong colours is not a circle: painted background-coloured, IoU is 0."""
    true = _square(8, 2, 2, 4)
    heldout = HeldOut(kind="fill50k", hints=np.zeros((1, 8, 8, 3), np.float32),
                      targets=np.zeros((1, 8, 8, 3), np.float32), prompts=["x"], masks=true[None],
                      circle_rgb=[WHITE], background_rgb=[BLACK])
    assert score_fill50k(_paint(true, BLACK, WHITE)[None], heldout)["iou"] == 0.0


def test_score_edges_exact_values() -> None:
    """A filled square against its own 1-px outline scores F1 1.0 (Canny puts the top and left edges one pixel
    outside the square, which the one-pixel tolerance forgives); a blank image scores 0.0; the mean is 0.5."""
    ring = _square(16, 4, 4, 8) & ~_square(16, 5, 5, 6)
    hint = _paint(ring, WHITE, BLACK)
    heldout = HeldOut(kind="edges", hints=np.stack([hint, hint]), targets=np.stack([hint, hint]), prompts=["", ""])
    square = _paint(_square(16, 4, 4, 8), WHITE, BLACK)
    assert score_edges(np.stack([square, np.zeros_like(square)]), heldout) == {"edge_f1": pytest.approx(0.5)}


def test_sudden_convergence_is_the_halfway_crossing() -> None:
    steps = [10, 20, 30, 40]
    # halfway between baseline 0.1 and final 0.8 is 0.45: first reached at step 30
    assert sudden_convergence_step(steps, [0.1, 0.15, 0.6, 0.8], baseline=0.1) == 30
    assert sudden_convergence_step(steps, [0.1, 0.1, 0.1, 0.05], baseline=0.1) is None
    assert sudden_convergence_step([], [], baseline=0.1) is None


def test_heldout_is_fixed_and_never_training_data() -> None:
    a, b = fill50k_heldout(3, seed=0, size=32), fill50k_heldout(3, seed=0, size=32)
    assert a.prompts == b.prompts and np.array_equal(a.hints, b.hints) and np.array_equal(a.masks, b.masks)
    assert a.hints.shape == (3, 32, 32, 3) and a.hints.dtype == np.float32 and a.hints.max() == 1.0
    first = sample_fill50k(sample_rng(0, HELDOUT_START), 32)
    assert first["prompt"] == a.prompts[0]
    train = [sample_fill50k(sample_rng(0, i), 32)["prompt"] for i in range(3)]
    assert train != a.prompts


def test_kind_detection(tmp_path: Path) -> None:
    assert looks_like_fill50k(["coral circle with navy background", "", "dark slate blue circle with tan background"])
    assert not looks_like_fill50k(["a photo of a cat", "coral circle with navy background"])
    assert not looks_like_fill50k(["", ""])
    make_fill50k(tmp_path / "fill", 3, 16, seed=0)
    assert detect_kind(tmp_path / "fill") == "fill50k"
    assert detect_kind(None) == "fill50k"


# ----- the callback in a real training run ----------------------------------------------------------------


class _ModeProbe(pl.Callback):
    """Records, after each step (after the fidelity callback ran), whether the module is in train mode."""

    def __init__(self) -> None:
        self.modes: list[tuple[int, bool, bool]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.modes.append((trainer.global_step, pl_module.training, pl_module.cond_stage_model.training))


def _tiny_data(root: Path, prompts_fill50k: bool) -> Path:
    make_fill50k(root, 4, 64, seed=0)
    if not prompts_fill50k:  # same images, prompts that are not Fill50K's: scored as edges
        lines = (root / "prompt.json").read_text().splitlines()
        (root / "prompt.json").write_text("".join(line.replace("circle with", "disc on") + "\n" for line in lines))
    return root


@pytest.mark.parametrize("fill50k", [True, False], ids=["fill50k", "edges"])
def test_callback_in_trainer(tmp_path: Path, tiny_state: dict[str, torch.Tensor], fill50k: bool) -> None:
    """Three steps on the tiny config, scored every 2: rows at steps 0, 2 and 3 (the end), a plot, train mode."""
    from conftest import build_tiny

    data = _tiny_data(tmp_path / "data", fill50k)
    model = build_tiny()
    model.load_state_dict(tiny_state)
    model.learning_rate = 1e-4
    out = tmp_path / "run"
    callback = fidelity_callback_from_args(kind="auto", every_n_steps=2, n=2, seed=0, data_root=str(data),
                                           image_size=None, out_dir=str(out), ddim_steps=2)
    probe = _ModeProbe()
    loader = DataLoader(ControlDataset(data), batch_size=2)
    trainer = pl.Trainer(max_steps=3, callbacks=[callback, probe], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(model, loader)

    metric = "iou" if fill50k else "edge_f1"
    with open(out / "fidelity.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    columns = ["step", "iou", "color_acc", "baseline"] if fill50k else ["step", "edge_f1", "baseline"]
    assert list(rows[0]) == columns
    assert [int(r["step"]) for r in rows] == [0, 2, 3]
    assert all(0.0 <= float(r[metric]) <= 1.0 for r in rows)
    assert len({r["baseline"] for r in rows}) == 1
    assert (out / "fidelity.png").stat().st_size > 0
    assert (out / "fidelity_samples" / "step_000002.png").is_file()
    assert (out / "fidelity_samples" / "baseline.png").is_file()
    assert probe.modes and all(training and not text_training for _, training, text_training in probe.modes)
    assert isinstance(callback, FidelityCallback) and callback.heldout is not None
    assert callback.heldout.kind == ("fill50k" if fill50k else "edges")


def test_callback_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="kind"):
        fidelity_callback_from_args("depth", 2, 2, 0, None, 32, "out")
    with pytest.raises(ValueError, match="data"):
        fidelity_callback_from_args("edges", 2, 2, 0, None, 32, "out")
    with pytest.raises(ValueError, match="image size"):
        fidelity_callback_from_args("auto", 2, 2, 0, None, None, "out")
    with pytest.raises(ValueError, match="every_n_steps"):
        fidelity_callback_from_args("fill50k", 0, 2, 0, None, 32, "out")


def test_cli_ends_with_iou_and_baseline(tmp_path: Path, tiny_state: dict[str, torch.Tensor],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import TINY_CONFIG

    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": tiny_state}, ckpt)
    code = main(["--config", str(TINY_CONFIG), "--ckpt", str(ckpt), "--n", "2", "--seed", "3",
                 "--ddim_steps", "2", "--grid", str(tmp_path / "grid.png")])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert re.fullmatch(r"iou=\d\.\d{3} baseline=\d\.\d{3}", lines[-1])
    assert (tmp_path / "grid.png").is_file()


def test_cli_reports_a_missing_checkpoint_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import TINY_CONFIG

    assert main(["--config", str(TINY_CONFIG), "--ckpt", str(tmp_path / "nope.ckpt"), "--n", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


def test_cli_samples_as_the_configs_evaluation_section_says(tmp_path: Path, tiny_state: dict[str, torch.Tensor],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The demo's figure is re-checked the way the demo measured it: guidance and steps from the config; a flag wins."""
    from conftest import TINY_CONFIG
    from omegaconf import OmegaConf

    config = OmegaConf.load(TINY_CONFIG)
    config.evaluation = {"guidance_scale": 3.5, "ddim_steps": 2}
    path = tmp_path / "with_evaluation.yaml"
    OmegaConf.save(config, path)
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": tiny_state}, ckpt)
    base = ["--config", str(path), "--ckpt", str(ckpt), "--n", "1"]
    assert main(base) == 0
    assert "sampled with guidance 3.5, 2 DDIM steps" in capsys.readouterr().out
    assert main([*base, "--guidance_scale", "1.5", "--ddim_steps", "3"]) == 0
    assert "sampled with guidance 1.5, 3 DDIM steps" in capsys.readouterr().out
    config.evaluation = {"guidance": 3.0}
    OmegaConf.save(config, path)
    assert main(base) == 2
    assert "unknown settings guidance" in capsys.readouterr().err
    assert EvaluationSettings.of_config(TINY_CONFIG) == EvaluationSettings(9.0, 20)
