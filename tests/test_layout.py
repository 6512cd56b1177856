"""The full-size models of models/cldm_v15.yaml and cldm_v21.yaml have the released checkpoints' layout.

The models are built deferred (allocated, not initialised) and never materialised: names and shapes come from
`torch.nn.Module.state_dict`, which, unlike `LatentDiffusion.state_dict`, does not initialise anything.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from conftest import ROOT, reference_file
from torch.overrides import TorchFunctionMode

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


class CountRandomDraws(TorchFunctionMode):
    """Counts random initialisations (`torch.nn.init.*`, in-place random draws) on real tensors and on meta tensors."""

    DRAWS = (torch.Tensor.uniform_, torch.Tensor.normal_)

    def __init__(self) -> None:
        super().__init__()
        self.real = 0
        self.meta = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        tensor = args[0] if args else kwargs.get("tensor")
        drawing = func in self.DRAWS or getattr(func, "__module__", None) == "torch.nn.init"
        if drawing and isinstance(tensor, torch.Tensor) and tensor.numel():
            if tensor.is_meta:
                self.meta += 1
            else:
                self.real += 1
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def built() -> dict[str, tuple[dict[str, list[int]], CountRandomDraws, dict[str, torch.Tensor]]]:
    """version -> (state-dict shapes, the random draws create_model made, the model's buffers).

    The models themselves are dropped: their (allocated, untouched) weights take gigabytes of address space.
    """
    out = {}
    for version in VERSIONS:
        with CountRandomDraws() as draws:
            model = create_model(ROOT / "models" / f"cldm_{version}.yaml")
        shapes = {k: list(t.shape) for k, t in torch.nn.Module.state_dict(model).items()}
        buffers = {k: v.clone() for k, v in model.named_buffers() if "." not in k}
        out[version] = (shapes, draws, buffers)
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
    for name in SCHEDULE_BUFFERS:
        assert shapes[name] == [1000], name
        assert buffers[name].dtype == torch.float32
    # lvlb_weights is a buffer, but not a persistent one: the released checkpoints do not carry it
    assert "lvlb_weights" in buffers
    assert "lvlb_weights" not in shapes


def _original_schedule(betas: np.ndarray) -> dict[str, np.ndarray]:
    """Each schedule buffer of the released checkpoints, by the original's formula for it (float64)."""
    ac = np.cumprod(1.0 - betas)
    prev = np.append(1.0, ac[:-1])
    variance = betas * (1.0 - prev) / (1.0 - ac)
    return {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": prev, "sqrt_alphas_cumprod": np.sqrt(ac),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac), "log_one_minus_alphas_cumprod": np.log(1.0 - ac),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac), "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1.0),
        "posterior_variance": variance, "posterior_log_variance_clipped": np.log(np.maximum(variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(prev) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - prev) * np.sqrt(1.0 - betas) / (1.0 - ac),
    }


@pytest.mark.parametrize("version", VERSIONS)
def test_schedule_buffers_are_real_values(built: Any, version: str) -> None:
    """The schedule is computed at build time even in a deferred build (it is not a checkpoint-only tensor), and
    each buffer the checkpoints carry has the value of its own formula."""
    buffers = built[version][2]
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    formulas = _original_schedule(betas)
    assert set(formulas) == set(SCHEDULE_BUFFERS)
    for name, values in formulas.items():
        torch.testing.assert_close(buffers[name], torch.tensor(values, dtype=torch.float32), rtol=2e-6, atol=1e-12,
                                   msg=name)


@pytest.mark.parametrize("version", VERSIONS)
def test_create_model_draws_no_random_weights(built: Any, version: str) -> None:
    """The full-size build initialises nothing it would later overwrite: every random draw lands on the meta device."""
    draws = built[version][1]
    assert draws.meta > 100  # the constructors' initialisations were seen, and went nowhere
    assert draws.real == 0


@pytest.mark.parametrize("version", VERSIONS)
def test_context_width(built: Any, version: str) -> None:
    shapes = built[version][0]
    width = {"v15": 768, "v21": 1024}[version]
    for prefix in ("model.diffusion_model.", "control_model."):
        key = prefix + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
        assert shapes[key] == [320, width]
