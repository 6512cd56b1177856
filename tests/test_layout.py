"""The full-size models of models/cldm_v15.yaml and cldm_v21.yaml have the released checkpoints' layout.

The models are built deferred (allocated, not initialised) and never materialised: names and shapes come from
`torch.nn.Module.state_dict`, which, unlike `LatentDiffusion.state_dict`, does not initialise anything.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import torch
from conftest import ROOT, reference_file

from cldm.model import create_model
from ldm.models.diffusion.ddpm import SCHEDULE_BUFFERS

pytestmark = pytest.mark.usefixtures("single_thread")

PREFIXES = ("model.", "control_model.", "first_stage_model.")
VERSIONS = ("v15", "v21")


@pytest.fixture(scope="module")
def layouts() -> dict[str, dict[str, Any]]:
    unet_control_vae = json.loads(reference_file("checkpoint_layout_unet_control_vae.json").read_text())
    text = json.loads(reference_file("checkpoint_layout_text_encoders.json").read_text())
    return {v: {"main": unet_control_vae[v], "text": text[v]} for v in VERSIONS}


@pytest.fixture(scope="module")
def built() -> dict[str, tuple[dict[str, list[int]], float, dict[str, torch.Tensor]]]:
    """version -> (state-dict shapes, seconds create_model took, the model's buffers).

    The models themselves are dropped: their (allocated, untouched) weights take gigabytes of address space.
    """
    out = {}
    for version in VERSIONS:
        start = time.perf_counter()
        model = create_model(ROOT / "models" / f"cldm_{version}.yaml")
        seconds = time.perf_counter() - start
        shapes = {k: list(t.shape) for k, t in torch.nn.Module.state_dict(model).items()}
        buffers = {k: v.clone() for k, v in model.named_buffers() if "." not in k}
        out[version] = (shapes, seconds, buffers)
        del model
    return out


def _with_prefix(shapes: dict[str, list[int]], prefixes: tuple[str, ...]) -> dict[str, list[int]]:
    return {k: v for k, v in shapes.items() if k.startswith(prefixes)}


@pytest.mark.parametrize("version", VERSIONS)
def test_unet_control_vae_layout(built: Any, layouts: Any, version: str) -> None:
    shapes = _with_prefix(built[version][0], PREFIXES)
    expected = layouts[version]["main"]
    assert len(expected) == 1274
    assert sorted(set(expected) - set(shapes)) == []  # missing
    assert sorted(set(shapes) - set(expected)) == []  # unexpected
    wrong = {k: (shapes[k], expected[k]) for k in expected if shapes[k] != expected[k]}
    assert wrong == {}


def test_layout_total(built: Any, layouts: Any) -> None:
    assert sum(len(_with_prefix(built[v][0], PREFIXES)) for v in VERSIONS) == 2548
    assert sum(len(layouts[v]["main"]) for v in VERSIONS) == 2548


@pytest.mark.parametrize("version", VERSIONS)
def test_text_encoder_layout(built: Any, layouts: Any, version: str) -> None:
    shapes = _with_prefix(built[version][0], ("cond_stage_model.",))
    assert shapes == layouts[version]["text"]


@pytest.mark.parametrize("version", VERSIONS)
def test_nothing_else_but_schedule_buffers(built: Any, layouts: Any, version: str) -> None:
    shapes, _, buffers = built[version]
    expected = set(layouts[version]["main"]) | set(layouts[version]["text"]) | set(SCHEDULE_BUFFERS)
    assert set(shapes) == expected
    assert set(SCHEDULE_BUFFERS) == {
        "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
        "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    }
    for name in SCHEDULE_BUFFERS:
        assert shapes[name] == [1000], name
        assert buffers[name].dtype == torch.float32
    # lvlb_weights is a buffer, but not a persistent one: the released checkpoints do not carry it
    assert "lvlb_weights" in buffers
    assert "lvlb_weights" not in shapes


@pytest.mark.parametrize("version", VERSIONS)
def test_schedule_buffers_are_real_values(built: Any, version: str) -> None:
    """The schedule is computed at build time even in a deferred build (it is not a checkpoint-only tensor)."""
    betas = built[version][2]["betas"]
    assert torch.isfinite(betas).all()
    assert float(betas[0]) == pytest.approx(0.00085, rel=1e-6)
    assert float(betas[-1]) == pytest.approx(0.012, rel=1e-6)


def test_create_model_v15_is_fast(built: Any) -> None:
    assert built["v15"][1] < 10.0, f"create_model(models/cldm_v15.yaml) took {built['v15'][1]:.1f} s"


@pytest.mark.parametrize("version", VERSIONS)
def test_context_width(built: Any, version: str) -> None:
    shapes = built[version][0]
    width = {"v15": 768, "v21": 1024}[version]
    for prefix in ("model.diffusion_model.", "control_model."):
        key = prefix + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        assert shapes[key] == [320, width]
