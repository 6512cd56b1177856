"""Shared fixtures: the reference directory, and a seeded tiny ControlLDM.

The project is installed (`pip install -e .`), so tests import it from any folder."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from launcher import run_command

ROOT = Path(__file__).resolve().parents[1]

REFERENCE_DIR = ROOT.parent / "shared" / "reference"
TINY_CONFIG = ROOT / "models" / "cldm_tiny.yaml"
TINY = str(TINY_CONFIG)
TINY_SEED = 1234


@pytest.fixture(scope="module")
def single_thread() -> Iterator[None]:
    """One intra-op thread for the module (`pytestmark = pytest.mark.usefixtures("single_thread")`).

    For tiny models on a small, shared CPU, OpenMP hand-offs cost far more than the arithmetic: a tiny
    ControlLDM forward takes 0.04 s on one thread and 0.6-5 s on two busy cores. Setting OMP_NUM_THREADS
    turns this off.
    """
    if "OMP_NUM_THREADS" in os.environ:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reference_file(name: str) -> Path:
    """A file of ../shared/reference. Without it the test skips on a developer's machine, and fails in CI (where `CI`
    is set and the reference must be there): a reference check must never pass by not running."""
    path = REFERENCE_DIR / name
    if not path.is_file():
        message = f"reference file {name} not found in {REFERENCE_DIR}"
        if os.environ.get("CI"):
            pytest.fail(f"{message}: CI must provide ../shared/reference beside the checkout")
        pytest.skip(f"{message} (CI provides it there)")
    return path


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """norm(out - ref) / norm(ref), in float64."""
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm())


def build_tiny(tmp_path: Path | None = None, **overrides: Any) -> Any:
    """`create_model` on models/cldm_tiny.yaml, with `model.params` overridden through OmegaConf.

    The result is built deferred (not initialised): load a state dict into it, or let it materialise itself.
    """
    from omegaconf import OmegaConf

    from cldm.model import create_model

    if not overrides:
        return create_model(TINY_CONFIG)
    if tmp_path is None:
        raise ValueError("overrides need a tmp_path to write the edited config to")
    config = OmegaConf.load(TINY_CONFIG)
    config.model.params = OmegaConf.merge(config.model.params, overrides)
    path = tmp_path / "cldm_tiny_override.yaml"
    OmegaConf.save(config, path)
    return create_model(path)


@pytest.fixture(scope="session")
def tiny_state() -> dict[str, torch.Tensor]:
    """The full state dict of a tiny ControlLDM with seeded random weights.

    A fresh model's zero-initialised layers (zero convs, the hint block's last conv, the UNet's output
    conv, transformer `proj_out`s, the second conv of each ResBlock) make its output identically zero and
    its control ineffective; here they get small random values too, so that every path is exercised.
    """
    torch.manual_seed(TINY_SEED)
    model = build_tiny()
    model.materialize()
    generator = torch.Generator().manual_seed(TINY_SEED)
    with torch.no_grad():
        for part in (model.model.diffusion_model, model.control_model):
            for p in part.parameters():
                if not p.any():
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return {k: v.detach().clone() for k, v in torch.nn.Module.state_dict(model).items()}


@pytest.fixture(scope="session")
def tiny_session_model(tiny_state: dict[str, torch.Tensor]) -> Any:
    model = build_tiny()
    model.load_state_dict(tiny_state)
    return model.eval()


def _reset(model: Any) -> None:
    model.eval()
    model.control_scales = [1.0] * model.control_model.num_residuals
    model.only_mid_control = False
    model.sd_locked = True
    model.zero_grad(set_to_none=True)


@pytest.fixture
def tiny_model(tiny_session_model: Any) -> Iterator[Any]:
    """The session's tiny ControlLDM (eval mode, locked SD, unit control scales), reset after each test.

    Tests may change its flags and take gradients, but must not change its weights.
    """
    _reset(tiny_session_model)
    yield tiny_session_model
    _reset(tiny_session_model)


def tiny_inputs(batch: int = 2, seed: int = 0, size: int = 8) -> dict[str, torch.Tensor]:
    """Latent x [B,4,size,size], timesteps, a text context [B,77,32] and a hint [B,3,8*size,8*size]."""
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(batch, 4, size, size, generator=g),
        "t": torch.randint(0, 1000, (batch,), generator=g),
        "ctx": torch.randn(batch, 77, 32, generator=g),
        "hint": torch.rand(batch, 3, 8 * size, 8 * size, generator=g),
    }


# ----- training as a user runs it ---------------------------------------------------------------------------
def run_script(*args: str) -> subprocess.CompletedProcess:
    result = run_command(args, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.fixture(scope="session")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user's first two steps, as they run them: generated Fill50K data and tool_add_control.py.

    Shared by the modules that train on it; tests write only into folders of their own under it."""
    from cldm.model import create_model

    root = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    model = create_model(TINY)
    model.materialize()
    base = {k: v for k, v in model.state_dict().items() if not k.startswith("control_model.")}
    trained_like(base)
    torch.save({"state_dict": base}, root / "sd.ckpt")
    run_script("training/make_fill50k.py", "--out", str(root / "data"), "--n", "8", "--size", "64", "--seed", "0")
    run_script("tool_add_control.py", str(root / "sd.ckpt"), str(root / "ini.ckpt"), "--config", TINY)
    return root


def trained_like(state: dict[str, torch.Tensor], seed: int = 0) -> None:
    """Give the layers a fresh build zero-initialises (the UNet's output conv, every block's last layer) small
    random values, as a trained SD has. A fresh UNet outputs exactly zero whatever its input, which would make a
    training run's loss and weights independent of the data, and tests of data order unable to fail."""
    generator = torch.Generator().manual_seed(seed)
    for value in state.values():
        if value.is_floating_point() and value.ndim > 1 and not value.any():
            value.copy_(torch.randn(value.shape, generator=generator) * 0.05)


def train_args(workspace: Path, out: Path, *extra: str) -> list[str]:
    if "--logger_freq" not in extra:
        extra = ("--logger_freq", "100", *extra)
    return ["--config", TINY, "--resume_path", str(workspace / "ini.ckpt"), "--data", str(workspace / "data"),
            "--out", str(out), "--batch_size", "2", "--log_ddim_steps", "2", "--learning_rate", "1e-3", *extra]


def run_train(args: list[str]) -> subprocess.CompletedProcess:
    return run_command([str(ROOT / "tutorial_train.py"), *args], cwd=ROOT)
