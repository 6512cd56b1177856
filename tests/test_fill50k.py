"""Fill50K generator: determinism, layout, prompt format, and agreement of metadata with pixels."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from launcher import run_command

from training.make_fill50k import (
    MIN_COLOR_DISTANCE,
    NAMED_COLORS,
    make_fill50k,
    sample_fill50k,
    sample_rng,
)

REPO = Path(__file__).resolve().parents[1]


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_identical_bytes_different_seed_differs(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    make_fill50k(a, n=6, size=32, seed=3)
    make_fill50k(b, n=6, size=32, seed=3, workers=2)
    make_fill50k(c, n=6, size=32, seed=4)
    assert _tree_bytes(a) == _tree_bytes(b)
    assert _tree_bytes(a) != _tree_bytes(c)


def test_layout_and_prompt_format(tmp_path: Path) -> None:
    path = make_fill50k(tmp_path / "set", n=5, size=24, seed=0)
    assert path == tmp_path / "set" / "prompt.json"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5
    for i, line in enumerate(lines):
        record = json.loads(line)
        assert list(record) == ["source", "target", "prompt"]
        assert record["source"] == f"source/{i}.png" and record["target"] == f"target/{i}.png"
        circle, background = record["prompt"].removesuffix(" background").split(" circle with ")
        assert circle in NAMED_COLORS and background in NAMED_COLORS
        for key in ("source", "target"):
            image = cv2.imread(str(path.parent / record[key]), cv2.IMREAD_UNCHANGED)
            assert image.shape == (24, 24, 3) and image.dtype == np.uint8
    assert lines[0].startswith('{"source": "source/0.png", "target": "target/0.png", "prompt": "')


def test_sample_metadata_matches_pixels() -> None:
    for index, size in itertools.product(range(20), (16, 48)):
        sample = sample_fill50k(sample_rng(1, index), size)
        target, source, mask = sample["target"], sample["source"], sample["mask"]
        circle, background = np.array(sample["circle_rgb"]), np.array(sample["background_rgb"])
        assert np.linalg.norm(circle - background) >= MIN_COLOR_DISTANCE
        assert sample["prompt"] == (
            f"{_name(sample['circle_rgb'])} circle with {_name(sample['background_rgb'])} background"
        )
        # Mask recomputed from centre/radius equals the circle-coloured target pixels.
        ys, xs = np.mgrid[0:size, 0:size]
        (cx, cy), r = sample["center"], sample["radius"]
        expected = (xs - cx) ** 2 + (ys - cy) ** 2 <= r**2
        assert np.array_equal(mask, expected)
        assert np.array_equal(np.all(target == circle, axis=-1), mask)
        assert np.all(target[~mask] == background)
        # Circle fully inside, radius within 10-35 % of the size (rounded).
        assert r <= cx <= size - 1 - r and r <= cy <= size - 1 - r
        assert round(0.10 * size) <= r <= round(0.35 * size)
        # Hint: white outline on black, only on the circle's boundary band, and touching it.
        lit = np.any(source > 0, axis=-1)
        assert np.all(source[lit] == 255) and lit.any()
        assert not np.any(lit & ~mask)
        boundary = mask & ~cv2.erode(mask.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        assert np.all(lit[boundary])


def _name(rgb: tuple[int, int, int]) -> str:
    return next(name for name, value in NAMED_COLORS.items() if value == rgb)


def test_color_table_has_unique_values_and_many_colors() -> None:
    assert len(NAMED_COLORS) >= 40
    assert len(set(NAMED_COLORS.values())) == len(NAMED_COLORS)


def test_refuses_non_empty_dir_unless_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "set"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        make_fill50k(out, n=2, size=16, seed=0)
    make_fill50k(out, n=2, size=16, seed=0, overwrite=True)
    assert (out / "keep.txt").exists() and len((out / "prompt.json").read_text().splitlines()) == 2


@pytest.mark.slow
def test_cli_refusal_is_one_line(tmp_path: Path) -> None:
    out = tmp_path / "set"
    command = [str(REPO / "training" / "make_fill50k.py"), "--out", str(out)]
    ok = run_command([*command, "--n", "2", "--size", "16"], cwd=tmp_path)
    assert ok.returncode == 0 and (out / "target" / "1.png").exists()
    refused = run_command([*command, "--n", "2", "--size", "16"], cwd=tmp_path)
    assert refused.returncode != 0
    assert len(refused.stderr.strip().splitlines()) == 1 and "--overwrite" in refused.stderr
