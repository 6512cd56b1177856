"""ControlDataset: item format, up-front validation of every bad-data case, conversions, prompt dropout."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from training.dataset import BadLine, ControlDataset, DatasetError
from training.make_fill50k import make_fill50k, sample_fill50k, sample_rng
from tutorial_dataset import MyDataset
from tutorial_dataset import main as tutorial_main

SIZE = 16


def _rgb_image(seed: int, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _write_rgb(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def _make_set(root: Path, n: int = 3, lines: list[str] | None = None) -> Path:
    """``n`` valid pairs source/i.png, target/i.png; ``lines`` replaces prompt.json's content if given."""
    for i in range(n):
        _write_rgb(root / "source" / f"{i}.png", _rgb_image(2 * i))
        _write_rgb(root / "target" / f"{i}.png", _rgb_image(2 * i + 1))
    if lines is None:
        lines = [_line(i) for i in range(n)]
    (root / "prompt.json").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def _line(i: int, prompt: object = None, **overrides: object) -> str:
    record = {"source": f"source/{i}.png", "target": f"target/{i}.png"}
    record["prompt"] = f"prompt {i}" if prompt is None else prompt
    record.update(overrides)
    return json.dumps(record)


def _error(root: Path, **kwargs: object) -> str:
    with pytest.raises(DatasetError) as info:
        ControlDataset(root, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- item format -----------------------------------------------------------------------------------


def test_item_format_matches_tutorial(tmp_path: Path) -> None:
    make_fill50k(tmp_path, n=3, size=SIZE, seed=5)
    dataset = ControlDataset(tmp_path)
    assert len(dataset) == 3
    item = dataset[1]
    assert set(item) == {"jpg", "txt", "hint"}
    assert item["jpg"].dtype == np.float32 and item["hint"].dtype == np.float32
    assert item["jpg"].shape == item["hint"].shape == (SIZE, SIZE, 3)
    assert item["jpg"].min() >= -1.0 and item["jpg"].max() <= 1.0
    assert item["hint"].min() >= 0.0 and item["hint"].max() <= 1.0
    # RGB order and scaling are exact: compare with the generator's own arrays.
    sample = sample_fill50k(sample_rng(5, 1), SIZE)
    assert item["txt"] == sample["prompt"]
    np.testing.assert_array_equal(item["jpg"], sample["target"].astype(np.float32) / 127.5 - 1.0)
    np.testing.assert_array_equal(item["hint"], sample["source"].astype(np.float32) / 255.0)


def test_size_resizes_both_images(tmp_path: Path) -> None:
    _make_set(tmp_path)
    item = ControlDataset(tmp_path, size=8)[0]
    assert item["jpg"].shape == item["hint"].shape == (8, 8, 3)
    assert ControlDataset(tmp_path, size=32)[0]["hint"].shape == (32, 32, 3)


def test_blank_lines_ignored_and_line_numbers_count_them(tmp_path: Path) -> None:
    _make_set(tmp_path, n=2, lines=[_line(0), "", _line(5)])
    assert _error(tmp_path).startswith(f"{tmp_path / 'prompt.json'}:3: ")


# -- errors: one line, naming prompt.json and the line ----------------------------------------------


def test_missing_image(tmp_path: Path) -> None:
    _make_set(tmp_path, n=2, lines=[_line(0), _line(1), _line(7)])
    assert _error(tmp_path) == f"{tmp_path / 'prompt.json'}:3: source image source/7.png not found"


def test_missing_target_image(tmp_path: Path) -> None:
    _make_set(tmp_path, n=1, lines=[_line(0, target="target/nope.png")])
    assert _error(tmp_path) == f"{tmp_path / 'prompt.json'}:1: target image target/nope.png not found"


def test_garbage_image(tmp_path: Path) -> None:
    _make_set(tmp_path, n=2)
    (tmp_path / "target" / "1.png").write_bytes(b"this is not a png")
    message = _error(tmp_path)
    prefix = f"{tmp_path / 'prompt.json'}:2: target image target/1.png is not a readable image ("
    assert message.startswith(prefix)


def test_non_json_line(tmp_path: Path) -> None:
    _make_set(tmp_path, n=2, lines=[_line(0), "{not json"])
    assert _error(tmp_path).startswith(f"{tmp_path / 'prompt.json'}:2: not valid JSON")


def test_non_object_and_missing_key_and_wrong_type(tmp_path: Path) -> None:
    path = f"{tmp_path / 'prompt.json'}"
    _make_set(tmp_path, n=1, lines=["[1, 2]"])
    assert _error(tmp_path) == f"{path}:1: expected a JSON object, got list"
    _make_set(tmp_path, n=1, lines=[json.dumps({"source": "source/0.png", "target": "target/0.png"})])
    assert _error(tmp_path) == f'{path}:1: missing key "prompt"'
    _make_set(tmp_path, n=1, lines=[json.dumps({"target": "target/0.png", "prompt": "x"})])
    assert _error(tmp_path) == f'{path}:1: missing key "source"'
    _make_set(tmp_path, n=1, lines=[_line(0, prompt=3)])
    assert _error(tmp_path) == f'{path}:1: "prompt" must be a string, got int'


def test_size_mismatch(tmp_path: Path) -> None:
    _make_set(tmp_path, n=1)
    _write_rgb(tmp_path / "target" / "0.png", _rgb_image(0, size=SIZE + 4))
    assert _error(tmp_path) == (
        f"{tmp_path / 'prompt.json'}:1: "
        "source image source/0.png is 16x16 but target image target/0.png is 20x20"
    )


def test_missing_prompt_json_and_empty_set(tmp_path: Path) -> None:
    assert _error(tmp_path) == f"{tmp_path / 'prompt.json'}: not found"
    (tmp_path / "prompt.json").write_text("\n")
    assert _error(tmp_path) == f"{tmp_path / 'prompt.json'}: no usable lines (0 skipped)"
    _make_set(tmp_path, n=0, lines=["nope", "{}"])
    assert _error(tmp_path, skip_bad=True) == f"{tmp_path / 'prompt.json'}: no usable lines (2 skipped)"


def test_corrupt_pixel_data_fails_on_read_naming_line(tmp_path: Path) -> None:
    _make_set(tmp_path, n=2)
    path = tmp_path / "source" / "1.png"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # header intact, pixels truncated
    dataset = ControlDataset(tmp_path)  # header check passes: decoding is lazy
    dataset[0]
    with pytest.raises(DatasetError, match=r"prompt\.json:2: cannot decode image .*1\.png$"):
        dataset[1]


# -- skip_bad ---------------------------------------------------------------------------------------


def test_skip_bad_counts_and_reports(tmp_path: Path) -> None:
    lines = [_line(0), "oops", _line(9), _line(1), json.dumps({"source": "x"}), _line(2)]
    _make_set(tmp_path, n=3, lines=lines)
    dataset = ControlDataset(tmp_path, skip_bad=True)
    assert len(dataset) == 3
    assert [bad.line for bad in dataset.skipped] == [2, 3, 5]
    assert all(isinstance(bad, BadLine) for bad in dataset.skipped)
    missing = BadLine(3, str(tmp_path / "source" / "9.png"), "source image source/9.png not found")
    assert dataset.skipped[1] == missing
    assert dataset.skipped[0].file == str(tmp_path / "prompt.json")
    report = dataset.report()
    assert report.splitlines()[0] == f"{tmp_path / 'prompt.json'}: 3 items, 3 skipped, 0 with empty prompt"
    assert "line 3: source image source/9.png not found" in report
    assert [dataset[i]["txt"] for i in range(3)] == ["prompt 0", "prompt 1", "prompt 2"]


def test_empty_prompt_allowed_and_counted(tmp_path: Path) -> None:
    _make_set(tmp_path, n=2, lines=[_line(0), _line(1, prompt="")])
    dataset = ControlDataset(tmp_path)
    assert dataset.empty_prompts == 1 and dataset[1]["txt"] == ""
    assert "1 with empty prompt" in dataset.report()


# -- conversions ------------------------------------------------------------------------------------


def test_grayscale_becomes_rgb(tmp_path: Path) -> None:
    _make_set(tmp_path, n=1)
    gray = _rgb_image(3)[:, :, 0]
    assert cv2.imwrite(str(tmp_path / "source" / "0.png"), gray)
    hint = ControlDataset(tmp_path)[0]["hint"]
    np.testing.assert_array_equal(hint, np.repeat(gray[:, :, None], 3, axis=2).astype(np.float32) / 255.0)


def test_rgba_composited_black_for_source_white_for_target(tmp_path: Path) -> None:
    _make_set(tmp_path, n=1)
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[:4, :, 3] = 255  # opaque rows
    rgba[4:8, :, 3] = 0  # transparent rows
    rgba[8:, :, 3] = 51  # 20 % alpha
    for name in ("source", "target"):
        Image.fromarray(rgba, "RGBA").save(tmp_path / name / "0.png")
    item = ControlDataset(tmp_path)[0]
    hint = np.rint(item["hint"] * 255).astype(int)
    target = np.rint((item["jpg"] + 1) * 127.5).astype(int)
    assert (hint[0, 0] == (200, 100, 50)).all() and (target[0, 0] == (200, 100, 50)).all()
    assert (hint[5, 0] == 0).all() and (target[5, 0] == 255).all()
    assert (hint[9, 0] == (40, 20, 10)).all()  # 0.2 * colour + 0.8 * black
    assert (target[9, 0] == (244, 224, 214)).all()  # 0.2 * colour + 0.8 * white


def test_16_bit_becomes_8_bit(tmp_path: Path) -> None:
    _make_set(tmp_path, n=1)
    rgb8 = _rgb_image(4)
    rgb16 = rgb8.astype(np.uint16) * 257
    assert cv2.imwrite(str(tmp_path / "target" / "0.png"), cv2.cvtColor(rgb16, cv2.COLOR_RGB2BGR))
    gray16 = rgb8[:, :, 0].astype(np.uint16) * 257
    assert cv2.imwrite(str(tmp_path / "source" / "0.png"), gray16)
    item = ControlDataset(tmp_path)[0]
    np.testing.assert_array_equal(item["jpg"], rgb8.astype(np.float32) / 127.5 - 1.0)
    np.testing.assert_array_equal(item["hint"][:, :, 1], rgb8[:, :, 0].astype(np.float32) / 255.0)


def test_palette_becomes_rgb(tmp_path: Path) -> None:
    _make_set(tmp_path, n=1)
    palette = Image.fromarray(_rgb_image(6)).convert("P")
    palette.save(tmp_path / "source" / "0.png")
    expected = np.asarray(palette.convert("RGB"), np.float32) / 255.0
    np.testing.assert_array_equal(ControlDataset(tmp_path)[0]["hint"], expected)


# -- prompt dropout ---------------------------------------------------------------------------------


def test_drop_prompt_deterministic_with_expected_rate(tmp_path: Path) -> None:
    n = 1000
    _make_set(tmp_path, n=1, lines=[_line(0, prompt=f"p{i}") for i in range(n)])
    a = ControlDataset(tmp_path, drop_prompt=0.3, seed=1)
    b = ControlDataset(tmp_path, drop_prompt=0.3, seed=1)
    c = ControlDataset(tmp_path, drop_prompt=0.3, seed=2)
    prompts_a = [a.prompt(i) for i in range(n)]
    assert prompts_a == [b.prompt(i) for i in range(n)]
    assert prompts_a != [c.prompt(i) for i in range(n)]
    assert prompts_a == [a.prompt(i) for i in range(n)]  # stable across epochs
    assert 0.255 < prompts_a.count("") / n < 0.345  # 3 sigma
    assert all(p in ("", f"p{i}") for i, p in enumerate(prompts_a))
    dropped = prompts_a.index("")
    assert a[dropped]["txt"] == ""
    assert ControlDataset(tmp_path).prompt(dropped) == f"p{dropped}"
    assert all(ControlDataset(tmp_path, drop_prompt=1.0).prompt(i) == "" for i in range(5))
    with pytest.raises(ValueError):
        ControlDataset(tmp_path, drop_prompt=1.5)


# -- tutorial ---------------------------------------------------------------------------------------


def test_tutorial_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_fill50k(tmp_path / "fill", n=2, size=SIZE, seed=0)
    assert len(MyDataset(tmp_path / "fill")) == 2
    assert tutorial_main(["--root", str(tmp_path / "fill")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "2" and out[2:] == ["(16, 16, 3)", "(16, 16, 3)"]
    assert tutorial_main(["--root", str(tmp_path / "nope")]) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert f"python training/make_fill50k.py --out {tmp_path / 'nope'} --n 50000 --size 512" in err
