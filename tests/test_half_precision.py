"""Half-precision paths: GroupNorm32 on fp16/bf16 inputs and a ControlLDM whose networks are held in half
precision and run without autocast (how generation runs on a GPU)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny, rel_err, tiny_inputs

from ldm.modules.diffusionmodules.util import GroupNorm32

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_group_norm_half_inputs_keep_their_dtype_and_float32_statistics(dtype: torch.dtype, tolerance: float
                                                                         ) -> None:
    """Values of ~300: their squares summed over a group (~6e6) overflow fp16's 65504 if summed in fp16."""
    g = torch.Generator().manual_seed(0)
    norm = GroupNorm32(32, 64)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64, generator=g))
        norm.bias.copy_(torch.randn(64, generator=g))
    x = torch.randn(2, 64, 16, 16, generator=g) * 300 + 50
    reference = F.group_norm(x.double(), 32, norm.weight.double(), norm.bias.double(), norm.eps)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = norm(x.to(dtype))
        assert out.dtype == dtype and torch.isfinite(out).all()
        assert rel_err(out, reference) < tolerance
    assert norm(x).dtype == torch.float32 and rel_err(norm(x), reference) < 1e-6


def test_networks_held_in_bf16_run_without_autocast(tiny_state: dict[str, torch.Tensor]) -> None:
    model: Any = build_tiny()
    model.load_state_dict(tiny_state)
    model.eval()
    inputs = tiny_inputs()
    cond = {"c_concat": [inputs["hint"]], "c_crossattn": [inputs["ctx"]]}
    with torch.no_grad():
        full = model.apply_model(inputs["x"], inputs["t"], cond)
        full_image = model.decode_first_stage(inputs["x"])
        for net in (model.model, model.control_model, model.first_stage_model, model.cond_stage_model):
            net.to(torch.bfloat16)
        half = model.apply_model(inputs["x"], inputs["t"], cond)  # fp32 inputs, bf16 weights, no autocast
        half_image = model.decode_first_stage(inputs["x"])
        text = model.get_learned_conditioning(["a red circle"])
    assert half.dtype == half_image.dtype == text.dtype == torch.float32
    assert rel_err(half, full) < 0.05 and rel_err(half_image, full_image) < 0.05
