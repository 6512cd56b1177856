"""Training recipes: each option's formula on small tensors with exact expected values, the reward's gradient path,
and tiny runs with the flags that complete and resume exactly."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import run_train, train_args

from cldm.control import ControlReward
from ldm.models.diffusion.loss import DiffusionLoss, TrainingRecipe
from training.make_fill50k import sample_fill50k, sample_rng
from training.rewards import EdgeSoftF1, Fill50kSoftIoU, disc_from_outline, measure_from_name

pytestmark = pytest.mark.usefixtures("single_thread")
T = 1000


def empirical_cdf(t: torch.Tensor, ks: list[int]) -> np.ndarray:
    return np.array([(t <= k).double().mean().item() for k in ks])


def test_uniform_sampling_draws_exactly_what_the_original_draws() -> None:
    torch.manual_seed(3)
    ours = TrainingRecipe().timesteps(64, T, torch.device("cpu"))
    torch.manual_seed(3)
    assert torch.equal(ours, torch.randint(0, T, (64,)).long())


def test_cubic_sampling_follows_its_closed_form() -> None:
    """t = floor((1 - u^3) T): P(t <= k) = 1 - (1 - (k + 1) / T) ** (1 / 3)."""
    torch.manual_seed(0)
    t = TrainingRecipe("cubic").timesteps(400_000, T, torch.device("cpu"))
    assert t.min() >= 0 and t.max() <= T - 1
    ks = [0, 99, 299, 499, 799, 949, 998]
    expected = np.array([1 - (1 - (k + 1) / T) ** (1 / 3) for k in ks])
    np.testing.assert_allclose(empirical_cdf(t, ks), expected, atol=3e-3)
    assert (t >= 500).double().mean() > 0.79  # biased to the noisy half: 1 - 0.5 ** (1/3) = 0.206 below it


def test_logit_normal_sampling_follows_its_closed_form() -> None:
    """t = floor(sigmoid(n) T), n ~ N(m, s^2): P(t <= k) = Phi((logit((k + 1) / T) - m) / s)."""
    mean, std = 0.5, 1.2
    torch.manual_seed(1)
    t = TrainingRecipe("logit_normal", mean, std).timesteps(400_000, T, torch.device("cpu"))
    ks = [49, 199, 499, 799, 949]

    def phi(z: float) -> float:
        return 0.5 * (1 + math.erf(z / math.sqrt(2)))

    expected = np.array([phi((math.log((k + 1) / T / (1 - (k + 1) / T)) - mean) / std) for k in ks])
    np.testing.assert_allclose(empirical_cdf(t, ks), expected, atol=3e-3)


def test_min_snr_weights_are_the_formula() -> None:
    alphas = torch.tensor([0.99, 0.9, 0.5, 0.2, 0.01], dtype=torch.float64)
    t = torch.arange(5)
    snr = alphas / (1 - alphas)  # 99, 9, 1, 0.25, 0.0101...
    gamma = 5.0
    eps = TrainingRecipe(min_snr_gamma=gamma).weights(alphas.float(), t, "eps")
    v = TrainingRecipe(min_snr_gamma=gamma).weights(alphas.float(), t, "v")
    torch.testing.assert_close(eps.double(), torch.minimum(snr, torch.tensor(gamma)) / snr, rtol=1e-6, atol=0)
    torch.testing.assert_close(v.double(), torch.minimum(snr, torch.tensor(gamma)) / (snr + 1), rtol=1e-6, atol=0)
    assert eps[2].item() == pytest.approx(1.0) and v[2].item() == pytest.approx(0.5)  # SNR 1 < gamma
    assert eps[0].item() == pytest.approx(5 / 99) and v[0].item() == pytest.approx(5 / 100)
    assert TrainingRecipe().weights(alphas.float(), t, "eps") is None


def test_min_snr_loss_is_the_weighted_mean() -> None:
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    weights = torch.tensor([1.0, 0.5, 0.25, 2.0])
    loss, logs = DiffusionLoss()(pred, target, torch.zeros(4, dtype=torch.long), torch.ones(T), "train", weights)
    per_sample = ((pred - target) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, (weights * per_sample).mean())
    assert logs["train/loss"] == loss.detach()


def test_noise_offset_adds_a_per_image_per_channel_constant() -> None:
    x = torch.zeros(2000, 4, 8, 8)
    torch.manual_seed(4)
    plain = TrainingRecipe().noise(x)
    torch.manual_seed(4)
    offset = TrainingRecipe(noise_offset=0.3).noise(x)
    difference = offset - plain
    assert torch.allclose(difference, difference[..., :1, :1].expand_as(difference), atol=1e-6)  # constant over H, W
    assert difference[..., 0, 0].std().item() == pytest.approx(0.3, rel=0.03)
    # the per-image, per-channel mean of the noise: variance 1 / (H W) + s^2
    assert offset.mean(dim=(2, 3)).var().item() == pytest.approx(1 / 64 + 0.09, rel=0.05)


def test_bad_recipe_values_are_refused() -> None:
    for kwargs in ({"timestep_sampling": "karras"}, {"logit_std": 0.0}, {"min_snr_gamma": -1.0},
                   {"noise_offset": -0.1}):
        with pytest.raises(ValueError):
            TrainingRecipe(**kwargs)
    with pytest.raises(ValueError, match="unknown reward measure"):
        measure_from_name("iou")


# ----- the reward ------------------------------------------------------------------------------------------------
def fill50k_batch(n: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    samples = [sample_fill50k(sample_rng(5, i), size) for i in range(n)]
    hints = torch.from_numpy(np.stack([s["source"] for s in samples])).permute(0, 3, 1, 2).float() / 255
    targets = torch.from_numpy(np.stack([s["target"] for s in samples])).permute(0, 3, 1, 2).float() / 127.5 - 1
    return hints, targets, np.stack([s["mask"] for s in samples])


def test_the_disc_is_filled_in_from_the_outline() -> None:
    hints, _, masks = fill50k_batch(8)
    disc = disc_from_outline(hints).bool().numpy()
    ious = [(d & m).sum() / (d | m).sum() for d, m in zip(disc, masks)]
    assert min(ious) > 0.85


def test_fill50k_soft_iou_scores_the_truth_high_and_a_wrong_circle_low() -> None:
    hints, targets, _ = fill50k_batch(8)
    measure = Fill50kSoftIoU()
    truth = measure(targets, hints, targets)
    shifted = measure(targets.roll(shifts=8, dims=3), hints, targets)
    assert truth.min() > 0.8 and (shifted < truth).all()
    images = targets.clone().requires_grad_(True)
    measure(images, hints, targets).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_edge_soft_f1_prefers_the_hints_edges() -> None:
    hints, targets, _ = fill50k_batch(4)
    measure = EdgeSoftF1()
    assert (measure(targets, hints, targets) > measure(torch.zeros_like(targets), hints, targets)).all()


def test_the_rewards_gradient_reaches_the_controlnet_and_nothing_locked(tiny_model: Any) -> None:
    g = torch.Generator().manual_seed(6)
    batch = {"jpg": torch.rand(2, 64, 64, 3, generator=g) * 2 - 1, "hint": torch.rand(2, 64, 64, 3, generator=g),
             "txt": ["a", "b"]}
    tiny_model.train()
    tiny_model.reward = ControlReward(EdgeSoftF1(), weight=1.0, max_timestep=1000)
    try:
        x, c = tiny_model.get_input(batch, "jpg")
        t = torch.tensor([10, 100])
        x_noisy = tiny_model.q_sample(x, t)
        output = tiny_model.apply_model(x_noisy, t, c)
        reward, logs = tiny_model.extra_losses(x, x_noisy, t, c, output, "train")
        assert reward is not None and logs["train/loss_reward"] > 0 and 0 <= logs["train/reward_score"] <= 1
        tiny_model.zero_grad(set_to_none=True)
        reward.backward()  # the reward alone
        control_grads = [p.grad for p in tiny_model.control_model.parameters() if p.grad is not None]
        assert control_grads and any(grad.abs().sum() > 0 for grad in control_grads)
        for part in (tiny_model.model.diffusion_model, tiny_model.first_stage_model, tiny_model.cond_stage_model):
            assert all(p.grad is None for p in part.parameters())
        loss, logs = tiny_model.p_losses(x, c, t)  # and in the step's loss, beside the diffusion term
        assert torch.isfinite(loss) and "train/loss_reward" in logs
    finally:
        tiny_model.reward = None
        tiny_model.zero_grad(set_to_none=True)


def test_the_reward_only_scores_steps_below_its_timestep(tiny_model: Any) -> None:
    g = torch.Generator().manual_seed(7)
    batch = {"jpg": torch.rand(2, 64, 64, 3, generator=g) * 2 - 1, "hint": torch.rand(2, 64, 64, 3, generator=g),
             "txt": ["a", "b"]}
    tiny_model.reward = ControlReward(EdgeSoftF1(), weight=1.0, max_timestep=50)
    try:
        with torch.no_grad():
            x, c = tiny_model.get_input(batch, "jpg")
            _, logs = tiny_model.p_losses(x, c, torch.tensor([500, 900]))
        assert "train/loss_reward" not in logs and "val/loss_reward" not in logs
    finally:
        tiny_model.reward = None


# ----- tiny runs with the flags, as a user runs them -------------------------------------------------------------
@pytest.mark.slow
def test_runs_with_recipe_flags_complete_and_resume_exactly(workspace: Path) -> None:
    """Every recipe flag at once (bar logit_normal, the other timestep sampling; see below), stopped and resumed:
    the same weights as an uninterrupted run."""
    flags = ["--timestep_sampling", "cubic", "--min_snr_gamma", "5", "--noise_offset", "0.1", "--reward_weight", "0.5",
             "--reward_max_timestep", "1000", "--reward_measure", "edges", "--accumulate_grad_batches", "2"]
    full, part = workspace / "recipe-all-full", workspace / "recipe-all-part"
    for args in (train_args(workspace, full, "--max_steps", "4", "--save_every", "2", *flags),
                 train_args(workspace, part, "--max_steps", "2", "--save_every", "2", *flags),
                 train_args(workspace, part, "--max_steps", "4", "--save_every", "2", "--resume", *flags)):
        result = run_train(args)
        assert result.returncode == 0, result.stderr[-2000:]
    a = torch.load(full / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(part / "last.ckpt", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_logit_normal_run_completes(workspace: Path) -> None:
    """logit_normal draws its timesteps from the same RNG the resume above restores; one run shows the flags work."""
    out = workspace / "recipe-logit-normal"
    result = run_train(train_args(workspace, out, "--max_steps", "2", "--save_every", "2", "--timestep_sampling",
                                  "logit_normal", "--logit_mean", "0.5", "--logit_std", "0.8"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert torch.load(out / "last.ckpt", weights_only=True)["global_step"] == 2
