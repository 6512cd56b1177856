"""Training as a user runs it: tutorial_train.py on the tiny config, resume, NaN stop, atomic writes, DDP."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from conftest import ROOT, TINY, run_train, train_args

from cldm.model import create_model, load_state_dict
from training.loop import AtomicCheckpointIO, LastCheckpoint, ResumableSampler, Throughput


@pytest.mark.slow
def test_train_then_resume_equals_uninterrupted_run(workspace: Path) -> None:
    """The whole path: train 4 steps; and 2 steps, stop, resume to 4: the same weights bit for bit."""
    full, part = workspace / "full", workspace / "part"
    for args in (train_args(workspace, full, "--max_steps", "4", "--save_every", "2", "--logger_freq", "2"),
                 train_args(workspace, part, "--max_steps", "2", "--save_every", "2"),
                 train_args(workspace, part, "--max_steps", "4", "--save_every", "2", "--resume")):
        result = run_train(args)
        assert result.returncode == 0, result.stderr[-2000:]
    a = torch.load(full / "last.ckpt", weights_only=True)
    b = torch.load(part / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 4
    assert a["state_dict"].keys() == b["state_dict"].keys()
    different = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert different == []
    initial = load_state_dict(workspace / "ini.ckpt")
    moved = [k for k in initial if not torch.equal(initial[k], a["state_dict"][k])]
    assert all(k.startswith("control_model.") for k in moved)  # locked SD unchanged, bit for bit
    control_keys = [k for k in initial if k.startswith("control_model.")]
    assert len(moved) > len(control_keys) / 2
    grids = sorted(p.name for p in (full / "image_log" / "train").glob("*.png"))
    assert any(name.startswith("samples_cfg_scale_9.00_gs-000002") for name in grids)
    assert {name.split("_gs-")[0] for name in grids} == {"control", "conditioning", "reconstruction",
                                                          "samples_cfg_scale_9.00"}
    # The Lightning checkpoint's weights load strictly into the config's model.
    create_model(TINY).load_state_dict(load_state_dict(full / "last.ckpt"))


def stop_then_resume(workspace: Path, name: str, stop: signal.Signals, options: tuple[str, ...],
                     pause: float = 0.0) -> tuple[int, int, str]:
    """Start a long run, send `stop` to its process group (as a terminal's Ctrl-C or a scheduler reaches every
    process) once its first periodic checkpoint exists (and `pause` seconds more), check the exit status and the last
    line, then resume it and a never-stopped run to 2 steps further: the same weights bit for bit. Returns the step
    that `last.ckpt` held when it stopped, the step the message says it reached, and the stopped run's stderr."""
    out, reference = workspace / name, workspace / f"{name}_reference"
    command = [sys.executable, str(ROOT / "tutorial_train.py"),
               *train_args(workspace, out, "--max_steps", "1000", "--save_every", "3", "--logger_freq", "1000",
                           *options)]
    run = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    deadline = time.monotonic() + 240
    while not (out / "last.ckpt").is_file() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(pause)
    os.killpg(run.pid, stop)
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 128 + stop, stderr[-2000:]
    saved = torch.load(out / "last.ckpt", weights_only=True)["global_step"]
    last_line = stderr.strip().splitlines()[-1]
    said = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C"}[stop]
    reached = int(last_line.split(f"stopped by {said} at step ")[1].split(";")[0])
    assert f"last finite checkpoint: {out / 'last.ckpt'} (step {saved})" in last_line, last_line
    assert 3 <= saved <= reached < 1000
    steps = str(saved + 2)
    for args in (train_args(workspace, out, "--max_steps", steps, *options, "--resume"),
                 train_args(workspace, reference, "--max_steps", steps, *options)):
        result = run_train(args)
        assert result.returncode == 0, result.stderr[-2000:]
    resumed = torch.load(out / "last.ckpt", weights_only=True)
    uninterrupted = torch.load(reference / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == uninterrupted["global_step"] == saved + 2
    assert [k for k, v in uninterrupted["state_dict"].items() if not torch.equal(v, resumed["state_dict"][k])] == []
    return saved, reached, stderr


@pytest.mark.slow
@pytest.mark.parametrize("accumulate", [1, 2])
def test_sigterm_saves_between_steps_exits_143_and_resumes_exactly(workspace: Path, accumulate: int) -> None:
    """A preempted run (SIGTERM, as a cluster sends it) exits 143 (not 0) naming the checkpoint that holds its last
    completed step: the step it reached, saved then, unless it was stopped between the batches of an accumulated
    step (then the last periodic one); the same command with --resume ends with the weights of a run never stopped."""
    options = ("--accumulate_grad_batches", str(accumulate))
    saved, reached, _ = stop_then_resume(workspace, f"sigterm{accumulate}", signal.SIGTERM, options,
                                      pause=0.3 * (accumulate - 1))  # more likely to land inside an accumulated step
    if accumulate == 1:
        assert saved == reached


@pytest.mark.slow
def test_ctrl_c_finishes_the_step_saves_exits_130_and_resumes_exactly(workspace: Path) -> None:
    """The first Ctrl-C (SIGINT to the terminal's process group: the DataLoader worker gets it too) lets the
    accumulated step under way finish, saves it and exits 130; --resume then ends as a run never stopped."""
    options = ("--accumulate_grad_batches", "2", "--num_workers", "1")
    saved, reached, stderr = stop_then_resume(workspace, "ctrl_c", signal.SIGINT, options, pause=0.3)
    assert saved == reached
    assert stderr.count("Ctrl-C: stopping at the end of this step") == 1  # said once, not by the worker too


def test_throughput_is_measured_over_whole_accumulated_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """With 2 batches per optimizer step, the rate logged at each step is that step's samples (2 ranks x 2 batches
    x 16) over its whole time, not the last batch's; batches inside a step log nothing."""
    import training.loop

    clock = iter([1.0, 2.0, 4.0, 5.5, 7.5])  # read at the batch ends that complete a step (and the first)
    monkeypatch.setattr(training.loop.time, "perf_counter", lambda: next(clock))
    logged: list[float] = []
    module = SimpleNamespace(log=lambda name, value, **kwargs: logged.append(value))
    meter = Throughput(samples_per_batch=16)
    for step in [0, 1, 1, 2, 2, 3, 3, 4]:  # global_step after each batch: a step ends every second batch
        trainer = SimpleNamespace(global_step=step, world_size=2)
        meter.on_train_batch_end(trainer, module, None, None, 0)  # type: ignore[arg-type]
    # from the first batch's end: 1 batch in 1 s, then 2 batches in 2 s, 1.5 s and 2 s
    assert logged == [2 * 16 * 1 / 1.0, 2 * 16 * 2 / 2.0, 2 * 16 * 2 / 1.5, 2 * 16 * 2 / 2.0]


def test_a_second_ctrl_c_interrupts_at_once_and_the_handler_is_put_back(tmp_path: Path) -> None:
    """The first Ctrl-C only asks for a stop (no KeyboardInterrupt mid-update); a second one raises as Python
    does; after training the handler that was there before is back."""
    before = signal.getsignal(signal.SIGINT)
    callback = LastCheckpoint(tmp_path, every_n_steps=10)
    trainer = SimpleNamespace(is_global_zero=False, global_step=0, ckpt_path=None)
    callback.on_fit_start(trainer, None)  # type: ignore[arg-type]
    callback.on_train_start(trainer, None)  # type: ignore[arg-type]
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)  # the handler runs at the next bytecode boundary
        assert callback._stop_requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    finally:
        callback.teardown(None, None, "fit")  # type: ignore[arg-type]
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow
def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(workspace: Path) -> None:
    out = workspace / "nan"
    result = run_train(train_args(workspace, out, "--max_steps", "20", "--save_every", "1",
                                  "--learning_rate", "1e30"))
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert "the loss of step" in message and "last finite checkpoint" in message and str(out / "last.ckpt") in message
    saved = torch.load(out / "last.ckpt", weights_only=True)
    assert saved["global_step"] >= 1
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values() if t.is_floating_point())


