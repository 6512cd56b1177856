"""Any image size (resolution and crop, aspect-ratio buckets), prepare_dataset.py, each layout's bad input, and the
trainer's numbered checkpoints and validation samples."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import TINY

import tutorial_train
from ldm.errors import user_message
from training.dataset import PairedDataset
from training.geometry import Geometry, make_buckets, nearest_bucket
from training.order import BucketBatchSampler
from training.sources import DatasetError, FolderSource, open_source


def _write(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def _disc_image(width: int, height: int, seed: int) -> np.ndarray:
    """Noise with a white disc in the middle: a crop or a squash shows in the disc's bounding box."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 120, (height, width, 3), dtype=np.uint8)
    radius = min(width, height) // 3
    cv2.circle(image, (width // 2, height // 2), radius, (255, 255, 255), -1)
    return image


def _kohya(root: Path, sizes: list[tuple[int, int]]) -> Path:
    """A kohya folder whose hints are the targets themselves (so placement can be compared pixel for pixel)."""
    for i, (width, height) in enumerate(sizes):
        image = _disc_image(width, height, i)
        _write(root / "images" / f"{i:03d}.png", image)
        _write(root / "conditioning" / f"{i:03d}.png", image)
        (root / "images" / f"{i:03d}.txt").write_text(f"item {i}")
    return root


SIZES = [(192, 64), (64, 64), (48, 64), (80, 80), (64, 48), (200, 70), (70, 70), (96, 128)]


def test_buckets_follow_the_rules() -> None:
    buckets = make_buckets(128)
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 128 * 128 for w, h in buckets)
    assert (128, 128) in buckets and (192, 64) in buckets
    assert nearest_bucket(buckets, 300, 100) == (192, 64)  # 3:1
    assert nearest_bucket(buckets, 100, 100) == (128, 128)


@pytest.mark.parametrize("geometry", [Geometry(resolution=64, crop="center"), Geometry(resolution=64, crop="random"),
                                      Geometry.from_options(resolution=128, buckets=True)])
def test_hint_and_target_get_the_identical_crop(tmp_path: Path, geometry: Geometry) -> None:
    dataset = PairedDataset(FolderSource(_kohya(tmp_path, SIZES)), geometry=geometry, seed=3)
    for index in range(len(dataset)):
        item = dataset[index + len(dataset)]  # epoch 1: random crops differ from epoch 0's
        target = np.rint((item["jpg"] + 1.0) * 127.5).astype(np.uint8)
        hint = np.rint(item["hint"] * 255.0).astype(np.uint8)
        assert np.array_equal(target, hint)
        assert item["jpg"].shape[:2][::-1] == dataset.output_size(index)


def test_a_three_to_one_image_is_cropped_to_its_bucket_not_squashed(tmp_path: Path) -> None:
    dataset = PairedDataset(FolderSource(_kohya(tmp_path, [(300, 100)])),
                            geometry=Geometry.from_options(resolution=128, buckets=True))
    hint = dataset[0]["hint"]
    assert hint.shape[:2] == (64, 192)
    rows, cols = np.nonzero(hint[..., 0] > 0.99)
    assert abs((cols.max() - cols.min()) - (rows.max() - rows.min())) <= 2  # the disc is still round
    square = PairedDataset(FolderSource(tmp_path), geometry=Geometry(square=64))[0]["hint"]
    rows, cols = np.nonzero(square[..., 0] > 0.99)
    assert (rows.max() - rows.min()) > 2 * (cols.max() - cols.min())  # --image_size squashes, as the original


def test_every_batch_comes_from_one_bucket_and_an_epoch_covers_every_item(tmp_path: Path) -> None:
    buckets = [nearest_bucket(make_buckets(128), w, h) for w, h in SIZES * 3]
    sampler = BucketBatchSampler(buckets, batch_size=2, seed=0)
    stream = iter(sampler)
    first_epoch = [next(stream) for _ in range(len(sampler.epoch_batches(0)))]
    assert all(len({buckets[i % len(buckets)] for i in batch}) == 1 for batch in first_epoch)
    assert sorted(i for batch in first_epoch for i in batch) == list(range(len(buckets)))
    sampler.resume_at(steps=3, samples_per_step=2)
    assert next(iter(sampler)) == first_epoch[3]


@pytest.mark.slow
def test_buckets_with_the_cache_train_and_resume_exactly(tmp_path: Path, workspace: Path) -> None:
    data = _kohya(tmp_path / "data", SIZES)
    common = ["--config", TINY, "--resume_path", str(workspace / "ini.ckpt"), "--data", str(data), "--batch_size",
              "2", "--logger_freq", "1000", "--learning_rate", "1e-3", "--resolution", "128", "--buckets",
              "--cache", str(tmp_path / "cache"), "--save_every", "2"]
    assert tutorial_train.main([*common, "--out", str(tmp_path / "full"), "--max_steps", "4"]) == 0
    assert tutorial_train.main([*common, "--out", str(tmp_path / "part"), "--max_steps", "2"]) == 0
    assert tutorial_train.main([*common, "--out", str(tmp_path / "part"), "--max_steps", "4", "--resume"]) == 0
    a = torch.load(tmp_path / "full" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "part" / "last.ckpt", weights_only=True)["state_dict"]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_random_crop_cannot_be_cached(tmp_path: Path) -> None:
    dataset = PairedDataset(FolderSource(_kohya(tmp_path, SIZES)), geometry=Geometry(resolution=64, crop="random"))
    with pytest.raises(DatasetError, match="cannot be cached"):
        dataset.cache_identity(0)


# ----- prepare_dataset.py ----------------------------------------------------------------------------------------
def test_prepare_dataset_writes_hints_and_captions_and_lists_what_it_left_out(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture[str]
                                                                             ) -> None:
    from training.dataset import ControlDataset
    from training.prepare_dataset import main

    photos = tmp_path / "photos"
    _write(photos / "a.png", _disc_image(64, 64, 0))
    (photos / "a.txt").write_text("a disc\n")
    rgba = np.dstack([_disc_image(64, 64, 1), np.full((64, 64), 128, np.uint8)])
    cv2.imwrite(str(photos / "b.png"), rgba)
    (photos / "b.caption").write_text("see-through")
    cv2.imwrite(str(photos / "c.png"), (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16))
    (photos / "c.txt").write_text("sixteen bits")
    (photos / "broken.png").write_bytes(b"\x89PNG not really")
    (photos / "broken.txt").write_text("broken")
    _write(photos / "nocaption.png", _disc_image(32, 32, 2))
    out = tmp_path / "prepared"
    assert main(["--images", str(photos), "--hint", "canny", "--out", str(out), "--workers", "2"]) == 0
    printed = capsys.readouterr()
    assert "wrote 3 items" in printed.out and "2 skipped" in printed.out
    skipped = (out / "skipped.txt").read_text().splitlines()
    assert len(skipped) == 2 and any("broken.png: not a readable image" in s for s in skipped)
    assert any("nocaption.png: no caption" in s for s in skipped)
    dataset = ControlDataset(out)
    assert [dataset[i]["txt"] for i in range(3)] == ["a disc", "see-through", "sixteen bits"]
    first = dataset[0]
    target = np.rint((first["jpg"] + 1.0) * 127.5).astype(np.uint8)
    assert np.array_equal((first["hint"][..., 0] * 255).astype(np.uint8), cv2.Canny(target, 100, 200))
    metadata = tmp_path / "meta.jsonl"
    metadata.write_text(json.dumps({"file_name": "nocaption.png", "text": "from metadata"}) + "\n")
    assert main(["--images", str(photos), "--hint", "canny", "--out", str(tmp_path / "p2"),
                 "--metadata", str(metadata)]) == 0
    assert "from metadata" in (tmp_path / "p2" / "prompt.json").read_text()


# ----- each layout's bad input -------------------------------------------------------------------------------
def _datasets_table(root: Path, **columns: list) -> Path:
    import datasets

    datasets.Dataset.from_dict(columns).save_to_disk(str(root))
    return root


def test_layout_errors_are_one_line_naming_file_and_row(tmp_path: Path) -> None:
    def one_line(call, *needles: str) -> None:  # type: ignore[no-untyped-def]
        with pytest.raises(DatasetError) as caught:
            call()
        message = user_message(caught.value)
        assert message is not None and "\n" not in message
        for needle in needles:
            assert needle in message, message

    folder = _kohya(tmp_path / "kohya", SIZES[:2])
    (folder / "images" / "orphan.txt").write_text("no image")
    one_line(lambda: FolderSource(folder), "orphan.txt", "has no image")
    (folder / "images" / "orphan.txt").unlink()
    _write(folder / "conditioning" / "lonely.png", _disc_image(8, 8, 0))
    one_line(lambda: FolderSource(folder), "lonely.png", "has no target image")
    assert len(FolderSource(folder, skip_bad=True).skipped) == 1

    good = (folder / "images" / "000.png").read_bytes()
    table = _datasets_table(tmp_path / "table", image=[{"bytes": good, "path": None}],
                            conditioning_image=[{"bytes": good, "path": None}], caption=["x"])
    one_line(lambda: open_source(table), "no column 'text'", "it has", "--caption_column")
    cells = [{"bytes": good, "path": None}, {"bytes": b"junk", "path": None}]
    broken = _datasets_table(tmp_path / "broken", image=cells, conditioning_image=[cells[0]] * 2, text=["x", "y"])
    one_line(lambda: open_source(broken), "row 1", "column 'image' is not a readable image")
    fake = tmp_path / "fake.parquet"
    fake.write_text("this is not parquet")
    one_line(lambda: open_source(fake), "fake.parquet", "not a readable parquet")


def test_a_missing_package_is_one_line_saying_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    from ldm.errors import InputError
    from training.streaming import ShardStream

    monkeypatch.setitem(sys.modules, "datasets", None)
    monkeypatch.setitem(sys.modules, "webdataset", None)
    (tmp_path / "t.parquet").write_bytes(b"")
    with pytest.raises(InputError, match="pip install datasets"):
        open_source(tmp_path / "t.parquet")
    with pytest.raises(InputError, match="pip install webdataset"):
        ShardStream(tmp_path / "x.tar", batch_size=1)


# ----- numbered checkpoints and validation samples -----------------------------------------------------------
@pytest.mark.slow
def test_keep_last_and_resume_from_the_newest_intact_checkpoint(workspace: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    common = ["--config", TINY, "--resume_path", str(workspace / "ini.ckpt"), "--data", str(workspace / "data"),
              "--out", str(out), "--batch_size", "2", "--logger_freq", "1000", "--save_every", "1", "--keep_last",
              "2", "--validation_image", str(workspace / "data" / "source" / "0.png"), "--validation_prompt",
              "a circle", "--validation_steps", "2", "--log_ddim_steps", "2"]
    assert tutorial_train.main([*common, "--max_steps", "3"]) == 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000002.ckpt", "step-00000003.ckpt"]
    validation = out / "image_log" / "validation"
    assert {"baseline.png", "step_000000.png", "step_000002.png", "step_000003.png", "fidelity.csv"} <= \
        {p.name for p in validation.iterdir()}
    assert "edge_f1" in (validation / "fidelity.csv").read_text()  # outline hints are edge maps: scored
    data = (out / "last.ckpt").read_bytes()
    (out / "last.ckpt").write_bytes(data[: len(data) // 2])  # a damaged last.ckpt
    capsys.readouterr()
    assert tutorial_train.main([*common, "--max_steps", "4", "--resume"]) == 0
    assert "passing over" in capsys.readouterr().out
    assert torch.load(out / "last.ckpt", weights_only=True)["global_step"] == 4
