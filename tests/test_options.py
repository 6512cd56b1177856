"""Speed options give the default's numbers: channels_last memory format, on the tiny model and the reference.

torch.compile's numbers are not tested here: on this project's 2-core CPU machines inductor needs about 9
minutes to compile even the tiny UNet and ControlNet forward passes (C++ code generation and compilation of
every kernel), far beyond a unit test's budget; it was measured on a GPU instead (docs/BENCHMARKS.md). Only
that `compile_networks` compiles in place, leaving checkpoint names alone, is checked.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from cldm.cldm import ControlledUnetModel, ControlNet
from cldm.model import create_model
from ldm.modules.diffusionmodules.util import (
    CPU_CHECKPOINT_MIN_ELEMENTS,
    GEMM_CONV_MIN_REDUCTION,
    Conv2d,
    checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference" / "tiny_v15_unet_controlnet"
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


pytestmark = pytest.mark.usefixtures("single_thread")


def randomize_zero_inits(module: nn.Module, seed: int) -> None:
    """Give zero-initialised convs (zero convs, output convs) random weights, so outputs are not trivially 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)


def tiny_model(seed: int = 0) -> Any:
    torch.manual_seed(seed)
    model = create_model(REPO / "models" / "cldm_tiny.yaml")
    model.materialize()
    randomize_zero_inits(model.model.diffusion_model, seed)
    randomize_zero_inits(model.control_model, seed + 1)
    return model.train()


def tiny_batch(seed: int = 0, size: int = 64, n: int = 2) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "jpg": torch.rand(n, size, size, 3, generator=generator) * 2 - 1,
        "hint": (torch.rand(n, size, size, 3, generator=generator) > 0.8).float(),
        "txt": ["red circle on blue", ""][:n],
    }


def assert_close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5, msg: str = "") -> None:
    """Equal up to float rounding: differences measured against the tensor's largest magnitude.

    Random-weight networks reach activations in the thousands (the reference's hint block does), where a
    reordered float32 sum differs by 1e-3 in absolute terms and elements near zero by any relative amount.
    """
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0.0, atol=rel * scale + 1e-7, msg=msg or None)


def training_step(model: Any, batch: dict[str, Any], seed: int = 7) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and ControlNet gradients of one step at a fixed seed, with the noise `p_losses` draws itself.

    That noise must not follow the latent's memory format (as `randn_like` would), or under channels_last the
    same seed would put the same random numbers at other positions and the losses would not be comparable.
    """
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    x, c = model.get_input(batch, model.first_stage_key)
    loss, _ = model(x, c)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.control_model.named_parameters()}


@pytest.fixture(scope="module")
def reference() -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    if not REFERENCE.with_suffix(".json").is_file():
        pytest.skip("reference vectors not found (shared/reference)")
    meta = json.loads(REFERENCE.with_suffix(".json").read_text())
    return meta, load_file(str(REFERENCE.with_suffix(".safetensors")))


@pytest.mark.parametrize("memory_format", FORMATS)
def test_reference_outputs_in_each_memory_format(reference: tuple[dict[str, Any], dict[str, torch.Tensor]],
                                                 memory_format: str) -> None:
    """The original ControlNet code's outputs, whatever layout the weights and activations use."""
    meta, tensors = reference
    params = dict(meta["params"])
    unet = ControlledUnetModel(**params, out_channels=4).eval()
    control = ControlNet(**params, hint_channels=3).eval()
    for net, prefix in ((unet, "v15.unet."), (control, "v15.control.")):
        net.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        net.to(memory_format=FORMATS[memory_format])
    io = {k[len("v15.io."):]: v for k, v in tensors.items() if k.startswith("v15.io.")}
    x, hint = (io[k].contiguous(memory_format=FORMATS[memory_format]) for k in ("x", "hint"))
    with torch.no_grad():
        residuals = control(x=x, hint=hint, timesteps=io["t"], context=io["ctx"])
        eps = unet(x=x, timesteps=io["t"], context=io["ctx"], control=residuals)
    for i, r in enumerate(residuals):
        assert_close_to_scale(r, io[f"control{i}"], msg=f"control{i}")
    assert_close_to_scale(eps, io["eps"])


def test_channels_last_training_step_matches_default() -> None:
    """Same loss and ControlNet gradients with `model.to(memory_format=torch.channels_last)`."""
    batch = tiny_batch()
    model = tiny_model()
    loss, grads = training_step(model, batch)
    model.to(memory_format=torch.channels_last)
    assert model.control_model.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    loss_cl, grads_cl = training_step(model, batch)
    torch.testing.assert_close(loss_cl, loss, rtol=1e-5, atol=1e-6)
    for name, grad in grads.items():
        assert_close_to_scale(grads_cl[name], grad, rel=1e-4, msg=name)


