"""Your data as it is: the same 64 items in every layout (`benchmarks/layouts.py`) train the same, and hints made on
the fly are the annotator's output on the very target the batch carries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TINY

import tutorial_train
from benchmarks.layouts import LAYOUTS, write_every_layout
from cldm.model import create_model

N_ITEMS = 64


@pytest.fixture(scope="module")
def layouts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_every_layout(tmp_path_factory.mktemp("layouts"), N_ITEMS, 64)


def _args(workspace: Path, data: str, out: Path, *extra: str) -> list[str]:
    return ["--config", TINY, "--resume_path", str(workspace / "ini.ckpt"), "--data", data, "--out", str(out),
            "--batch_size", "4", "--logger_freq", "1000", "--learning_rate", "1e-3", *extra]


def _batches(data: str, count: int, *extra: str) -> list[dict[str, Any]]:
    args = tutorial_train.parse_args(["--data", data, "--batch_size", "4", *extra])
    loader = iter(tutorial_train.training_data(args, create_model(TINY)).loader)  # deferred: nothing initialised
    return [next(loader) for _ in range(count)]


def test_layouts_are_detected(layouts: dict[str, str]) -> None:
    from training.sources import detect_format

    assert {name: detect_format(Path(data)) for name, data in layouts.items() if name != "parquet"} == \
        {name: name for name in LAYOUTS if name != "parquet"}
    assert detect_format(Path(layouts["parquet"])) == "parquet"


def test_every_layout_gives_identical_batches(layouts: dict[str, str]) -> None:
    """Same tensors, same prompts, same order at the same seed: a stream of one-item shards visits its shards in
    the permutation the map-style sampler draws, so even the streamed order is the same."""
    expected = _batches(layouts["prompt_json"], 3)
    assert len({p for b in expected for p in b["txt"]}) == 12  # 12 distinct items: a real order, not a repeat
    for name in LAYOUTS[1:]:
        for got, want in zip(_batches(layouts[name], 3), expected):
            assert got["txt"] == want["txt"], name
            assert torch.equal(got["jpg"], want["jpg"]) and torch.equal(got["hint"], want["hint"]), name


@pytest.mark.slow
def test_every_layout_trains_to_the_same_weights(layouts: dict[str, str], workspace: Path, tmp_path: Path) -> None:
    """Three tiny-config steps from each layout: the same losses and the same weights, bit for bit."""
    results = {}
    for name in LAYOUTS:
        out = tmp_path / name
        assert tutorial_train.main(_args(workspace, layouts[name], out, "--max_steps", "3")) == 0
        losses = [line.split(",")[3] for line in (out / "logs" / "version_0" / "metrics.csv").read_text()
                  .splitlines()[1:]]
        weights = torch.load(out / "last.ckpt", weights_only=True)["state_dict"]
        results[name] = (losses, weights)
    losses, weights = results["prompt_json"]
    assert len(losses) == 3 and len(set(losses)) == 3
    for name in LAYOUTS[1:]:
        assert results[name][0] == losses, name
        assert all(torch.equal(results[name][1][k], weights[k]) for k in weights), name


def test_hints_on_the_fly_are_canny_of_the_placed_target(layouts: dict[str, str]) -> None:
    """--hint canny ignores stored hints and draws edges of the very target the batch carries."""
    import cv2

    batch = _batches(layouts["folder"], 1, "--hint", "canny", "--threshold_a", "100", "--threshold_b", "200")[0]
    for target, hint in zip(batch["jpg"], batch["hint"]):
        pixels = np.rint((target.numpy() + 1.0) * 127.5).astype(np.uint8)
        edges = cv2.Canny(pixels, 100, 200)
        assert np.array_equal((hint.numpy() * 255).astype(np.uint8)[..., 0], edges)


def test_random_thresholds_are_seeded_and_vary_by_item(layouts: dict[str, str]) -> None:
    from training.hints import HintMaker

    maker = HintMaker("canny", random_thresholds=True)
    draws = [maker.thresholds(np.random.default_rng([0, 0, i])) for i in range(200)]
    assert draws == [maker.thresholds(np.random.default_rng([0, 0, i])) for i in range(200)]
    lows, highs = np.array([d[0] for d in draws]), np.array([d[1] for d in draws])
    assert lows.min() >= 50 and lows.max() <= 150 and (highs >= lows + 50).all() and highs.max() <= 250
    assert len(set(draws)) > 150
    first = _batches(layouts["prompt_json"], 1, "--hint", "canny", "--random_thresholds")[0]
    again = _batches(layouts["prompt_json"], 1, "--hint", "canny", "--random_thresholds")[0]
    assert torch.equal(first["hint"], again["hint"])
