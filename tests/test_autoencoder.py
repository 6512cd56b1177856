"""KL autoencoder, its posterior, and the identity first stage."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from ldm.models.autoencoder import AutoencoderKL, IdentityFirstStage
from ldm.modules.diffusionmodules import model as vae_modules
from ldm.modules.diffusionmodules.model import AttnBlock, Downsample
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

REFERENCE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "reference"
LAYOUT_FILE = REFERENCE_DIR / "checkpoint_layout_unet_control_vae.json"
PREFIX = "first_stage_model."


def full_first_stage_config() -> dict[str, Any]:
    """The `first_stage_config` of models/cldm_v15.yaml and models/cldm_v21.yaml."""
    return {
        "target": "ldm.models.autoencoder.AutoencoderKL",
        "params": {
            "embed_dim": 4,
            "monitor": "val/rec_loss",
            "ddconfig": {
                "double_z": True,
                "z_channels": 4,
                "resolution": 256,
                "in_channels": 3,
                "out_ch": 3,
                "ch": 128,
                "ch_mult": [1, 2, 4, 4],
                "num_res_blocks": 2,
                "attn_resolutions": [],
                "dropout": 0.0,
            },
            "lossconfig": {"target": "torch.nn.Identity"},
        },
    }


def tiny_vae(**overrides: Any) -> AutoencoderKL:
    ddconfig = {
        "double_z": True,
        "z_channels": 4,
        "resolution": 32,
        "in_channels": 3,
        "out_ch": 3,
        "ch": 32,
        "ch_mult": [1, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [],
        "dropout": 0.0,
    }
    ddconfig.update(overrides)
    return AutoencoderKL(ddconfig, embed_dim=3).eval()


@pytest.mark.parametrize("version", ["v15", "v21"])
def test_full_size_layout_matches_checkpoint(version: str) -> None:
    if not LAYOUT_FILE.is_file():
        pytest.skip(f"reference layout not found at {LAYOUT_FILE}")
    layout = json.loads(LAYOUT_FILE.read_text())[version]
    expected = {k[len(PREFIX) :]: list(v) for k, v in layout.items() if k.startswith(PREFIX)}
    assert len(expected) == 248

    with torch.device("meta"):
        model = instantiate_from_config(full_first_stage_config())
    got = {k: list(v.shape) for k, v in model.state_dict().items()}

    assert sorted(set(got) - set(expected)) == []
    assert sorted(set(expected) - set(got)) == []
    mismatched = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    assert mismatched == {}


def test_tiny_vae_shapes() -> None:
    torch.manual_seed(0)
    model = tiny_vae(ch_mult=[1, 2, 2], attn_resolutions=[16])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        posterior = model.encode(x)
        assert posterior.mean.shape == (2, 3, 8, 8)
        assert posterior.logvar.shape == (2, 3, 8, 8)
        out = model.decode(posterior.sample())
        assert out.shape == (2, 3, 32, 32)
        rec, post = model(x, sample_posterior=False)
    assert rec.shape == x.shape
    assert torch.equal(post.mode(), post.mean)
    # attention at res 16 is present in both halves (decoder level 1 has num_res_blocks + 1)
    assert len(model.encoder.down[1].attn) == 1
    assert len(model.decoder.up[1].attn) == 2


def test_channels_last_convolutions_change_no_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CPU runs the VAE's convolutions channels_last for speed; outputs match the plain layout's, contiguous."""
    torch.manual_seed(0)
    model = tiny_vae(ch_mult=[1, 2, 2], attn_resolutions=[16]).eval()
    x, z = torch.randn(2, 3, 32, 32), torch.randn(2, model.decoder.conv_in.in_channels, 8, 8)
    assert vae_modules.cpu_conv_layout(x).is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        fast = model.encoder(x), model.decoder(z)
        monkeypatch.setattr(vae_modules, "cpu_conv_layout", lambda t: t)
        plain = model.encoder(x), model.decoder(z)
    for got, want in zip(fast, plain):
        assert got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_posterior_sampling_is_reproducible() -> None:
    params = torch.randn(2, 8, 4, 4)
    posterior = DiagonalGaussianDistribution(params)
    a = posterior.sample(generator=torch.Generator().manual_seed(123))
    b = posterior.sample(generator=torch.Generator().manual_seed(123))
    c = posterior.sample(generator=torch.Generator().manual_seed(124))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert torch.equal(posterior.mode(), params[:, :4])


