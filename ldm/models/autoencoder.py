"""First stages of latent diffusion: the KL autoencoder and the pixel-space identity.

Only inference is implemented; training arguments of the original classes are accepted
so the released YAML configs build unchanged, and are otherwise ignored.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ldm.errors import InputError
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution


class AutoencoderKL(nn.Module):
    """Stable Diffusion's VAE: image <-> latent through a diagonal Gaussian posterior.

    State-dict names match the `first_stage_model.*` entries of the original checkpoints.
    `lossconfig`, `monitor`, `image_key`, `colorize_nlabels`, `ema_decay` and `learn_logvar`
    only matter for training and are ignored (no loss, EMA or colorize tensors are created).
    `ckpt_path` is ignored with a warning: weights are loaded for the whole model through
    `cldm.model.load_state_dict`, which would overwrite a first-stage-only load anyway.
    """

    def __init__(
        self,
        ddconfig: Mapping[str, Any],
        lossconfig: Mapping[str, Any] | None = None,
        embed_dim: int = 4,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        image_key: str = "image",
        colorize_nlabels: int | None = None,
        monitor: str | None = None,
        ema_decay: float | None = None,
        learn_logvar: bool = False,
    ) -> None:
        super().__init__()
        del lossconfig, ignore_keys, colorize_nlabels, ema_decay, learn_logvar
        ddconfig = dict(ddconfig)
        if not ddconfig.get("double_z", True):
            raise InputError(
                "AutoencoderKL needs ddconfig.double_z=true: the encoder must output mean and logvar"
            )
        if ckpt_path is not None:
            warnings.warn(
                f"AutoencoderKL ignores ckpt_path={ckpt_path!r}; "
                "load weights with cldm.model.load_state_dict",
                stacklevel=2,
            )
        self.image_key = image_key
        self.monitor = monitor
        self.embed_dim = embed_dim
        #: Pixels per latent pixel: one halving per level but the last (8 for SD's four levels).
        self.downsampling_factor = 2 ** (len(ddconfig.get("ch_mult", (1, 2, 4, 4))) - 1)
        z_channels = int(ddconfig["z_channels"])
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, kernel_size=1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Image in [-1, 1], [B, C, H, W] -> posterior over latents [B, embed_dim, H/f, W/f]."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (already divided by the diffusion model's scale_factor) -> image in ~[-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self,
        x: torch.Tensor,
        sample_posterior: bool = True,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruct `x` via a sampled (or mode) latent; returns (reconstruction, posterior)."""
        posterior = self.encode(x)
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


class IdentityFirstStage(nn.Module):
    """First stage for pixel-space diffusion: encode and decode are the identity.

    `encode(x)` returns `x` itself (not a distribution), so callers use it as the latent directly.
    """

    def __init__(self, *args: Any, vq_interface: bool = False, **kwargs: Any) -> None:
        super().__init__()
        del args, kwargs
        self.vq_interface = vq_interface
        self.downsampling_factor = 1

    def encode(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x

    def decode(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x

    def quantize(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """VQ-style `(quant, loss, info)` when `vq_interface`, else `x`, for VQ-expecting callers."""
        if self.vq_interface:
            return x, None, [None, None, None]
        return x

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return x
