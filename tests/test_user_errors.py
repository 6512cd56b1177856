"""A hostile but fair user's mistakes, run as they run the command lines (subprocesses): each gets exit status 2, one
line on stderr that names the file (and line or key), no traceback, and nothing lost. The one place that turns
errors into that line is `ldm.errors.command_line`; its mapping is tested here too."""

from __future__ import annotations

import errno
import os
import pickle
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import TINY, train_args
from launcher import run_command
from PIL import Image

from ldm.errors import InputError, TrainingDiverged, command_line, user_message

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """One command line as a user types it (`python script.py ...` or `python -m module ...`), from the repo root."""
    return run_command(argv, cwd=ROOT, env={**os.environ, **(env or {})})


def run_all(commands: list[tuple[str, ...]]) -> list[subprocess.CompletedProcess]:
    """Several command lines, two at a time (the machine's cores)."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda argv: run(*argv), commands))


def one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit status 2 and a single `error: ...` line on stderr holding every needle; returns that line."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def train(workspace: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return run("tutorial_train.py", *train_args(workspace, out, *extra))


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


# ----- never a poisoned "last good" checkpoint -----------------------------------------------------------------
def test_an_update_to_non_finite_weights_is_never_saved(workspace: Path) -> None:
    out = workspace / "lr1e39"
    result = train(workspace, out, "--max_steps", "5", "--save_every", "1", "--learning_rate", "1e39")
    one_line_error(result, "step 1", "non-finite", "no checkpoint was written yet")
    assert not (out / "last.ckpt").exists()


def test_an_exploding_run_names_its_last_finite_checkpoint(workspace: Path) -> None:
    """lr 1e30: step 1's update stays finite (weights ~1e30, saved), step 2's loss is not: the run stops, naming
    the checkpoint of step 1, which holds exactly the state after step 1 (a run stopped there), all finite."""
    one_step, stopped = workspace / "explode1", workspace / "explode"
    first, second = run_all([
        ("tutorial_train.py", *train_args(workspace, one_step, "--max_steps", "1", "--learning_rate", "1e30")),
        ("tutorial_train.py", *train_args(workspace, stopped, "--max_steps", "5", "--save_every", "1",
                                          "--learning_rate", "1e30")),
    ])
    assert first.returncode == 0, first.stderr[-2000:]
    one_line_error(second, "step 2", f"last finite checkpoint: {stopped / 'last.ckpt'} (step 1)")
    named, reference = tensors(stopped / "last.ckpt"), tensors(one_step / "last.ckpt")
    assert named.keys() == reference.keys()
    assert all(torch.isfinite(t).all() for t in named.values() if t.is_floating_point())
    assert all(torch.equal(named[k], reference[k]) for k in named)
    assert max(float(t.abs().max()) for k, t in named.items() if k.startswith("control_model.")) > 1e20


def test_stale_temporaries_are_removed_and_checkpoints_get_normal_permissions(workspace: Path) -> None:
    out = workspace / "stale"
    out.mkdir()
    stale = out / ".last.ckpt.k1ll3d.tmp"
    stale.write_bytes(b"half of a checkpoint")
    unrelated = out / ".other.ckpt.abc.tmp"
    unrelated.write_bytes(b"not ours")
    result = train(workspace, out, "--max_steps", "1")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "removed 1 temporary file" in result.stdout
    assert not stale.exists() and unrelated.exists()
    mask = os.umask(0)
    os.umask(mask)
    assert (out / "last.ckpt").stat().st_mode & 0o777 == 0o666 & ~mask


# ----- one line instead of a traceback --------------------------------------------------------------------------
def test_resume_path_of_the_wrong_architecture(workspace: Path, tmp_path: Path) -> None:
    ini = torch.load(workspace / "ini.ckpt", weights_only=True)["state_dict"]
    no_control = tmp_path / "sd_only.ckpt"
    torch.save({"state_dict": {k: v for k, v in ini.items() if not k.startswith("control_model.")}}, no_control)
    no_zero_convs = tmp_path / "no_zero_convs.ckpt"
    torch.save({"state_dict": {k: v for k, v in ini.items() if ".zero_convs." not in k}}, no_zero_convs)
    wide = tmp_path / "sd2_wide.ckpt"
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    torch.save({"state_dict": {**ini, key: torch.zeros(ini[key].shape[0], 1024)}}, wide)
    results = run_all([("tutorial_train.py", *train_args(workspace, tmp_path / name, "--resume_path", str(path)))
                       for name, path in (("a", no_control), ("b", no_zero_convs), ("c", wide))])
    one_line_error(results[0], str(no_control), "no ControlNet weights", "tool_add_control.py")
    message = one_line_error(results[1], str(no_zero_convs), "missing", "control_model.zero_convs")
    assert "plain Stable Diffusion" not in message
    one_line_error(results[2], str(wide), "SD2.x", "text width 1024")


def test_a_text_file_named_pth_in_every_command(workspace: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("model:\n  target: cldm.cldm.ControlLDM\nthese are my notes, not weights\n")
    image = tmp_path / "hint.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    sd = str(workspace / "sd.ckpt")
    results = run_all([
        ("tool_add_control.py", str(text), str(tmp_path / "out.ckpt"), "--config", TINY),
        ("tool_transfer_control.py", "--base", sd, "--control", str(text), "--target", sd,
         "--out", str(tmp_path / "out2.ckpt"), "--config", TINY),
        ("tutorial_train.py", *train_args(workspace, tmp_path / "t", "--resume_path", str(text))),
        ("-m", "cldm.generate", "--config", TINY, "--ckpt", str(text), "--prompt", "x", "--image", str(image),
         "--width", "64", "--height", "64", "--out", str(tmp_path / "g.png")),
        ("-m", "training.fidelity", "--config", TINY, "--ckpt", str(text), "--n", "1"),
    ])
    for result in results:
        one_line_error(result, str(text), "not a checkpoint")


def test_a_pickle_holding_code_is_refused_for_safety(workspace: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code_ran"
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:  # protocol 4: torch would warn about the protocol before refusing
        pickle.dump({"state_dict": {}, "hook": _Exploit(marker)}, f, protocol=4)
    zipped = tmp_path / "evil_zip.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "hook": _Exploit(marker)}, zipped)
    results = run_all([("tool_add_control.py", str(evil), str(tmp_path / "o.ckpt"), "--config", TINY),
                       ("tutorial_train.py", *train_args(workspace, tmp_path / "t", "--resume_path", str(zipped)))])
    for result, path in zip(results, (evil, zipped)):
        one_line_error(result, str(path), "refused for safety")
        assert "weights_only" not in result.stderr and "pickle protocol" not in result.stderr
    assert not marker.exists()


class _Exploit:
    """Unpickling this runs a shell command (a harmless `touch`): a weights-only load must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def _dataset(root: Path, sizes: list[int], huge_line: int | None = None) -> Path:
    """A prompt.json dataset with one item per size; the item on `huge_line` has a 15000x15000 target."""
    (root / "source").mkdir(parents=True)
    (root / "target").mkdir()
    lines = []
    for i, size in enumerate(sizes, start=1):
        Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(root / "source" / f"{i}.png")
        if i == huge_line:  # 1-bit: 28 MB in memory, 225 megapixels in the header
            Image.new("1", (15000, 15000)).save(root / "target" / f"{i}.png")
        else:
            Image.fromarray(np.full((size, size, 3), 200, np.uint8)).save(root / "target" / f"{i}.png")
        lines.append(f'{{"source": "source/{i}.png", "target": "target/{i}.png", "prompt": "a circle"}}')
    (root / "prompt.json").write_text("\n".join(lines) + "\n")
    return root


