"""LatentDiffusion's schedule, forward process and loss, and the VAE/text glue of ControlLDM."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny, rel_err, tiny_inputs

from ldm.models.diffusion.ddpm import encode_batch
from ldm.modules.diffusionmodules.util import make_beta_schedule

pytestmark = pytest.mark.usefixtures("single_thread")

START, END = 0.00085, 0.0120


def _schedule64() -> dict[str, np.ndarray]:
    betas = np.linspace(np.sqrt(START), np.sqrt(END), 1000, dtype=np.float64) ** 2
    ac = np.cumprod(1.0 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    return {"betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": np.sqrt(ac), "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - ac),
            "posterior_variance": betas * (1 - ac_prev) / (1 - ac),
            "posterior_mean_coef1": betas * np.sqrt(ac_prev) / (1 - ac),
            "posterior_mean_coef2": (1 - ac_prev) * np.sqrt(1 - betas) / (1 - ac)}


def test_beta_schedule_formula() -> None:
    betas = make_beta_schedule("linear", 1000, START, END)
    assert betas.dtype == np.float64
    np.testing.assert_array_equal(betas, np.linspace(START**0.5, END**0.5, 1000) ** 2)
    assert betas[0] == pytest.approx(START, rel=1e-14) and betas[-1] == pytest.approx(END, rel=1e-14)
    with pytest.raises(ValueError):
        make_beta_schedule("exponential", 10)


def test_schedule_buffers(tiny_model: Any) -> None:
    for name, values in _schedule64().items():
        buffer = getattr(tiny_model, name)
        assert buffer.dtype == torch.float32, name
        torch.testing.assert_close(buffer, torch.tensor(values, dtype=torch.float32), rtol=2e-6, atol=1e-12,
                                   msg=name)
    assert tiny_model.num_timesteps == 1000


def _x0_noise_t(batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(batch, 4, 8, 8, generator=g)
    noise = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([0, 421, 999][:batch])
    return x0, noise, t


def test_q_sample_formula(tiny_model: Any) -> None:
    x0, noise, t = _x0_noise_t()
    a = tiny_model.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = tiny_model.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1) * x0 \
        + tiny_model.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1) * noise
    assert torch.equal(tiny_model.q_sample(x0, t, noise), expected)
    torch.testing.assert_close(tiny_model.q_sample(x0, t, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise,
                               rtol=1e-5, atol=1e-6)


def test_q_sample_draws_noise_from_the_global_rng(tiny_model: Any) -> None:
    x0, _, t = _x0_noise_t()
    torch.manual_seed(3)
    first = tiny_model.q_sample(x0, t)
    torch.manual_seed(3)
    noise = torch.randn_like(x0)
    assert torch.equal(first, tiny_model.q_sample(x0, t, noise))


def test_get_v_formula(tiny_model: Any) -> None:
    x0, noise, t = _x0_noise_t()
    sa = tiny_model.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1)
    s1a = tiny_model.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.equal(tiny_model.get_v(x0, noise, t), sa * noise - s1a * x0)


def test_predict_start_from_noise_inverts_q_sample(tiny_model: Any) -> None:
    x0, noise, t = _x0_noise_t()
    x_t = tiny_model.q_sample(x0, t, noise)
    torch.testing.assert_close(tiny_model.predict_start_from_noise(x_t, t, noise), x0, rtol=1e-4, atol=1e-3)


# ----- the loss -------------------------------------------------------------------------------------------------
def _loss_inputs(seed: int = 0) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor, torch.Tensor]:
    inp = tiny_inputs(seed=seed)
    g = torch.Generator().manual_seed(seed + 50)
    x0 = torch.randn(inp["x"].shape, generator=g)
    noise = torch.randn(inp["x"].shape, generator=g)
    cond = {"c_concat": [inp["hint"]], "c_crossattn": [inp["ctx"]]}
    return x0, cond, inp["t"], noise


def _hand_loss(model: Any, x0: torch.Tensor, cond: Any, t: torch.Tensor, noise: torch.Tensor,
               target: torch.Tensor) -> torch.Tensor:
    a = model.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return F.mse_loss(model.apply_model(x_noisy, t, cond), target)


def test_p_losses_eps(tiny_model: Any) -> None:
    x0, cond, t, noise = _loss_inputs()
    with torch.no_grad():
        loss, logs = tiny_model.p_losses(x0, cond, t, noise)
        expected = _hand_loss(tiny_model, x0, cond, t, noise, target=noise)
    assert loss.ndim == 0
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert set(logs) == {"val/loss_simple", "val/loss"}  # eval mode
    assert float(logs["val/loss"]) == pytest.approx(float(loss))


@pytest.fixture(scope="module")
def tiny_v_model(tmp_path_factory: pytest.TempPathFactory, tiny_state: dict[str, torch.Tensor]) -> Any:
    model = build_tiny(tmp_path_factory.mktemp("v_config"), parameterization="v")
    model.load_state_dict(tiny_state)
    return model.eval()


def test_p_losses_v(tiny_v_model: Any, tiny_model: Any) -> None:
    assert tiny_v_model.parameterization == "v"
    x0, cond, t, noise = _loss_inputs(1)
    a = tiny_v_model.alphas_cumprod[t].view(-1, 1, 1, 1)
    v = a.sqrt() * noise - (1 - a).sqrt() * x0
    with torch.no_grad():
        loss, _ = tiny_v_model.p_losses(x0, cond, t, noise)
        expected = _hand_loss(tiny_v_model, x0, cond, t, noise, target=v)
        eps_loss, _ = tiny_model.p_losses(x0, cond, t, noise)  # the same weights, the eps target
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(loss) != pytest.approx(float(eps_loss), rel=1e-3)


def test_p_losses_in_training_mode_has_gradients(tiny_model: Any) -> None:
    x0, cond, t, noise = _loss_inputs(2)
    tiny_model.train()
    loss, logs = tiny_model.p_losses(x0, cond, t, noise)
    assert set(logs) == {"train/loss_simple", "train/loss"}
    loss.backward()
    assert all(p.grad is not None for p in tiny_model.control_model.parameters())


def test_forward_draws_t_and_noise_from_the_global_rng(tiny_model: Any) -> None:
    x0, cond, _, _ = _loss_inputs(3)
    with torch.no_grad():
        torch.manual_seed(9)
        loss, _ = tiny_model(x0, cond)
        torch.manual_seed(9)
        t = torch.randint(0, 1000, (x0.shape[0],)).long()
        noise = torch.randn_like(x0)
        expected, _ = tiny_model.p_losses(x0, cond, t, noise)
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)


# ----- first stage and text glue ----------------------------------------------------------------------------------
def _raw_batch(batch: int = 2, size: int = 64, seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "jpg": torch.rand(batch, size, size, 3, generator=g) * 2 - 1,
        "hint": torch.rand(batch, size, size, 3, generator=g),
        "txt": ["a red circle on a blue background", "a cat"][:batch],
    }


def test_get_input_latents_and_conditions(tiny_model: Any) -> None:
    batch = _raw_batch()
    torch.manual_seed(0)
    z, c = tiny_model.get_input(batch, "jpg")
    assert z.shape == (2, 4, 8, 8)
    assert set(c) == {"c_crossattn", "c_concat"}
    assert c["c_crossattn"][0].shape == (2, 77, 32)
    assert torch.equal(c["c_concat"][0], batch["hint"].permute(0, 3, 1, 2))

    x = batch["jpg"].permute(0, 3, 1, 2)
    with torch.no_grad():
        torch.manual_seed(0)
        expected = tiny_model.first_stage_model.encode(x).sample() * tiny_model.scale_factor
        text = tiny_model.get_learned_conditioning(batch["txt"])
    assert tiny_model.scale_factor == pytest.approx(0.18215)
    torch.testing.assert_close(z, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c["c_crossattn"][0], text, rtol=1e-6, atol=1e-6)


def test_get_input_bs_truncates(tiny_model: Any) -> None:
    z, c = tiny_model.get_input(_raw_batch(), "jpg", bs=1)
    assert z.shape[0] == c["c_crossattn"][0].shape[0] == c["c_concat"][0].shape[0] == 1


def test_decode_first_stage_divides_by_scale_factor(tiny_model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        image = tiny_model.decode_first_stage(z)
        expected = tiny_model.first_stage_model.decode(z / tiny_model.scale_factor)
    assert image.shape == (2, 3, 64, 64)
    assert torch.equal(image, expected)
    monkeypatch.setattr(tiny_model.first_stage_model, "decode", lambda latent: latent)
    assert torch.equal(tiny_model.decode_first_stage(z), z / tiny_model.scale_factor)


@pytest.fixture
def cached_model(tiny_model: Any) -> Any:
    """The tiny model reading batches as training from a cache does (`cached_batch_encoder`)."""
    from training.cache import cached_batch_encoder

    tiny_model.batch_encoder = cached_batch_encoder
    yield tiny_model
    tiny_model.batch_encoder = encode_batch


def test_cached_batch_gives_the_same_input(cached_model: Any) -> None:
    """A batch carrying the VAE posterior's moments and the prompt embeddings skips both encoders."""
    tiny_model = cached_model
    raw = _raw_batch(seed=4)
    with torch.no_grad():
        posterior = tiny_model.first_stage_model.encode(raw["jpg"].permute(0, 3, 1, 2))
        context = tiny_model.get_learned_conditioning(raw["txt"])
    cached = {"latent_moments": posterior.parameters, "context": context, "hint": raw["hint"]}

    torch.manual_seed(21)
    with_encoders = tiny_model.batch_encoder
    tiny_model.batch_encoder = encode_batch
    z_raw, c_raw = tiny_model.get_input(raw, "jpg")
    tiny_model.batch_encoder = with_encoders
    torch.manual_seed(21)
    z_cached, c_cached = tiny_model.get_input(cached, "jpg")
    torch.testing.assert_close(z_cached, z_raw, rtol=1e-6, atol=1e-6)
    assert torch.equal(c_cached["c_crossattn"][0], c_raw["c_crossattn"][0])
    assert torch.equal(c_cached["c_concat"][0], c_raw["c_concat"][0])

    torch.manual_seed(22)
    z_other, _ = tiny_model.get_input(cached, "jpg")
    assert rel_err(z_other, z_cached) > 1e-3  # the latent stays a sample, not the mean

    z_bs, c_bs = tiny_model.get_input(cached, "jpg", bs=1)
    assert z_bs.shape[0] == c_bs["c_crossattn"][0].shape[0] == c_bs["c_concat"][0].shape[0] == 1


def test_cached_deterministic_latent(cached_model: Any) -> None:
    tiny_model = cached_model
    latent = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    batch = {"latent": latent, "context": torch.zeros(2, 77, 32), "hint": _raw_batch()["hint"]}
    z, c = tiny_model.get_input(batch, "jpg")
    assert torch.equal(z, latent * tiny_model.scale_factor)
    assert torch.equal(c["c_crossattn"][0], batch["context"])


def test_unsupported_options_are_refused(tmp_path: Path) -> None:
    for overrides in ({"parameterization": "x1"}, {"use_ema": True}, {"loss_type": "huber"}):
        with pytest.raises(ValueError):
            build_tiny(tmp_path, **overrides)
