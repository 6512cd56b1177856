"""The ControlledUnetModel and the ControlNet against the original's outputs, and ControlLDM's control path."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from conftest import reference_file, rel_err, tiny_inputs

from cldm.cldm import GUESS_MODE_DECAY, ControlledUnetModel, ControlNet, guess_mode_scales

pytestmark = pytest.mark.usefixtures("single_thread")

TOL = 1e-5


@dataclass
class Reference:
    meta: dict[str, Any]
    io: dict[str, torch.Tensor]
    unet: ControlledUnetModel
    control: ControlNet
    residuals: list[torch.Tensor]


@pytest.fixture(scope="module")
def ref() -> Reference:
    from safetensors.torch import load_file

    meta = json.loads(reference_file("tiny_v15_unet_controlnet.json").read_text())
    tensors = load_file(str(reference_file("tiny_v15_unet_controlnet.safetensors")))

    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    params = meta["params"]
    unet = ControlledUnetModel(**params, out_channels=4).eval()
    control = ControlNet(**params, hint_channels=3).eval()
    unet.load_state_dict(part("v15.unet."), strict=True)
    control.load_state_dict(part("v15.control."), strict=True)
    io = part("v15.io.")
    with torch.no_grad():
        residuals = control(io["x"], io["hint"], io["t"], io["ctx"])
    return Reference(meta, io, unet, control, residuals)


def test_reference_residual_count(ref: Reference) -> None:
    assert ref.control.num_residuals == ref.meta["n_control"] == len(ref.residuals)


@pytest.mark.parametrize("index", range(5))
def test_control_residual_matches_original(ref: Reference, index: int) -> None:
    expected = ref.io[f"control{index}"]
    assert ref.residuals[index].shape == expected.shape
    assert rel_err(ref.residuals[index], expected) < TOL


@pytest.mark.parametrize("name", ["eps", "eps_mid", "eps_none", "eps_guess"])
def test_unet_output_matches_original(ref: Reference, name: str) -> None:
    control: list[torch.Tensor] | None = list(ref.residuals)
    only_mid = name == "eps_mid"
    if name == "eps_none":
        control = None
    elif name == "eps_guess":
        control = [r * s for r, s in zip(ref.residuals, ref.meta["guess_scales"])]
    io = ref.io
    with torch.no_grad():
        out = ref.unet(io["x"], io["t"], io["ctx"], control=control, only_mid_control=only_mid)
    assert out.shape == io[name].shape
    assert rel_err(out, io[name]) < TOL


def test_reference_outputs_are_distinct(ref: Reference) -> None:
    """Guard against a vacuous reference: each control variant changes the output."""
    io = ref.io
    for a, b in (("eps", "eps_none"), ("eps", "eps_mid"), ("eps", "eps_guess"), ("eps_mid", "eps_none")):
        assert rel_err(io[a], io[b]) > 1e-2, (a, b)


def test_guess_mode_scales() -> None:
    assert guess_mode_scales(5, 0.7) == pytest.approx([0.7 * 0.825 ** (4 - i) for i in range(5)], rel=1e-12)
    sd_scales = guess_mode_scales()
    assert len(sd_scales) == 13 and sd_scales[-1] == 1.0
    assert sd_scales[0] == pytest.approx(GUESS_MODE_DECAY**12)


def test_guess_mode_scales_match_reference() -> None:
    meta = json.loads(reference_file("tiny_v15_unet_controlnet.json").read_text())
    assert guess_mode_scales(meta["n_control"], 0.7) == pytest.approx(meta["guess_scales"], rel=1e-12)


def test_wrong_residual_count_raises(ref: Reference) -> None:
    io = ref.io
    with pytest.raises(ValueError, match="control residuals"):
        ref.unet(io["x"], io["t"], io["ctx"], control=list(ref.residuals[:-1]))


# ----- ControlLDM on models/cldm_tiny.yaml ------------------------------------------------------------------
def _cond(inp: dict[str, torch.Tensor], hint: bool = True) -> dict[str, Any]:
    return {"c_concat": [inp["hint"]] if hint else None, "c_crossattn": [inp["ctx"]]}


def test_apply_model_with_and_without_control(tiny_model: Any) -> None:
    inp = tiny_inputs()
    unet = tiny_model.model.diffusion_model
    with torch.no_grad():
        with_control = tiny_model.apply_model(inp["x"], inp["t"], _cond(inp))
        without = tiny_model.apply_model(inp["x"], inp["t"], _cond(inp, hint=False))
        residuals = tiny_model.control_model(x=inp["x"], hint=inp["hint"], timesteps=inp["t"], context=inp["ctx"])
        by_hand = unet(inp["x"], inp["t"], context=inp["ctx"], control=residuals)
        plain = unet(inp["x"], inp["t"], context=inp["ctx"])
    assert with_control.shape == inp["x"].shape
    assert len(residuals) == tiny_model.control_model.num_residuals == 5
    assert torch.equal(without, plain)
    assert torch.allclose(with_control, by_hand, rtol=1e-5, atol=1e-6)
    assert rel_err(with_control, without) > 1e-3


def test_zero_control_scales_equal_no_control(tiny_model: Any) -> None:
    inp = tiny_inputs()
    with torch.no_grad():
        without = tiny_model.apply_model(inp["x"], inp["t"], _cond(inp, hint=False))
        tiny_model.control_scales = [0.0] * 5
        zero = tiny_model.apply_model(inp["x"], inp["t"], _cond(inp))
    assert torch.equal(zero, without)


def test_control_scales_multiply_residuals(tiny_model: Any) -> None:
    inp = tiny_inputs()
    scales = [0.1, 0.5, 1.5, 0.0, 2.0]
    with torch.no_grad():
        residuals = tiny_model.control_model(x=inp["x"], hint=inp["hint"], timesteps=inp["t"], context=inp["ctx"])
        expected = tiny_model.model.diffusion_model(inp["x"], inp["t"], context=inp["ctx"],
                                                    control=[r * s for r, s in zip(residuals, scales)])
        tiny_model.control_scales = scales
        out = tiny_model.apply_model(inp["x"], inp["t"], _cond(inp))
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_only_mid_control_ignores_skip_residuals(tiny_model: Any) -> None:
    inp = tiny_inputs()
    with torch.no_grad():
        full = tiny_model.apply_model(inp["x"], inp["t"], _cond(inp))
        tiny_model.only_mid_control = True
        mid = tiny_model.apply_model(inp["x"], inp["t"], _cond(inp))
        tiny_model.control_scales = [7.0, -3.0, 0.0, 5.0, 1.0]  # skip scales must not matter
        mid_rescaled = tiny_model.apply_model(inp["x"], inp["t"], _cond(inp))
        tiny_model.only_mid_control = False
        tiny_model.control_scales = [0.0, 0.0, 0.0, 0.0, 1.0]
        mid_by_scales = tiny_model.apply_model(inp["x"], inp["t"], _cond(inp))
    assert torch.equal(mid, mid_rescaled)
    assert torch.equal(mid, mid_by_scales)
    assert rel_err(mid, full) > 1e-3


def _backward(model: Any) -> None:
    inp = tiny_inputs(seed=3)
    model.train()
    out = model.apply_model(inp["x"], inp["t"], _cond(inp))
    out.square().mean().backward()


def test_locked_sd_takes_no_gradient(tiny_model: Any) -> None:
    assert tiny_model.sd_locked
    _backward(tiny_model)
    unet = tiny_model.model.diffusion_model
    with_grad = [name for name, p in unet.named_parameters() if p.grad is not None]
    assert with_grad == []
    missing = [name for name, p in tiny_model.control_model.named_parameters() if p.grad is None]
    assert missing == []
    assert any(p.grad.abs().sum() > 0 for p in tiny_model.control_model.parameters())
    for part in (tiny_model.first_stage_model, tiny_model.cond_stage_model):
        assert all(p.grad is None for p in part.parameters())

    optimizer = tiny_model.configure_optimizers()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in tiny_model.control_model.parameters()}
    assert optimizer.param_groups[0]["lr"] == tiny_model.learning_rate


def test_optimizer_choice(tiny_model: Any) -> None:
    """Fused AdamW by default; 8-bit AdamW refuses a CPU model in one line instead of failing in bitsandbytes."""
    assert tiny_model.configure_optimizers().defaults["fused"]
    tiny_model.optimizer = "adamw8bit"
    with pytest.raises(ValueError, match="CUDA GPUs only.*on cpu: use the optimizer adamw"):
        tiny_model.configure_optimizers()
    tiny_model.optimizer = "sgd"
    with pytest.raises(ValueError, match="one of adamw, adamw8bit"):
        tiny_model.configure_optimizers()
    tiny_model.optimizer = "adamw"


def test_unlocked_sd_trains_decoder_only(tiny_model: Any) -> None:
    tiny_model.sd_locked = False
    unet = tiny_model.model.diffusion_model
    _backward(tiny_model)
    decoder = {id(p) for m in (unet.output_blocks, unet.out) for p in m.parameters()}
    encoder = {id(p) for m in (unet.input_blocks, unet.middle_block, unet.time_embed) for p in m.parameters()}
    assert all(p.grad is not None for p in unet.output_blocks.parameters())
    assert all(p.grad is not None for p in unet.out.parameters())
    assert all(p.grad is None for p in unet.parameters() if id(p) in encoder)

    optimizer = tiny_model.configure_optimizers()
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    control = {id(p) for p in tiny_model.control_model.parameters()}
    assert in_optimizer == control | decoder
    assert not in_optimizer & encoder
    frozen = {id(p) for m in (tiny_model.first_stage_model, tiny_model.cond_stage_model) for p in m.parameters()}
    assert not in_optimizer & frozen


def test_relocking_freezes_decoder_again(tiny_model: Any) -> None:
    tiny_model.sd_locked = False
    tiny_model.sd_locked = True
    assert not any(p.requires_grad for p in tiny_model.model.diffusion_model.parameters())
    assert all(p.requires_grad for p in tiny_model.control_model.parameters())
