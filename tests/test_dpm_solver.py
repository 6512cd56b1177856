"""DPM-Solver++(2M) on toy denoisers whose exact answer is known in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.models.diffusion.sampling import Denoiser, Discretization, sample_ddim, sample_dpmpp_2m
from ldm.modules.diffusionmodules.util import make_beta_schedule

#: Stable Diffusion's discrete schedule.
ALPHAS_CUMPROD = torch.tensor(np.cumprod(1.0 - make_beta_schedule("linear", 1000, 0.00085, 0.0120)))
#: A schedule whose log-SNR falls linearly in t (from 5 to -5), so that a uniform timestep grid is uniform in
#: lambda. SD's own schedule takes very uneven lambda steps near t = 0, which hides the order of convergence.
LINEAR_LOGSNR = torch.sigmoid(2 * torch.linspace(5.0, -5.0, 1000, dtype=torch.float64))


def gaussian_denoiser(mean: float, std: float, alphas_cumprod: torch.Tensor = ALPHAS_CUMPROD) -> Denoiser:
    """Exact eps prediction for data ~ N(mean, std^2) per element, at the schedule's timesteps."""

    def eps(x: torch.Tensor, t: torch.Tensor, progress: float) -> torch.Tensor:
        a = alphas_cumprod[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))
        x0 = mean + std**2 * a.sqrt() / (a * std**2 + 1 - a) * (x - a.sqrt() * mean)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    return Denoiser(eps, "eps")


def dpm_grid(alphas_cumprod: torch.Tensor, steps: int, grid: str = "ddim") -> Discretization:
    """DPM-Solver's discretization: down to clean data."""
    return Discretization.make(alphas_cumprod, steps, grid, end="clean")


def exact_ode_end(x_start: torch.Tensor, a_start: float, mean: float, std: float) -> torch.Tensor:
    """Probability-flow ODE endpoint for Gaussian data: (x - sqrt(a) mean) / sqrt(a std^2 + 1 - a) is constant."""
    z = (x_start - a_start**0.5 * mean) / (a_start * std**2 + 1 - a_start) ** 0.5
    return mean + std * z


@pytest.mark.parametrize("method", ["ddim", "uniform"])
def test_single_point_data_is_reached_exactly(method: str) -> None:
    point = torch.tensor([[0.3, -1.2], [2.0, 0.5]], dtype=torch.float64).view(1, 1, 2, 2)
    def to_point(x: torch.Tensor, t: torch.Tensor, progress: float) -> torch.Tensor:
        a = ALPHAS_CUMPROD[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * point) / (1 - a).sqrt()

    x = torch.randn((3, 1, 2, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = sample_dpmpp_2m(Denoiser(to_point), x, dpm_grid(ALPHAS_CUMPROD, 7, method))
    torch.testing.assert_close(out, point.expand_as(out), rtol=0, atol=1e-9)


def test_gaussian_data_converges_at_second_order() -> None:
    mean, std = 0.7, 0.4
    denoiser = gaussian_denoiser(mean, std, LINEAR_LOGSNR)
    x = torch.randn((4, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errors = []
    for steps in (10, 20, 40):
        schedule = dpm_grid(LINEAR_LOGSNR, steps, "uniform")
        exact = exact_ode_end(x, schedule.alphas[0], mean, std)
        errors.append((sample_dpmpp_2m(denoiser, x, schedule) - exact).abs().max().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-2
    assert errors[1] / errors[2] > 3.0  # halving the step cuts the error ~4x: second order


def test_more_accurate_than_ddim_at_equal_steps() -> None:
    mean, std = 0.0, 1.0
    denoiser = gaussian_denoiser(mean, std, LINEAR_LOGSNR)
    x = torch.randn((2, 1, 4, 4), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ddim = Discretization.make(LINEAR_LOGSNR, 10)
    dpm = dpm_grid(LINEAR_LOGSNR, 10, "ddim")
    assert list(dpm.timesteps) == list(ddim.timesteps)
    assert ddim.alphas_next[-1] == float(LINEAR_LOGSNR[0]) and dpm.alphas_next[-1] == 1.0
    a_start = dpm.alphas[0]
    # DDIM stops at a_0 instead of clean data; compare each with the exact ODE value at its own end point.
    a_end = float(LINEAR_LOGSNR[0])
    z = (x - a_start**0.5 * mean) / (a_start * std**2 + 1 - a_start) ** 0.5
    exact_ddim = a_end**0.5 * mean + (a_end * std**2 + 1 - a_end) ** 0.5 * z
    err_ddim = (sample_ddim(denoiser, x.float(), ddim).double() - exact_ddim).abs().max().item()
    err_dpm = (sample_dpmpp_2m(denoiser, x, dpm) - exact_ode_end(x, a_start, mean, std)).abs().max().item()
    assert err_dpm < err_ddim / 3


def test_first_step_is_ddim() -> None:
    denoiser = gaussian_denoiser(0.2, 0.5)
    x = torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(3))
    seen: dict[str, torch.Tensor] = {}
    sample_ddim(denoiser, x, Discretization.make(ALPHAS_CUMPROD, 8),
                callback=lambda i, x_i, x0: seen.setdefault("ddim", x_i))
    sample_dpmpp_2m(denoiser, x, dpm_grid(ALPHAS_CUMPROD, 8),
                    callback=lambda i, x_i, x0: seen.setdefault("dpm", x_i))
    torch.testing.assert_close(seen["dpm"], seen["ddim"], rtol=1e-5, atol=1e-5)


def test_deterministic_and_progress_passed() -> None:
    calls: list[float] = []
    base = gaussian_denoiser(0.0, 0.8)

    def recording(x: torch.Tensor, t: torch.Tensor, progress: float) -> torch.Tensor:
        calls.append(progress)
        return base.model_function(x, t, progress)

    denoiser = Denoiser(recording)
    x = torch.randn((2, 4, 4, 4), generator=torch.Generator().manual_seed(4))
    schedule = dpm_grid(ALPHAS_CUMPROD, 4)
    first, second = sample_dpmpp_2m(denoiser, x, schedule), sample_dpmpp_2m(denoiser, x, schedule)
    assert torch.equal(first, second)
    assert calls[:4] == [0.0, 0.25, 0.5, 0.75]


def test_bad_grid_and_steps() -> None:
    with pytest.raises(ValueError, match="unknown timestep grid"):
        dpm_grid(ALPHAS_CUMPROD, 4, "karras")
    with pytest.raises(ValueError, match="steps must be"):
        dpm_grid(ALPHAS_CUMPROD, 0, "uniform")
    with pytest.raises(ValueError, match="unknown end"):
        Discretization.make(ALPHAS_CUMPROD, 4, end="sigma_min")
