"""What only a CUDA GPU can show: bf16 frozen weights with the encoders kept on the CPU, 8-bit AdamW, and the
low-memory training recipe through tutorial_train.py. Skipped without a GPU (CI has none); run on a lent one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_tiny, run_train, train_args
from test_options import tiny_batch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def cuda_model(tiny_state: dict[str, torch.Tensor]) -> Any:
    model = build_tiny()
    model.load_state_dict(tiny_state)
    return model.to("cuda").train()


def test_cached_training_keeps_encoders_on_cpu_in_bf16(cuda_model: Any) -> None:
    model = cuda_model
    model.hold_frozen_weights_in(torch.bfloat16)
    model.place_encoders("cpu")
    assert next(model.cond_stage_model.parameters()).device.type == "cpu"
    assert next(model.first_stage_model.decoder.parameters()).device.type == "cuda"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        x, c = model.get_input(tiny_batch(), model.first_stage_key)  # encoders on the CPU, results on the GPU
        assert x.device.type == c["c_crossattn"][0].device.type == "cuda"
        loss, _ = model(x, c)
    loss.backward()
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.control_model.parameters())
    log = model.log_images(tiny_batch(), N=2, ddim_steps=2)
    assert all(v.device.type == "cuda" and torch.isfinite(v).all() for v in log.values())


def test_adamw_8bit_steps_the_control_only(cuda_model: Any) -> None:
    pytest.importorskip("bitsandbytes")
    model = cuda_model
    model.optimizer = "adamw8bit"
    model.learning_rate = 1e-3
    optimizer = model.configure_optimizers()
    before = {k: v.clone() for k, v in torch.nn.Module.state_dict(model).items()}
    x, c = model.get_input(tiny_batch(), model.first_stage_key)
    loss, _ = model(x, c)
    loss.backward()
    optimizer.step()
    after = torch.nn.Module.state_dict(model)
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved and all(k.startswith("control_model.") for k in moved)


def test_low_memory_recipe_trains_through_tutorial_train(workspace: Path) -> None:  # noqa: F811
    pytest.importorskip("bitsandbytes")
    out = workspace / "gpu_lowmem"
    result = run_train(train_args(workspace, out, "--max_steps", "3", "--precision", "bf16-mixed", "--cache",
                                  str(workspace / "cache"), "--optimizer", "adamw8bit", "--logger_freq", "2"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "held in bfloat16" in result.stderr + result.stdout
    saved = torch.load(out / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 3


def test_generation_pipeline_in_fp16_matches_fp32(tiny_state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from cldm.generation import ControlNetPipeline, ControlUnit

    image = tmp_path / "hint.png"
    Image.fromarray((np.indices((64, 64)).sum(0) % 16 < 8).astype(np.uint8) * 255).convert("RGB").save(image)
    images = {}
    for dtype in (torch.float32, torch.float16):
        model = build_tiny()
        model.load_state_dict(tiny_state)
        pipe = ControlNetPipeline(model, device="cuda", dtype=dtype)
        result = pipe("a red ball", [ControlUnit(image)], width=64, height=64, steps=4, seed=3, progress=False)
        images[dtype] = np.asarray(result.images[0]).astype(float)
    assert np.abs(images[torch.float16] - images[torch.float32]).mean() < 2.0