def test_a_huge_image_is_a_bad_line_and_skip_bad_skips_it(workspace: Path, tmp_path: Path) -> None:
    data = _dataset(tmp_path / "huge", [64, 64, 64], huge_line=2)
    base = ["--data", str(data), "--max_steps", "1", "--batch_size", "1"]
    refused, skipped = run_all([("tutorial_train.py", *train_args(workspace, tmp_path / "a", *base)),
                                ("tutorial_train.py", *train_args(workspace, tmp_path / "b", *base, "--skip_bad"))])
    one_line_error(refused, "prompt.json:2", "target/2.png is too large", "225 megapixels", "downscale")
    assert skipped.returncode == 0, skipped.stderr[-2000:]
    assert "2 items, 1 skipped" in skipped.stdout and "line 2:" in skipped.stdout


def test_sizes_that_differ_between_lines_are_caught_before_training(workspace: Path, tmp_path: Path) -> None:
    data = _dataset(tmp_path / "mixed", [64, 64, 48])
    result = train(workspace, tmp_path / "o", "--data", str(data), "--max_steps", "1")
    one_line_error(result, "prompt.json", "64x64 (first on line 1)", "48x48 (first on line 3)", "--image_size")


def test_resume_from_a_truncated_or_incompatible_last_checkpoint(workspace: Path, tmp_path: Path) -> None:
    cut, other = tmp_path / "cut", tmp_path / "other"
    for done in run_all([("tutorial_train.py", *train_args(workspace, out, "--max_steps", "2", "--save_every", "2"))
                         for out in (cut, other)]):
        assert done.returncode == 0, done.stderr[-2000:]
    last = cut / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    truncated, batch = run_all([
        ("tutorial_train.py", *train_args(workspace, cut, "--max_steps", "4", "--resume")),
        ("tutorial_train.py", *train_args(workspace, other, "--max_steps", "4", "--resume", "--batch_size", "1")),
    ])
    one_line_error(truncated, str(last), "truncated")
    one_line_error(batch, "samples per step", "--batch_size")