def test_channels_last_sampling_output_matches_default() -> None:
    """The guided denoiser output (batched CFG, control on both halves) is layout-independent too."""
    model = tiny_model(seed=1).eval()
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([999, 10])
    hint = (torch.rand(2, 3, 64, 64, generator=generator) > 0.8).float()
    with torch.no_grad():
        context = model.get_learned_conditioning(["a red circle", ""])
        cond = {"c_crossattn": [context], "c_concat": [hint]}
        expected = model.apply_model(x, t, cond)
        model.to(memory_format=torch.channels_last)
        got = model.apply_model(x.contiguous(memory_format=torch.channels_last), t,
                                {"c_crossattn": [context],
                                 "c_concat": [hint.contiguous(memory_format=torch.channels_last)]})
    assert_close_to_scale(got, expected)


def test_checkpointing_does_not_change_gradients() -> None:
    """`use_checkpoint` only trades memory for recomputation: the same loss and gradients either way."""
    batch = tiny_batch(seed=2)
    model = tiny_model(seed=2)
    for module in model.modules():  # checkpoint every block, however small (the CPU policy would skip all)
        if hasattr(module, "checkpoint_cpu_min_elements"):
            module.checkpoint_cpu_min_elements = 0
    loss, grads = training_step(model, batch)
    for module in model.modules():
        if hasattr(module, "use_checkpoint"):
            module.use_checkpoint = False
    loss_plain, grads_plain = training_step(model, batch)
    torch.testing.assert_close(loss_plain, loss, rtol=1e-6, atol=1e-7)
    for name, grad in grads.items():
        assert_close_to_scale(grads_plain[name], grad, msg=name)


@pytest.mark.parametrize(("batch", "size", "stride", "bias"), [(1, 8, 1, True), (2, 5, 2, True), (1, 4, 1, False)])
def test_gemm_convolution_matches_direct(batch: int, size: int, stride: int, bias: bool) -> None:
    """The UNet's conv on wide, small maps (im2col + GEMM on the CPU) gives nn.Conv2d's outputs and gradients."""
    generator = torch.Generator().manual_seed(size)
    conv = Conv2d(GEMM_CONV_MIN_REDUCTION // 9, 96, 3, stride=stride, padding=1, bias=bias)
    x = torch.randn(batch, conv.in_channels, size, size, generator=generator)
    assert conv._gemm_pays(x)
    assert not conv._gemm_pays(x.contiguous(memory_format=torch.channels_last)) or batch * size * size == 1
    reference = nn.Conv2d(conv.in_channels, 96, 3, stride=stride, padding=1, bias=bias)
    reference.load_state_dict(conv.state_dict())
    outputs, grads = [], []
    for net in (conv, reference):
        x_in = x.clone().requires_grad_(True)
        out = net(x_in)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
        outputs.append(out.detach())
        grads.append([x_in.grad, *(p.grad for p in net.parameters())])
        net.zero_grad(set_to_none=True)
    assert_close_to_scale(outputs[0], outputs[1])
    for got, expected in zip(*grads):
        assert_close_to_scale(got, expected)


def test_unet_convolutions_choose_gemm_only_where_it_pays() -> None:
    conv = Conv2d(1280, 1280, 3, padding=1)
    assert conv._gemm_pays(torch.empty(1, 1280, 8, 8))  # SD1.5 at 256 px: the 8x8 level
    assert conv._gemm_pays(torch.empty(2, 1280, 16, 16))  # 512 px with batched guidance
    assert not conv._gemm_pays(torch.empty(1, 1280, 32, 32))  # direct convolution is as fast there
    assert not Conv2d(640, 640, 3, padding=1)._gemm_pays(torch.empty(1, 640, 8, 8))
    assert not conv._gemm_pays(torch.empty(1, 1280, 8, 8, dtype=torch.float64))


def test_checkpointing_on_cpu_only_where_activations_are_large() -> None:
    """On the CPU small blocks are not recomputed (RAM is plentiful, compute is not); large ones are."""
    calls = []

    def block(x: torch.Tensor) -> torch.Tensor:
        calls.append(x.numel())
        return torch.sin(x) * 2

    for numel, recomputed in ((1000, False), (CPU_CHECKPOINT_MIN_ELEMENTS, True)):
        calls.clear()
        x = torch.randn(numel, requires_grad=True)
        checkpoint(block, x, enabled=True).sum().backward()
        assert len(calls) == (2 if recomputed else 1), numel
        torch.testing.assert_close(x.grad, 2 * torch.cos(x.detach()))
    calls.clear()
    checkpoint(block, torch.randn(10, requires_grad=True), enabled=True, cpu_min_elements=0).sum().backward()
    assert len(calls) == 2
    calls.clear()
    checkpoint(block, torch.randn(CPU_CHECKPOINT_MIN_ELEMENTS, requires_grad=True), enabled=False).sum().backward()
    assert len(calls) == 1


def test_compile_networks_compiles_in_place_and_keeps_checkpoint_names() -> None:
    model = tiny_model()
    names = list(model.state_dict())
    model.compile_networks()
    assert model.model.diffusion_model._compiled_call_impl is not None
    assert model.control_model._compiled_call_impl is not None
    assert list(model.state_dict()) == names
