"""Streamed tar shards: exact resume mid-shard with two workers, disjoint DDP ranks, bad shards named."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import TINY

import tutorial_train
from ldm.errors import user_message
from training.make_fill50k import make_fill50k
from training.make_webdataset import shard_pattern, write_shards
from training.sources import DatasetError, PromptJsonSource
from training.streaming import POSITION_KEY, ShardStream


@pytest.fixture(scope="module")
def items(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stream")
    make_fill50k(root / "fill", n=32, size=64, seed=0)
    return root / "fill"


def _shards(items: Path, out: Path, size: int) -> str:
    return shard_pattern(write_shards(PromptJsonSource(items), out, shard_size=size))


def _prompts(stream: ShardStream, batches: int) -> list[str]:
    loader = iter(stream.loader())
    return [p for _ in range(batches) for p in next(loader)["txt"]]


def test_one_epoch_reads_every_item_once_and_epochs_reshuffle(items: Path, tmp_path: Path) -> None:
    pattern = _shards(items, tmp_path / "s", size=4)
    stream = ShardStream(pattern, batch_size=4, num_workers=2, seed=0)
    seen = _prompts(stream, 16)
    everything = [json.loads(line)["prompt"] for line in (items / "prompt.json").read_text().splitlines()]
    assert sorted(seen[:32]) == sorted(everything) and sorted(seen[32:]) == sorted(everything)
    assert seen[:32] != seen[32:]


@pytest.mark.slow
def test_two_worker_stream_stopped_mid_shard_resumes_to_the_same_weights(items: Path, workspace: Path,
                                                                         tmp_path: Path) -> None:
    pattern = _shards(items, tmp_path / "s", size=3)
    common = ["--config", TINY, "--resume_path", str(workspace / "ini.ckpt"), "--data", pattern, "--batch_size", "2",
              "--num_workers", "2", "--logger_freq", "1000", "--learning_rate", "1e-3", "--save_every", "3"]
    full, part = tmp_path / "full", tmp_path / "part"
    assert tutorial_train.main([*common, "--out", str(full), "--max_steps", "5"]) == 0
    assert tutorial_train.main([*common, "--out", str(part), "--max_steps", "3"]) == 0
    stopped = torch.load(part / "last.ckpt", weights_only=True)
    positions = stopped["callbacks"]["ExactResume"]["order"]["positions"]
    assert set(positions) == {0, 1} and any(p[2] % 3 for p in positions.values())  # a worker stopped mid-shard
    assert tutorial_train.main([*common, "--out", str(part), "--max_steps", "5", "--resume"]) == 0
    a = torch.load(full / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(part / "last.ckpt", weights_only=True)["state_dict"]
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    # A resume with another worker count cannot continue the same stream: one line saying so.
    assert tutorial_train.main([*common, "--out", str(part), "--max_steps", "6", "--resume",
                                "--num_workers", "1"]) == 2


class _RecordPrompts(pl.LightningModule):
    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder, self.weight = folder, torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        with open(self.folder / f"rank{self.global_rank}.txt", "a") as f:
            f.write("\n".join(batch["txt"]) + "\n")
        return self.weight.sum() * batch["jpg"].mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
def test_two_ddp_ranks_read_disjoint_items_whose_union_is_the_epoch(items: Path, tmp_path: Path) -> None:
    stream = ShardStream(_shards(items, tmp_path / "s", size=4), batch_size=4, seed=0)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=4, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, use_distributed_sampler=False)
    trainer.fit(_RecordPrompts(tmp_path), stream.loader())
    rank0, rank1 = ((tmp_path / f"rank{r}.txt").read_text().splitlines() for r in (0, 1))
    everything = [json.loads(line)["prompt"] for line in (items / "prompt.json").read_text().splitlines()]
    assert len(rank0) == len(rank1) == 16 and not set(rank0) & set(rank1)
    assert sorted(rank0 + rank1) == sorted(everything)


def _tar(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_bad_shards_name_the_shard_and_key(items: Path, tmp_path: Path) -> None:
    good = (items / "target" / "0.png").read_bytes()
    hint = (items / "source" / "0.png").read_bytes()
    cases = {
        "garbage": ({"a.png": b"not a png", "a.hint.png": hint, "a.txt": b"x"}, "key a: a.png is not a readable"),
        "no_caption": ({"a.png": good, "a.hint.png": hint}, "key a: no caption"),
        "no_target": ({"a.hint.png": hint, "a.txt": b"x"}, "key a: no target image"),
        "no_hint": ({"a.png": good, "a.txt": b"x"}, "key a: no hint"),
    }
    for name, (members, message) in cases.items():
        _tar(tmp_path / f"{name}.tar", members)
        with pytest.raises(DatasetError, match=message) as caught:
            next(iter(ShardStream(tmp_path / f"{name}.tar", batch_size=1).loader()))
        assert str(tmp_path / f"{name}.tar") in str(caught.value) and "\n" not in str(caught.value)
    # A truncated shard: what came before the cut is read, then one line naming the shard.
    whole = {f"{k}.{s}": v for k in "abcd" for s, v in (("png", good), ("hint.png", hint), ("txt", b"x"))}
    _tar(tmp_path / "cut.tar", whole)
    data = (tmp_path / "cut.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"cut.tar: corrupt or truncated shard after \d samples"):
        _prompts(ShardStream(tmp_path / "cut.tar", batch_size=1), 4)


def test_skip_bad_counts_skips_in_the_batch_position(items: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    good = (items / "target" / "0.png").read_bytes()
    hint = (items / "source" / "0.png").read_bytes()
    _tar(tmp_path / "mixed.tar", {"a.png": good, "a.hint.png": hint, "a.txt": b"one", "b.png": b"junk",
                                  "b.hint.png": hint, "b.txt": b"two", "c.png": good, "c.hint.png": hint,
                                  "c.txt": b"three"})
    stream = ShardStream(tmp_path / "mixed.tar", batch_size=2, skip_bad=True)
    batch = next(iter(stream.loader()))
    assert batch["txt"] == ["one", "three"]
    stream.observe(batch)
    assert batch[POSITION_KEY].tolist() == [0, 0, 0, 3, 1] and stream.skipped() == 1
    err = capsys.readouterr().err
    assert "skipped: " in err and "mixed.tar key b: b.png is not a readable image" in err


def test_missing_shard_and_too_few_shards_for_the_workers(items: Path, tmp_path: Path) -> None:
    pattern = _shards(items, tmp_path / "s", size=16)  # 2 shards
    with pytest.raises(FileNotFoundError, match="shard-00002.tar: shard not found"):
        ShardStream(pattern.replace("00001", "00002"), batch_size=2)
    with pytest.raises(DatasetError, match="2 shards for 1 ranks x 3 loader workers") as caught:
        next(iter(ShardStream(pattern, batch_size=2, num_workers=3).loader()))
    # Raised in a loader worker, it still prints as its own one line.
    assert user_message(caught.value).startswith(f"{ShardStream(pattern, batch_size=2).description}: 2 shards")
