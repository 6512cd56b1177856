"""Latent diffusion: the noise schedule, the training loss, and the glue between UNet, VAE and text encoder.

`LatentDiffusion` keeps the original's constructor parameters and state-dict layout (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.*` and the schedule buffers), so the released YAMLs and checkpoints
load unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from ldm.modules.diffusionmodules.util import extract_into_tensor, make_beta_schedule
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

#: Buffers that the original registers and released checkpoints carry; all follow from the betas.
SCHEDULE_BUFFERS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
)


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model`, the level of nesting the checkpoints' key names have."""

    def __init__(self, diff_model_config: Any, conditioning_key: str | None) -> None:
        super().__init__()
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key


def _frozen(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def standard_noise(x: torch.Tensor) -> torch.Tensor:
    """Gaussian noise shaped like `x`, drawn in the standard layout (unlike `randn_like`, which follows `x`'s
    memory format): a channels_last latent gets the same noise at each position as a contiguous one."""
    return torch.randn(x.shape, dtype=x.dtype, device=x.device)


class LatentDiffusion(pl.LightningModule):
    """Stable Diffusion's diffusion process around a UNet, a first stage (VAE) and a text encoder.

    Parameters are the original's; those that only the original's unused code paths read
    (`num_timesteps_cond`, `monitor`, `log_every_t`, `cond_stage_trainable`, ...) are accepted and stored
    so the YAMLs load unchanged.
    """

    def __init__(self, unet_config: Any, first_stage_config: Any, cond_stage_config: Any, *,
                 timesteps: int = 1000, beta_schedule: str = "linear", loss_type: str = "l2",
                 linear_start: float = 1e-4, linear_end: float = 2e-2, cosine_s: float = 8e-3,
                 given_betas: Any = None, v_posterior: float = 0.0, l_simple_weight: float = 1.0,
                 original_elbo_weight: float = 0.0, parameterization: str = "eps",
                 first_stage_key: str = "image", cond_stage_key: str = "image", image_size: int = 256,
                 channels: int = 3, conditioning_key: str | None = None, scale_factor: float = 1.0,
                 scale_by_std: bool = False, cond_stage_trainable: bool = False, num_timesteps_cond: int = 1,
                 log_every_t: int = 100, clip_denoised: bool = True, monitor: str | None = None,
                 use_ema: bool = False, ckpt_path: str | None = None, ignore_keys: Any = (),
                 load_only_unet: bool = False, cond_stage_forward: str | None = None, concat_mode: bool = True,
                 use_positional_encodings: bool = False, learn_logvar: bool = False, logvar_init: float = 0.0,
                 scheduler_config: Any = None, force_null_conditioning: bool = False,
                 make_it_fit: bool = False, ucg_training: Any = None, reset_ema: bool = False,
                 reset_num_ema_updates: bool = False) -> None:
        super().__init__()
        if parameterization not in ("eps", "v", "x0"):
            raise ValueError(f"parameterization must be 'eps', 'v' or 'x0', got {parameterization!r}")
        if loss_type not in ("l1", "l2"):
            raise ValueError(f"loss_type must be 'l1' or 'l2', got {loss_type!r}")
        if use_ema or learn_logvar or scale_by_std or ckpt_path or cond_stage_trainable:
            raise ValueError(
                "use_ema, learn_logvar, scale_by_std, ckpt_path and cond_stage_trainable are not supported: "
                "load weights with cldm.model.load_state_dict and keep SD frozen"
            )
        self.parameterization = parameterization
        self.loss_type = loss_type
        self.l_simple_weight = l_simple_weight
        self.original_elbo_weight = original_elbo_weight
        self.first_stage_key = first_stage_key
        self.cond_stage_key = cond_stage_key
        self.image_size = image_size
        self.channels = channels
        self.scale_factor = scale_factor
        self.log_every_t = log_every_t
        self.clip_denoised = clip_denoised
        self.monitor = monitor
        self.use_ema = False
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.first_stage_model = _frozen(instantiate_from_config(first_stage_config))
        self.cond_stage_model = _frozen(instantiate_from_config(cond_stage_config))
        #: The config of each part, so that a part left uninitialised by a deferred build can be rebuilt.
        self.part_configs = {"model.diffusion_model": unet_config, "first_stage_model": first_stage_config,
                             "cond_stage_model": cond_stage_config}
        self._uninitialized: set[str] = set()
        #: dtype the frozen weights are held in on the device (None: as loaded); see `hold_frozen_weights_in`.
        self.frozen_dtype: torch.dtype | None = None
        #: Full-precision CPU copies of the frozen parameters while they are held in `frozen_dtype`.
        self._frozen_masters: dict[str, torch.Tensor] = {}
        #: Where the VAE encoder and the text encoder stay while fitting (None: with the model). Training from
        #: a cache sets "cpu": they then only encode the odd prompt for image logging and need no GPU memory.
        self.encoders_device: str | None = None
        self.register_schedule(given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s,
                               v_posterior)

    # ----- schedule -------------------------------------------------------------------------------------
    def register_schedule(self, given_betas: Any = None, beta_schedule: str = "linear", timesteps: int = 1000,
                          linear_start: float = 1e-4, linear_end: float = 2e-2, cosine_s: float = 8e-3,
                          v_posterior: float = 0.0) -> None:
        """Register the schedule buffers, computed in float64 and stored as float32 like the original."""
        betas = (np.asarray(given_betas, dtype=np.float64) if given_betas is not None
                 else make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s))
        self.num_timesteps = len(betas)
        self.linear_start, self.linear_end = linear_start, linear_end
        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        posterior_variance = ((1 - v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
                              + v_posterior * betas)
        values = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
        }
        for name in SCHEDULE_BUFFERS:
            self.register_buffer(name, torch.tensor(values[name], dtype=torch.float32, device="cpu"))
        if self.parameterization == "eps":
            with np.errstate(divide="ignore"):  # posterior_variance[0] is 0; lvlb[0] is replaced below
                lvlb = betas**2 / (2 * posterior_variance * alphas * (1 - alphas_cumprod))
        elif self.parameterization == "x0":
            lvlb = 0.5 * np.sqrt(alphas_cumprod) / (2.0 - 2.0 * alphas_cumprod)
        else:
            lvlb = np.ones_like(betas)
        lvlb[0] = lvlb[1]
        self.register_buffer("lvlb_weights", torch.tensor(lvlb, dtype=torch.float32, device="cpu"),
                             persistent=False)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Noise clean latents to step t: sqrt(a_t) x0 + sqrt(1 - a_t) eps."""
        noise = standard_noise(x_start) if noise is None else noise
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise)

    def get_v(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The v-prediction target: sqrt(a_t) eps - sqrt(1 - a_t) x0."""
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x.shape) * noise
                - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x.shape) * x)

    def predict_start_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * v)

    def predict_eps_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t.shape) * v
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t)

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
                - extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise)

    # ----- first and conditioning stages -------------------------------------------------------------------
    def train(self, mode: bool = True) -> LatentDiffusion:
        """Switch the trainable parts only; the VAE and the text encoder always stay in eval mode."""
        super().train(mode)
        self.first_stage_model.eval()
        self.cond_stage_model.eval()
        return self

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> Any:
        self.materialize()
        device = _device_of(self.first_stage_model, self.device)
        with self.frozen_autocast(device.type):
            posterior = self.first_stage_model.encode(as_input_for(self.first_stage_model, x.to(device)))
        if not isinstance(posterior, DiagonalGaussianDistribution):
            return posterior.to(self.device)
        moments = posterior.parameters
        if moments.device == self.device and moments.dtype == torch.float32:
            return posterior
        return DiagonalGaussianDistribution(moments.to(self.device, torch.float32), posterior.deterministic)

    def get_first_stage_encoding(self, encoder_posterior: Any, generator: torch.Generator | None = None
                                 ) -> torch.Tensor:
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample(generator=generator)
        elif isinstance(encoder_posterior, torch.Tensor):
            z = encoder_posterior
        else:
            raise TypeError(f"first stage returned {type(encoder_posterior).__name__}, expected a tensor or "
                            "DiagonalGaussianDistribution")
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor) -> torch.Tensor:
        self.materialize()
        with self.frozen_autocast():
            return self.first_stage_model.decode(as_input_for(self.first_stage_model, z / self.scale_factor)).float()

    def get_learned_conditioning(self, c: list[str]) -> torch.Tensor:
        self.materialize()
        encoder = self.cond_stage_model
        with self.frozen_autocast(_device_of(encoder, self.device).type):
            out = encoder.encode(c) if callable(getattr(encoder, "encode", None)) else encoder(c)
        out = out.mode() if isinstance(out, DiagonalGaussianDistribution) else out
        return out.to(self.device, torch.float32)

    @torch.no_grad()
    def get_input(self, batch: Mapping[str, Any], k: str, bs: int | None = None, **kwargs: Any
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents of the batch's images (NHWC in [-1, 1]) and the embedding of its prompts.

        A batch from a cache (see `training/cache.py`) carries `latent_moments` (the VAE posterior's
        parameters, so that sampling the latent stays stochastic as without the cache) or `latent`
        (deterministic first stages), and `context` (the prompt embeddings): then neither the VAE encoder
        nor the text encoder runs.
        """
        def first(values: Any) -> Any:
            return values[:bs] if bs is not None else values

        if "latent_moments" in batch:
            posterior: Any = DiagonalGaussianDistribution(first(batch["latent_moments"]).to(self.device).float())
        elif "latent" in batch:
            posterior = first(batch["latent"]).to(self.device).float()
        else:
            x = first(batch[k]).to(self.device).permute(0, 3, 1, 2).contiguous().float()
            posterior = self.encode_first_stage(x)
        z = self.get_first_stage_encoding(posterior).detach()
        if "context" in batch:
            return z, first(batch["context"]).to(self.device)
        return z, self.get_learned_conditioning(list(first(batch[self.cond_stage_key])))

    # ----- the model and its loss --------------------------------------------------------------------------
    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any, *args: Any, **kwargs: Any
                    ) -> torch.Tensor:
        self.materialize()
        context = torch.cat(cond["c_crossattn"], 1) if isinstance(cond, Mapping) else cond
        unet = self.model.diffusion_model
        with self.frozen_autocast():
            return unet(as_input_for(unet, x_noisy), t, context=as_input_for(unet, context)).float()

    def get_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-element loss (not reduced)."""
        if self.loss_type == "l1":
            return (target - pred).abs()
        return F.mse_loss(pred, target, reduction="none")

    def p_losses(self, x_start: torch.Tensor, cond: Any, t: torch.Tensor, noise: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        noise = standard_noise(x_start) if noise is None else noise
        x_noisy = self.q_sample(x_start, t, noise)
        model_output = self.apply_model(x_noisy, t, cond)
        if self.parameterization == "eps":
            target = noise
        elif self.parameterization == "v":
            target = self.get_v(x_start, noise, t)
        else:
            target = x_start
        per_sample = self.get_loss(model_output.float(), target.float()).mean(dim=(1, 2, 3))
        prefix = "train" if self.training else "val"
        loss_simple = per_sample.mean()
        loss = self.l_simple_weight * loss_simple
        logs = {f"{prefix}/loss_simple": loss_simple.detach()}
        if self.original_elbo_weight:
            loss_vlb = (self.lvlb_weights[t] * per_sample).mean()
            loss = loss + self.original_elbo_weight * loss_vlb
            logs[f"{prefix}/loss_vlb"] = loss_vlb.detach()
        logs[f"{prefix}/loss"] = loss.detach()
        return loss, logs

    def forward(self, x: torch.Tensor, c: Any, *args: Any, **kwargs: Any
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.materialize()
        t = torch.randint(0, self.num_timesteps, (x.shape[0],), device=self.device).long()
        return self.p_losses(x, c, t, *args, **kwargs)

    def shared_step(self, batch: Mapping[str, Any], **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, c = self.get_input(batch, self.first_stage_key)
        return self(x, c)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss, logs = self.shared_step(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"loss is {loss.item()} at step {self.global_step}: training stopped; the last checkpoint "
                "written is intact (try a lower learning rate or --precision 32)"
            )
        self.log_dict(logs, prog_bar=True, logger=True, on_step=True, on_epoch=False)
        return loss

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        _, logs = self.shared_step(batch)
        self.log_dict(logs, prog_bar=False, logger=True, on_step=False, on_epoch=True)

    # ----- frozen weights in half precision ----------------------------------------------------------------
    def hold_frozen_weights_in(self, dtype: torch.dtype | None) -> None:
        """Hold every frozen parameter in `dtype` (None or float32: full precision again).

        Why: under bf16 autocast each frozen weight is cast to bf16 on every use anyway, so holding it in
        bf16 loses nothing there and halves the locked SD's memory (2.1 GB less on the GPU for SD1.5), as
        diffusers' training scripts do. The full-precision values stay on the CPU: `state_dict()` returns
        them, so a checkpoint keeps the exact SD weights it was trained from. While weights are held in
        half precision, the parts run under autocast in that dtype wherever they are called (training step,
        sampling, image logging) and return float32. Lightning's `setup` applies `frozen_dtype`.
        """
        self.materialize()
        self.frozen_dtype = None if dtype in (None, torch.float32) else dtype
        self._sync_frozen_dtype()
        if self.frozen_dtype is not None:
            held = sum(m.numel() for m in self._frozen_masters.values())
            rank_zero_info(f"frozen weights: {held / 1e6:.1f}M parameters held in {str(self.frozen_dtype)[6:]} "
                           f"({held * 2 / 1e9:.2f} GB less); checkpoints keep them at full precision")

    def _sync_frozen_dtype(self) -> None:
        """Cast frozen parameters to `frozen_dtype` and bring trainable ones back to full precision."""
        for name, param in self.named_parameters():
            master = self._frozen_masters.get(name)
            if param.requires_grad or self.frozen_dtype is None:
                if master is not None:
                    param.data = master.to(param.device)
                    del self._frozen_masters[name]
            elif param.is_floating_point() and param.dtype != self.frozen_dtype:
                if master is None:
                    self._frozen_masters[name] = param.detach().to("cpu", copy=True)
                param.data = param.data.to(self.frozen_dtype)

    def frozen_autocast(self, device_type: str | None = None) -> contextlib.AbstractContextManager[Any]:
        """Autocast in `frozen_dtype` while frozen weights are held in it; else nothing."""
        if not self._frozen_masters:
            return contextlib.nullcontext()
        return torch.autocast(device_type or self.device.type, dtype=self.frozen_dtype)

    def on_fit_start(self) -> None:
        if self.encoders_device is not None:
            self.place_encoders(self.encoders_device)

    def place_encoders(self, device: str | torch.device) -> None:
        """Move the text encoder and the VAE's encoding half (not its decoder, which image logging needs at
        speed) to `device`; encoding then runs there and its results come back to the model's device."""
        vae = self.first_stage_model
        for part in (self.cond_stage_model, getattr(vae, "encoder", None), getattr(vae, "quant_conv", None)):
            if part is not None:
                part.to(device)

    # ----- loading and deferred initialisation ------------------------------------------------------------
    @classmethod
    def build_deferred(cls, **params: Any) -> LatentDiffusion:
        """Build without spending time on random weights that a checkpoint will overwrite.

        Parameters are allocated but not initialised; `load_state_dict` fills them, and any part the
        checkpoint leaves out (or the whole model, if it is used without loading) is rebuilt with its random
        initialisation by `materialize()` before first use.
        """
        with torch.device("meta"):
            model = cls(**params)
        model._uninitialized = {name for name, t in _named_tensors(model) if t.is_meta}
        model._apply(lambda t: torch.empty_like(t, device="cpu") if t.is_meta else t)
        return model.to("cpu")  # also resets Lightning's device record, which was taken under the meta context

    def materialize(self) -> None:
        """Randomly initialise whatever a deferred build left uninitialised; a no-op afterwards."""
        if not self._uninitialized:
            return
        for name, config in self.part_configs.items():
            prefix = name + "."
            pending = {k for k in self._uninitialized if k.startswith(prefix)}
            if not pending:
                continue
            old = self.get_submodule(name)
            reference = next(old.parameters())
            fresh = instantiate_from_config(config).to(device=reference.device, dtype=reference.dtype)
            kept = {k: v for k, v in old.state_dict().items() if prefix + k not in pending}
            fresh.load_state_dict(kept, strict=False)
            parent, _, attr = name.rpartition(".")
            setattr(self.get_submodule(parent) if parent else self, attr, fresh)
        self._uninitialized = set()
        self.set_trainable_parts()

    def set_trainable_parts(self) -> None:
        """Freeze what must not train, and keep frozen weights (only those) in `frozen_dtype`."""
        self.freeze_parts()
        self._sync_frozen_dtype()

    def freeze_parts(self) -> None:
        """The VAE and the text encoder never train."""
        _frozen(self.first_stage_model)
        _frozen(self.cond_stage_model)

    def setup(self, stage: str) -> None:
        self.materialize()
        if stage == "fit" and self.frozen_dtype is not None:
            self.hold_frozen_weights_in(self.frozen_dtype)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """The weights, frozen ones at full precision even while held in `frozen_dtype`."""
        self.materialize()
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        for name, master in self._frozen_masters.items():
            if prefix + name in state:
                state[prefix + name] = master
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load a checkpoint's weights; explain an architecture mismatch in one line.

        EMA copies (`model_ema.*`) that released checkpoints may carry are dropped, since this model keeps
        none.
        """
        from cldm.model import explain_mismatch

        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("model_ema.")}
        try:
            result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as err:
            raise CheckpointMismatchError(explain_mismatch(self, state_dict)) from err
        if self._uninitialized:
            self._uninitialized -= state_dict.keys()
            self.materialize()
        for name in self._frozen_masters.keys() & state_dict.keys():
            self._frozen_masters[name] = state_dict[name].detach().to("cpu", torch.float32, copy=True)
        return result


def as_input_for(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`x` in the dtype of `module`'s weights, so that a network held in half precision runs without autocast
    (whose per-op casts cost time at inference); under autocast `x` is returned as it is."""
    if not x.is_floating_point() or torch.is_autocast_enabled(x.device.type) or not isinstance(module, nn.Module):
        return x
    first = _first_parameter(module)
    return x if first is None or first.dtype == x.dtype else x.to(first.dtype)


def _device_of(module: nn.Module, default: torch.device) -> torch.device:
    """The device a module's weights are on (where its encoding runs)."""
    first = _first_parameter(module)
    return default if first is None else first.device


def _first_parameter(module: nn.Module) -> nn.Parameter | None:
    return next(module.parameters(), None)


def _named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(module.named_parameters()) + list(module.named_buffers())


class CheckpointMismatchError(RuntimeError):
    """A checkpoint that does not fit the model built from the config."""