def test_logvar_is_clamped() -> None:
    params = torch.cat(
        [torch.zeros(1, 2, 2, 2), torch.tensor([-100.0, 100.0]).view(1, 2, 1, 1).expand(1, 2, 2, 2)], 1
    )
    posterior = DiagonalGaussianDistribution(params)
    assert torch.equal(posterior.logvar[:, 0], torch.full((1, 2, 2), -30.0))
    assert torch.equal(posterior.logvar[:, 1], torch.full((1, 2, 2), 20.0))
    assert torch.isfinite(posterior.var).all() and (posterior.var > 0).all()


def test_kl_and_nll() -> None:
    standard = DiagonalGaussianDistribution(torch.zeros(3, 8, 4, 4))
    assert torch.equal(standard.kl(), torch.zeros(3))
    assert torch.equal(standard.kl(standard), torch.zeros(3))
    nll = standard.nll(torch.zeros(3, 4, 4, 4))
    torch.testing.assert_close(nll, torch.full((3,), 0.5 * math.log(2 * math.pi) * 64))

    shifted = DiagonalGaussianDistribution(torch.cat([torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)], 1))
    torch.testing.assert_close(shifted.kl(), torch.tensor([0.5 * 16]))

    det = DiagonalGaussianDistribution(torch.randn(2, 8, 4, 4), deterministic=True)
    assert torch.equal(det.sample(), det.mean)
    assert torch.equal(det.kl(), torch.zeros(2))


def test_attention_matches_naive_softmax() -> None:
    torch.manual_seed(0)
    block = AttnBlock(64).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 64, 5, 7)
    with torch.no_grad():
        got = block(x)

        h = block.norm(x)
        b, c, hh, ww = h.shape
        q = block.q(h).reshape(b, c, hh * ww).permute(0, 2, 1)  # [b, n, c]
        k = block.k(h).reshape(b, c, hh * ww)  # [b, c, n]
        v = block.v(h).reshape(b, c, hh * ww)  # [b, c, n]
        weights = torch.softmax(torch.bmm(q, k) / math.sqrt(c), dim=2)  # [b, n_q, n_k]
        attended = torch.bmm(v, weights.permute(0, 2, 1)).reshape(b, c, hh, ww)
        want = x + block.proj_out(attended)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_downsample_pads_right_and_bottom() -> None:
    torch.manual_seed(0)
    down = Downsample(32).eval()
    x = torch.randn(1, 32, 8, 8)
    with torch.no_grad():
        want = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
        got = down(x)
    assert got.shape == (1, 32, 4, 4)
    torch.testing.assert_close(got, want)


def test_group_norm_settings() -> None:
    model = tiny_vae()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == 32 and m.eps == 1e-6 for m in norms)


def test_ckpt_path_warns_and_double_z_required() -> None:
    ddconfig = full_first_stage_config()["params"]["ddconfig"]
    with torch.device("meta"), pytest.warns(UserWarning, match="load_state_dict"):
        AutoencoderKL(ddconfig, ckpt_path="some/vae.ckpt")
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL({**ddconfig, "double_z": False})


def test_identity_first_stage_round_trip() -> None:
    stage = instantiate_from_config({"target": "ldm.models.autoencoder.IdentityFirstStage"})
    x = torch.randn(2, 3, 16, 16)
    encoded = stage.encode(x)
    assert not isinstance(encoded, DiagonalGaussianDistribution)
    assert torch.equal(stage.decode(encoded), x)
    assert torch.equal(stage(x), x)
    assert list(stage.parameters()) == []
    quant, loss, info = IdentityFirstStage(vq_interface=True).quantize(x)
    assert quant is x and loss is None and info == [None, None, None]