def test_generation_names_the_base_of_the_wrong_family(workspace: Path, tmp_path: Path) -> None:
    ini = torch.load(workspace / "ini.ckpt", weights_only=True)["state_dict"]
    control = tmp_path / "control.pth"
    torch.save({k: v for k, v in ini.items() if k.startswith("control_model.")}, control)
    base = tmp_path / "sd2_base.ckpt"
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    torch.save({"state_dict": {**{k: v for k, v in ini.items() if not k.startswith("control_model.")},
                               key: torch.zeros(ini[key].shape[0], 48)}}, base)
    image = tmp_path / "hint.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    result = run("-m", "cldm.generate", "--config", TINY, "--ckpt", str(control), "--base", str(base),
                 "--prompt", "x", "--image", str(image), "--width", "64", "--height", "64",
                 "--out", str(tmp_path / "g.png"))
    message = one_line_error(result, str(base), "a model with text width 48")
    assert "an another" not in message


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("not weights\n")
    argv = ("tool_add_control.py", str(text), str(tmp_path / "o.ckpt"), "--config", TINY)
    for result in (run(*argv, "--debug"), run(*argv, env={"CONTROLNET_DEBUG": "1"})):
        assert result.returncode == 1 and "Traceback" in result.stderr and "CheckpointError" in result.stderr


# ----- the mapping itself ---------------------------------------------------------------------------------------
def test_user_message_maps_user_errors_and_leaves_bugs() -> None:
    assert user_message(InputError("data/prompt.json:3: bad\nmore")) == "data/prompt.json:3: bad"
    missing = FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/x.png")
    assert user_message(missing) == "/data/x.png: No such file or directory"
    full = OSError(errno.ENOSPC, "No space left on device", "/runs/last.ckpt")
    assert user_message(full) == "/runs/last.ckpt: No space left on device"
    assert user_message(Image.DecompressionBombError("Image size (225000000 pixels) exceeds limit")) is not None
    for bug in (ValueError("internal"), OSError("no errno"), KeyError("k"), RuntimeError("shape mismatch")):
        assert user_message(bug) is None


def test_command_line_reports_user_errors_and_keeps_bugs(capsys: pytest.CaptureFixture[str]) -> None:
    @command_line
    def diverges(argv: list[str] | None) -> int:
        raise TrainingDiverged("the loss of step 3 is nan")

    @command_line
    def buggy(argv: list[str] | None) -> int:
        raise ValueError("an internal bug")

    assert diverges([]) == 2
    assert capsys.readouterr().err == "error: the loss of step 3 is nan\n"
    with pytest.raises(ValueError, match="an internal bug"):
        buggy([])
    with pytest.raises(TrainingDiverged):
        diverges(["--debug"])