@pytest.mark.slow
def test_bf16_training_holds_frozen_weights_in_bf16_and_saves_them_exactly(workspace: Path) -> None:
    """--precision bf16-mixed holds the locked SD in bf16 (auto); last.ckpt still has the fp32 SD weights."""
    out = workspace / "bf16"
    result = run_train(train_args(workspace, out, "--max_steps", "2", "--precision", "bf16-mixed"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "held in bfloat16" in result.stderr + result.stdout
    saved = torch.load(out / "last.ckpt", weights_only=True)["state_dict"]
    initial = load_state_dict(workspace / "ini.ckpt")
    assert {v.dtype for v in saved.values() if v.is_floating_point()} == {torch.float32}
    moved = [k for k in initial if not torch.equal(initial[k], saved[k])]
    assert moved and all(k.startswith("control_model.") for k in moved)


@pytest.mark.slow
def test_half_frozen_weights_need_mixed_precision(workspace: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import tutorial_train

    assert tutorial_train.main(train_args(workspace, tmp_path / "o", "--frozen_weights", "half")) == 2
    assert "--precision bf16-mixed" in capsys.readouterr().err


@pytest.mark.slow
def test_missing_initial_checkpoint_and_data_say_how_to_make_them(workspace: Path, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    import tutorial_train

    capsys.readouterr()
    assert tutorial_train.main(train_args(workspace, tmp_path / "o", "--resume_path", str(tmp_path / "none.ckpt"))) == 2
    err = capsys.readouterr().err.strip()
    assert "tool_add_control.py" in err and "\n" not in err
    assert tutorial_train.main(train_args(workspace, tmp_path / "o", "--data", str(tmp_path / "nodata"))) == 2
    err = capsys.readouterr().err.strip()
    assert "make_fill50k.py" in err and "\n" not in err


def test_atomic_checkpoint_write_keeps_previous_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, target)
    with pytest.raises(Exception):  # noqa: B017 - any pickling failure mid-write
        io.save_checkpoint({"w": torch.zeros(1000), "bad": lambda: None}, target)
    assert torch.load(target, weights_only=True)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_resumable_sampler_covers_each_epoch_and_resumes_mid_stream() -> None:
    sampler = ResumableSampler(5, seed=3)
    stream = iter(sampler)
    first = [next(stream) for _ in range(12)]
    assert sorted(first[:5]) == list(range(5)) and sorted(first[5:10]) == list(range(5))
    assert first[:5] != first[5:10]  # a new permutation each epoch
    sampler.start = 7
    resumed = iter(sampler)
    assert [next(resumed) for _ in range(5)] == first[7:12]


class _RecordWeights(pl.Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weights = {k: v.detach().clone() for k, v in pl_module.control_model.state_dict().items()}
        torch.save(weights, self.folder / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_two_processes_end_with_identical_weights(workspace: Path, tmp_path: Path) -> None:
    from torch.utils.data import DataLoader

    from training.dataset import ControlDataset

    model = create_model(TINY)
    model.load_state_dict(load_state_dict(workspace / "ini.ckpt"))
    model.learning_rate = 1e-3
    dataset = ControlDataset(workspace / "data")
    loader = DataLoader(dataset, batch_size=2, sampler=ResumableSampler(len(dataset), seed=0))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, use_distributed_sampler=False,
                         callbacks=[_RecordWeights(tmp_path)])
    trainer.fit(model, loader)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    initial = load_state_dict(workspace / "ini.ckpt")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert any(not torch.equal(rank0[k], initial["control_model." + k]) for k in rank0)


class _CtrlCOnRankOne(pl.Callback):
    """Sends SIGINT to rank `rank`'s own process at step 2 (in DDP: a Ctrl-C that reached one rank only) and
    records the step each rank ended at."""

    def __init__(self, folder: Path, rank: int = 1) -> None:
        self.folder, self.rank = folder, rank

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: object, batch: object,
                           batch_idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        (self.folder / f"rank{trainer.global_rank}.step").write_text(str(trainer.global_step))


@pytest.mark.slow
def test_ddp_ctrl_c_on_one_rank_stops_every_rank_at_the_same_step(workspace: Path, tmp_path: Path) -> None:
    """A stop asked on one rank only is reduced across ranks: both stop after step 2 and last.ckpt holds step 2
    (a rank that went on alone would wait for the other in its next all-reduce: the short timeout fails it)."""
    from datetime import timedelta

    from pytorch_lightning.strategies import DDPStrategy
    from torch.utils.data import DataLoader

    from training.dataset import ControlDataset

    model = create_model(TINY)
    model.load_state_dict(load_state_dict(workspace / "ini.ckpt"))
    model.learning_rate = 1e-3
    dataset = ControlDataset(workspace / "data")
    loader = DataLoader(dataset, batch_size=2, sampler=ResumableSampler(len(dataset), seed=0))
    strategy = DDPStrategy(start_method="spawn", timeout=timedelta(seconds=60))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=6, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, use_distributed_sampler=False,
                         callbacks=[_CtrlCOnRankOne(tmp_path), LastCheckpoint(tmp_path, every_n_steps=100)])
    trainer.fit(model, loader)
    assert [(tmp_path / f"rank{r}.step").read_text() for r in (0, 1)] == ["2", "2"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 2


@pytest.mark.slow
def test_after_a_ctrl_c_stop_the_previous_handler_is_back_and_a_second_fit_trains_on(workspace: Path,
                                                                                       tmp_path: Path) -> None:
    """In one process (a notebook): the fit stopped by Ctrl-C at step 2 puts the SIGINT handler back as it was; the
    same callback in a second fit to step 4 is not still "stopping"."""
    from torch.utils.data import DataLoader

    from training.dataset import ControlDataset

    before = signal.getsignal(signal.SIGINT)
    model = create_model(TINY)
    model.load_state_dict(load_state_dict(workspace / "ini.ckpt"))
    model.learning_rate = 1e-3
    dataset = ControlDataset(workspace / "data")
    last = LastCheckpoint(tmp_path, every_n_steps=100)
    stops = []
    for max_steps, callbacks in ((6, [_CtrlCOnRankOne(tmp_path, rank=0), last]), (4, [last])):
        loader = DataLoader(dataset, batch_size=2, sampler=ResumableSampler(len(dataset), seed=0))
        trainer = pl.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, use_distributed_sampler=False, callbacks=callbacks)
        trainer.fit(model, loader)
        assert signal.getsignal(signal.SIGINT) is before
        stops.append((trainer.global_step, last.interrupted_at))
    assert stops == [(2, 2), (4, None)]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 4
