"""DDIM: the original's timesteps and per-step values, the sampling loop, `DDIMSampler`, and guidance."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from conftest import reference_file, rel_err, tiny_inputs

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.guidance import ClassifierFreeGuidance, apply_model_network, concat_conditions
from ldm.models.diffusion.sampling import Denoiser, Discretization, ddim_sigma, make_ddim_timesteps, sample_ddim
from ldm.models.diffusion.schedule import eps_and_x0

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def meta() -> dict[str, Any]:
    return json.loads(reference_file("tiny_v15_unet_controlnet.json").read_text())


def _alphas_cumprod(betas: list[float]) -> torch.Tensor:
    """As the original: cumprod(1 - betas) in float64, stored as a float32 buffer."""
    return torch.tensor(np.cumprod(1.0 - np.asarray(betas, dtype=np.float64)), dtype=torch.float32)


# ----- schedule -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", ["10", "20", "50"])
def test_timesteps_match_reference(meta: dict[str, Any], steps: str) -> None:
    expected = meta["ddim_timesteps"][steps]
    assert make_ddim_timesteps(int(steps)).tolist() == expected
    schedule = Discretization.make(_alphas_cumprod(meta["betas_linear_1000"]), int(steps))
    assert schedule.timesteps.tolist() == expected[::-1]  # sampling order: noisiest first
    assert len(schedule) == int(steps)


def test_timesteps_original_quirks() -> None:
    assert len(make_ddim_timesteps(30)) == 31  # 1000 // 30 = 33: range(0, 1000, 33) has 31 entries
    quad = make_ddim_timesteps(10, method="quad")
    assert quad.tolist() == ((np.linspace(0, np.sqrt(800), 10) ** 2).astype(int) + 1).tolist()
    with pytest.raises(ValueError):
        make_ddim_timesteps(0)
    with pytest.raises(ValueError):
        make_ddim_timesteps(10, method="cubic")


@pytest.mark.parametrize("steps", [3, 9, 27, 1000])
def test_step_counts_whose_last_timestep_would_be_1000(steps: int) -> None:
    ac = torch.linspace(0.999, 0.01, 1000)
    try:
        schedule = Discretization.make(ac, steps)
    except ValueError:
        return  # refused with a clear message: fine
    assert int(schedule.timesteps.max()) < 1000


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("steps", [10, 50])
def test_schedule_values_follow_original_formulas(meta: dict[str, Any], steps: int, eta: float) -> None:
    ac = _alphas_cumprod(meta["betas_linear_1000"])
    ts = np.asarray(meta["ddim_timesteps"][str(steps)])
    acd = ac.double()
    alphas = acd[ts]
    alphas_prev = torch.cat([acd[:1], acd[ts[:-1]]])
    sigmas = eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))

    # The discretization holds the float32 buffer's values in sampling order; DDIM's sigmas follow from them.
    schedule = Discretization.make(ac, steps)
    ascending = torch.from_numpy(schedule.alphas[::-1].copy())
    ascending_next = torch.from_numpy(schedule.alphas_next[::-1].copy())
    assert torch.equal(ascending.float(), ac[ts]) and torch.equal(ascending.float().double(), ascending)
    assert torch.equal(ascending_next.float(), torch.cat([ac[:1], ac[ts[:-1]]]))
    got_sigmas = torch.tensor([ddim_sigma(a, a_next, eta) for a, a_next in zip(schedule.alphas, schedule.alphas_next)]
                              ).flip(0).float()
    torch.testing.assert_close(got_sigmas, sigmas.float(), rtol=1e-6, atol=1e-9)
    if eta == 0.0:
        assert not got_sigmas.any()


def test_model_betas_match_reference(tiny_model: Any, meta: dict[str, Any]) -> None:
    expected = torch.tensor(meta["betas_linear_1000"], dtype=torch.float32)
    torch.testing.assert_close(tiny_model.betas, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(tiny_model.alphas_cumprod, _alphas_cumprod(meta["betas_linear_1000"]),
                               rtol=1e-6, atol=0)


# ----- parameterisations ----------------------------------------------------------------------------------------
def _x0_eps_alpha(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    alpha = torch.tensor([0.999, 0.5, 0.0047], dtype=torch.float64).view(3, 1, 1, 1)
    return x0, eps, alpha


def test_eps_and_x0_v_parameterisation() -> None:
    x0, eps, a = _x0_eps_alpha()
    x = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    got_eps, got_x0 = eps_and_x0(v, x, a, "v")
    torch.testing.assert_close(got_eps, eps, rtol=0, atol=1e-10)
    torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-10)


def test_eps_and_x0_eps_parameterisation() -> None:
    x0, eps, a = _x0_eps_alpha(1)
    x = a.sqrt() * x0 + (1 - a).sqrt() * eps
    got_eps, got_x0 = eps_and_x0(eps, x, a, "eps")
    assert torch.equal(got_eps, eps)
    torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-8)
    with pytest.raises(ValueError, match="x0"):
        eps_and_x0(eps, x, a, "x0")


def test_eps_and_x0_agrees_with_model_v_helpers(tiny_model: Any) -> None:
    x0, eps, _ = _x0_eps_alpha(2)
    x0, eps = x0.float(), eps.float()
    t = torch.tensor([0, 500, 999])
    x = tiny_model.q_sample(x0, t, eps)
    v = tiny_model.get_v(x0, eps, t)
    a = tiny_model.alphas_cumprod[t].view(3, 1, 1, 1)
    got_eps, got_x0 = eps_and_x0(v, x, a, "v")
    torch.testing.assert_close(got_eps, tiny_model.predict_eps_from_z_and_v(x, t, v), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_x0, tiny_model.predict_start_from_z_and_v(x, t, v), rtol=1e-5, atol=1e-5)


# ----- the sampling loop with an oracle denoiser ------------------------------------------------------------------
def test_oracle_denoiser_recovers_x0(meta: dict[str, Any]) -> None:
    """A denoiser that returns the exact noise of a fixed x0 makes every step predict that x0 (eta = 0)."""
    ac = _alphas_cumprod(meta["betas_linear_1000"])
    schedule = Discretization.make(ac, 10)
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(2, 4, 6, 6, generator=g)
    seen_t: list[int] = []
    progress: list[float] = []

    def oracle(x: torch.Tensor, t: torch.Tensor, p: float) -> torch.Tensor:
        seen_t.append(int(t[0]))
        progress.append(p)
        a = ac[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    preds: list[torch.Tensor] = []
    x_T = torch.randn(2, 4, 6, 6, generator=g)
    out = sample_ddim(Denoiser(oracle, "eps"), x_T, schedule, callback=lambda i, x, p: preds.append(p))
    assert seen_t == meta["ddim_timesteps"]["10"][::-1]
    assert progress == [i / 10 for i in range(10)]
    assert len(preds) == 10
    for p in preds:
        torch.testing.assert_close(p, x0, rtol=1e-4, atol=1e-4)
    # eta = 0 keeps the noise direction: x_T = sqrt(a_T) x0 + sqrt(1 - a_T) e gives
    # sqrt(alphas_prev[0]) x0 + sqrt(1 - alphas_prev[0]) e at the end (alphas_prev[0] = alphas_cumprod[0])
    a_T = ac[901]
    e = (x_T - a_T.sqrt() * x0) / (1 - a_T).sqrt()
    torch.testing.assert_close(out, ac[0].sqrt() * x0 + (1 - ac[0]).sqrt() * e, rtol=1e-4, atol=1e-4)


# ----- DDIMSampler on the tiny ControlLDM --------------------------------------------------------------------------
def _conds(seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    inp = tiny_inputs(seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    cond = {"c_concat": [inp["hint"]], "c_crossattn": [inp["ctx"]]}
    uncond = {"c_concat": [inp["hint"]], "c_crossattn": [torch.randn(inp["ctx"].shape, generator=g)]}
    return cond, uncond


def _sample(model: Any, x_T: torch.Tensor, **kwargs: Any) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    cond, uncond = _conds()
    return DDIMSampler(model).sample(10, 2, (4, 8, 8), cond, verbose=False, x_T=x_T, eta=0.0,
                                     unconditional_guidance_scale=7.5, unconditional_conditioning=uncond, **kwargs)


def test_guided_trajectory_is_deterministic(tiny_model: Any) -> None:
    g = torch.Generator().manual_seed(11)
    x_T = torch.randn(2, 4, 8, 8, generator=g)
    other = torch.randn(2, 4, 8, 8, generator=g)
    first, inter = _sample(tiny_model, x_T)
    second, _ = _sample(tiny_model, x_T.clone())
    third, _ = _sample(tiny_model, other)
    assert first.shape == (2, 4, 8, 8)
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)
    assert not torch.allclose(first, third)

    # intermediates as the original's: the start, then the first step and the last (log_every_t=100)
    assert set(inter) == {"x_inter", "pred_x0"}
    assert len(inter["x_inter"]) == len(inter["pred_x0"]) == 3
    assert torch.equal(inter["x_inter"][0], x_T)
    assert torch.equal(inter["x_inter"][-1], first)


def test_sampler_callbacks_and_log_every_t(tiny_model: Any) -> None:
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(12))
    steps: list[int] = []
    images: list[tuple[int, tuple[int, ...]]] = []
    samples, inter = _sample(tiny_model, x_T, callback=steps.append, log_every_t=1,
                             img_callback=lambda pred, i: images.append((i, tuple(pred.shape))))
    assert steps == list(range(10))
    assert images == [(i, (2, 4, 8, 8)) for i in range(10)]
    assert len(inter["x_inter"]) == 11
    assert torch.equal(inter["x_inter"][-1], samples)


def test_sampler_with_eta_is_reproducible_with_a_generator(tiny_model: Any) -> None:
    cond, _ = _conds()
    runs = [DDIMSampler(tiny_model).sample(4, 2, (4, 8, 8), cond, eta=1.0, verbose=False,
                                           generator=torch.Generator().manual_seed(seed))[0]
            for seed in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


class _StubModel:
    """The attributes DDIMSampler reads, and an apply_model that records its batch sizes."""

    parameterization = "eps"
    num_timesteps = 1000

    def __init__(self) -> None:
        self.betas = torch.linspace(1e-4, 2e-2, 1000)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, 0)
        self.calls: list[int] = []

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return 0.1 * x


@pytest.mark.parametrize("kwargs", [
    {"mask": torch.ones(1)}, {"x0": torch.ones(1)}, {"score_corrector": object()}, {"dynamic_threshold": 0.9},
    {"ucg_schedule": [1.0]}, {"normals_sequence": [1.0]}, {"quantize_x0": True}, {"noise_dropout": 0.1},
    {"not_an_argument": 1},
], ids=lambda kw: next(iter(kw)))
def test_unsupported_sampler_kwargs_raise(kwargs: dict[str, Any]) -> None:
    model = _StubModel()
    with pytest.raises(ValueError, match="does not support"):
        DDIMSampler(model).sample(5, 1, (4, 8, 8), None, verbose=False, **kwargs)
    assert model.calls == []


def test_sampler_accepts_the_originals_none_kwargs() -> None:
    model = _StubModel()
    samples, _ = DDIMSampler(model).sample(5, 1, (4, 8, 8), None, verbose=False, mask=None, x0=None,
                                           score_corrector=None, corrector_kwargs=None, dynamic_threshold=None,
                                           ucg_schedule=None, normals_sequence=None)
    assert samples.shape == (1, 4, 8, 8)
    assert model.calls == [1] * 5


# ----- classifier-free guidance ------------------------------------------------------------------------------
class _Counting:
    def __init__(self, model: Any) -> None:
        self.model = model
        self.batches: list[int] = []
        self.outputs: list[torch.Tensor] = []

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        self.batches.append(x.shape[0])
        out = self.model.apply_model(x, t, cond)
        self.outputs.append(out)
        return out


def test_cfg_batched_equals_two_passes(tiny_model: Any) -> None:
    cond, uncond = _conds(seed=4)
    inp = tiny_inputs(seed=4)
    scale = 7.5
    counting = _Counting(tiny_model)
    with torch.no_grad():
        guided = ClassifierFreeGuidance(apply_model_network(counting), cond, uncond, scale)(inp["x"], inp["t"], 0.0)
        out_c = tiny_model.apply_model(inp["x"], inp["t"], cond)
        out_u = tiny_model.apply_model(inp["x"], inp["t"], uncond)
    assert counting.batches == [4]  # one forward on the concatenated batch, uncond half first
    batched_u, batched_c = counting.outputs[0].chunk(2)
    assert rel_err(batched_u, out_u) < 1e-5
    assert rel_err(batched_c, out_c) < 1e-5
    torch.testing.assert_close(guided, batched_u + scale * (batched_c - batched_u), rtol=1e-6, atol=1e-6)
    # against the two separate passes: the halves' 1e-5 relative error, through u + s (c - u)
    bound = 1e-5 * (abs(1 - scale) * out_u.norm() + scale * out_c.norm())
    assert (guided - (out_u + scale * (out_c - out_u))).norm() < bound
    assert rel_err(guided, out_c) > 1e-3


def test_cfg_unbatchable_conditions_take_two_passes(tiny_model: Any) -> None:
    cond, uncond = _conds(seed=6)
    uncond = {"c_concat": None, "c_crossattn": uncond["c_crossattn"]}
    inp = tiny_inputs(seed=6)
    counting = _Counting(tiny_model)
    with torch.no_grad():
        guided = ClassifierFreeGuidance(apply_model_network(counting), cond, uncond, 3.0)(inp["x"], inp["t"])
        out_c = tiny_model.apply_model(inp["x"], inp["t"], cond)
        out_u = tiny_model.apply_model(inp["x"], inp["t"], uncond)
    assert counting.batches == [2, 2]
    assert rel_err(guided, out_u + 3.0 * (out_c - out_u)) < 1e-5


def test_cfg_scale_one_or_no_uncond_is_one_conditional_pass() -> None:
    model = _StubModel()
    x, t = torch.randn(2, 4, 3, 3), torch.tensor([5, 5])
    cond = {"c_crossattn": [torch.zeros(2, 7, 8)]}
    network = apply_model_network(model)
    assert torch.equal(ClassifierFreeGuidance(network, cond, cond, 1.0)(x, t), 0.1 * x)
    assert torch.equal(ClassifierFreeGuidance(network, cond, None, 9.0)(x, t), 0.1 * x)
    assert model.calls == [2, 2]


def test_concat_conditions_order_and_refusals() -> None:
    a = {"c_concat": [torch.zeros(1, 3, 4, 4)], "c_crossattn": [torch.zeros(1, 5, 8)]}
    b = {"c_concat": [torch.ones(1, 3, 4, 4)], "c_crossattn": [torch.ones(1, 5, 8)]}
    merged = concat_conditions(a, b)
    assert merged is not None
    assert merged["c_concat"][0][:, 0, 0, 0].tolist() == [0.0, 1.0]  # first argument first (uncond, cond)
    assert concat_conditions(a, {"c_crossattn": b["c_crossattn"]}) is None
    assert concat_conditions(a, {**b, "c_crossattn": [torch.ones(1, 6, 8)]}) is None
    assert concat_conditions({**a, "c_concat": None}, {**b, "c_concat": None}) is not None
