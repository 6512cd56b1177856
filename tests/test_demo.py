"""The built-in demo: its configs agree, pretraining is reproducible, and a quick run goes end to end."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from training.pretrain_base import PretrainConfig, base_state_dict, fill50k_batch, learning_rate_at, pretrain

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "base_fill50k.yaml"
DEMO_CONFIG = ROOT / "configs" / "demo_fill50k.yaml"


def test_demo_config_is_the_base_model_with_a_locked_sd() -> None:
    """tool_add_control.py copies the base into the demo's ControlLDM: the two model sections must agree."""
    base, demo = OmegaConf.load(BASE_CONFIG), OmegaConf.load(DEMO_CONFIG)
    assert OmegaConf.to_container(base.model) == OmegaConf.to_container(demo.model)
    params = demo.model.params
    assert params.sd_locked and params.first_stage_config.target.endswith("IdentityFirstStage")
    assert params.control_stage_config.params.hint_downsample == 1


def test_fill50k_batches_are_a_function_of_seed_and_step() -> None:
    x, prompts = fill50k_batch(seed=0, step=3, batch_size=4, size=32, drop_prompt=0.5)
    y, again = fill50k_batch(seed=0, step=3, batch_size=4, size=32, drop_prompt=0.5)
    assert torch.equal(x, y) and prompts == again
    assert x.shape == (4, 3, 32, 32) and x.min() >= -1 and x.max() <= 1
    assert not torch.equal(x, fill50k_batch(seed=0, step=4, batch_size=4, size=32, drop_prompt=0.5)[0])


def test_learning_rate_warms_up_then_decays_to_a_tenth() -> None:
    cfg = PretrainConfig(steps=100, warmup_steps=10, learning_rate=1.0)
    assert learning_rate_at(0, cfg) == 0.1 and learning_rate_at(9, cfg) == 1.0
    assert abs(learning_rate_at(99, cfg) - 0.1) < 1e-3


def test_pretraining_is_reproducible_and_saves_sd_keys_only() -> None:
    """Two 4-step runs with one seed give identical weights; the checkpoint has no control_model.* keys,
    and both the UNet's encoder and the text encoder learn (ControlledUnetModel.forward would not train them).

    Four steps, because the zero-initialised output layers pass no gradient to the text encoder until the
    third step."""
    from cldm.model import create_model

    def run() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = create_model(BASE_CONFIG)
        model.materialize()
        before = {k: v.clone() for k, v in base_state_dict(model).items()}
        pretrain(model, PretrainConfig(steps=4, batch_size=2, warmup_steps=1, seed=0), log=lambda _: None)
        after = base_state_dict(model)
        key = "model.diffusion_model.input_blocks.0.0.weight"
        assert not torch.equal(before[key], after[key])
        text_key = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
        assert not torch.equal(before[text_key], after[text_key])
        assert not model.cond_stage_model.training and not any(p.requires_grad for p in model.parameters()
                                                               if p in set(model.cond_stage_model.parameters()))
        return after

    first, second = run(), run()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not any(k.startswith("control_model.") for k in first)
    assert any(k.startswith("model.diffusion_model.") for k in first)
    assert any(k.startswith("cond_stage_model.") for k in first)
    assert "alphas_cumprod" in first


@pytest.mark.slow
def test_quick_demo_runs_end_to_end(tmp_path: Path) -> None:
    """`demo.py --quick` runs every stage as a subprocess, the way `make demo` does, at smoke-test length.

    Asserted: every stage succeeds; the base checkpoint, last.ckpt, fidelity.csv (rows at steps 0, 2 and 4, the
    same baseline in each), fidelity.png, the held-out grid and training grids exist; the last line of the
    evaluation reads `iou=0.xxx baseline=0.xxx`. Not asserted: any score's value. After 4 pretraining and 4
    control steps the images are noise, so IoU is whatever noise gives. It can fail when tutorial_train.py or
    tool_add_control.py change their flags or outputs (then the demo needs the same change), or on a machine
    so loaded that the 600-second timeout runs out (it takes about a minute on an idle 2-core CPU).
    """
    out = tmp_path / "demo"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "demo.py", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("base.ckpt", "last.ckpt", "fidelity.csv", "fidelity.png", "heldout.png", "base_samples.png"):
        assert (out / name).is_file(), name
    assert list((out / "image_log" / "train").glob("*.png"))
    with open(out / "fidelity.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    assert len({r["baseline"] for r in rows}) == 1
    scores = [line for line in result.stdout.splitlines() if line.startswith("iou=")]
    assert scores and re.fullmatch(r"iou=\d\.\d{3} baseline=\d\.\d{3}", scores[-1])
