"""Latent diffusion: a UNet trained to denoise VAE latents, conditioned on a text encoder's embedding of the prompt.

`LatentDiffusion` keeps the original's constructor parameters and state-dict layout (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.*` and the schedule buffers), so the released YAMLs and checkpoints
load unchanged. It is the Lightning module and the glue between its parts; each idea it uses lives in a module
of its own:

    schedule.py        schedule buffers, noising, training targets       (NoiseSchedule)
    loss.py            the training objective                            (DiffusionLoss)
    guidance.py        classifier-free guidance                          (ClassifierFreeGuidance)
    sampling.py        discretization, denoiser, samplers, `sample(...)`
    ../frozen_weights.py   frozen weights held in half precision        (FrozenWeights)
    ../deferred.py     building without random initialisation            (DeferredParts)

Where a batch's latents and prompt embeddings come from is `batch_encoder`: by default the VAE and the text
encoder run on the batch's images and prompts (`encode_batch`); training from a cache swaps in the cache's own
(`training.cache.cached_batch_encoder`), so this module knows nothing of the cache's format.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Protocol

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from ldm.errors import InputError, TrainingDiverged
from ldm.models.deferred import DeferredParts, build_deferred, first_parameter
from ldm.models.diffusion.conditioning import Context, cat_conditions, map_context, unet_inputs
from ldm.models.diffusion.loss import DiffusionLoss, TrainingRecipe
from ldm.models.diffusion.schedule import (
    PARAMETERIZATIONS,
    SCHEDULE_BUFFERS,
    NoiseSchedule,
    lvlb_weights,
    schedule_values,
    standard_noise,
)
from ldm.models.frozen_weights import FrozenWeights
from ldm.modules.diffusionmodules.util import as_input_for, make_beta_schedule
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.encoders.conditioner import TEXT_KEY, default_sizes, sizes_of
from ldm.util import instantiate_from_config

#: Buffers other code saves that this model derives itself: sgm's `denoiser.sigmas` (from the same schedule).
IGNORED_KEYS = frozenset({"denoiser.sigmas"})

__all__ = ["SCHEDULE_BUFFERS", "BatchEncoder", "DiffusionWrapper", "LatentDiffusion", "as_input_for", "encode_batch"]


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


class BatchEncoder(Protocol):
    def __call__(self, model: LatentDiffusion, batch: Mapping[str, Any], key: str, bs: int | None
                 ) -> tuple[Any, Context]:
        """(the first stage's posterior or latent of the batch's first `bs` images, their text conditioning)."""
        ...


def encode_batch(model: LatentDiffusion, batch: Mapping[str, Any], key: str, bs: int | None
                 ) -> tuple[Any, Context]:
    """Run the VAE encoder on `batch[key]` (NHWC in [-1, 1]) and the text encoder on the batch's prompts (SDXL's
    conditioner also on the items' size conditionings: the batch's own, else each image's size uncropped)."""
    images, prompts = batch[key], batch[model.cond_stage_key]
    if bs is not None:
        images, prompts = images[:bs], prompts[:bs]
    x = images.to(model.device).permute(0, 3, 1, 2).contiguous().float()
    sizes = sizes_of(batch, len(prompts), x.shape[2], x.shape[3]) if model.has_conditioner else None
    return model.encode_first_stage(x), model.get_learned_conditioning(list(prompts), sizes)


class LatentDiffusion(pl.LightningModule):
    """Stable Diffusion's diffusion process around a UNet, a first stage (VAE) and a text encoder.

    Parameters are the original's; those that only the original's unused code paths read
    (`num_timesteps_cond`, `monitor`, `log_every_t`, `clip_denoised`, ...) are accepted and ignored so the
    YAMLs load unchanged.
    """

    def __init__(self, unet_config: Any, first_stage_config: Any, cond_stage_config: Any = None, *,
                 conditioner_config: Any = None, schedule_in_checkpoint: bool = True, timesteps: int = 1000,
                 beta_schedule: str = "linear", loss_type: str = "l2",
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
        if parameterization not in PARAMETERIZATIONS:
            raise InputError(f"parameterization must be 'eps', 'v' or 'x0', got {parameterization!r}")
        if use_ema or learn_logvar or scale_by_std or ckpt_path or cond_stage_trainable:
            raise InputError(
                "use_ema, learn_logvar, scale_by_std, ckpt_path and cond_stage_trainable are not supported: "
                "load weights with cldm.model.load_state_dict and keep SD frozen"
            )
        self.parameterization = parameterization
        self.diffusion_loss = DiffusionLoss(loss_type, l_simple_weight, original_elbo_weight)
        #: Timestep distribution, loss weighting and noise offset of training steps (the original's by default).
        self.recipe = TrainingRecipe()
        self.first_stage_key = first_stage_key
        self.cond_stage_key = cond_stage_key
        self.image_size = image_size
        self.channels = channels
        self.scale_factor = scale_factor
        self.use_ema = False  # read by the original's scripts
        if (cond_stage_config is None) == (conditioner_config is None):
            raise InputError("the model needs either cond_stage_config (SD1.x/2.x's text encoder) or "
                             "conditioner_config (SDXL's conditioner), not both")
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.first_stage_model = _frozen(instantiate_from_config(first_stage_config))
        #: The text part's name in the checkpoint: SD1.x/2.x's `cond_stage_model`, or SDXL's `conditioner`.
        self.text_part = "cond_stage_model" if conditioner_config is None else "conditioner"
        text_config = cond_stage_config if conditioner_config is None else conditioner_config
        self.add_module(self.text_part, _frozen(instantiate_from_config(text_config)))
        #: The config of each part, so that a part left uninitialised by a deferred build can be rebuilt.
        self.deferred = DeferredParts({"model.diffusion_model": unet_config, "first_stage_model": first_stage_config,
                                       self.text_part: text_config})
        self.frozen_weights = FrozenWeights()
        #: Where the VAE encoder and the text encoder stay while fitting (None: with the model). Training from
        #: a cache sets "cpu": they then only encode the odd prompt for image logging and need no GPU memory.
        self.encoders_device: str | None = None
        #: Where a batch's latents and text conditioning come from (see the module docstring).
        self.batch_encoder: BatchEncoder = encode_batch
        #: SD1.x/2.x checkpoints carry the schedule buffers; SDXL's carry none (sgm saves `denoiser.sigmas`).
        self.schedule_in_checkpoint = schedule_in_checkpoint
        self.register_schedule(given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s,
                               v_posterior, persistent=schedule_in_checkpoint)

    @property
    def loss_type(self) -> str:
        return self.diffusion_loss.loss_type

    @property
    def l_simple_weight(self) -> float:
        return self.diffusion_loss.l_simple_weight

    @property
    def original_elbo_weight(self) -> float:
        return self.diffusion_loss.original_elbo_weight

    @property
    def part_configs(self) -> dict[str, Any]:
        """The config each part (by submodule name) was built from."""
        return self.deferred.part_configs

    # ----- schedule -------------------------------------------------------------------------------------
    def register_schedule(self, given_betas: Any = None, beta_schedule: str = "linear", timesteps: int = 1000,
                          linear_start: float = 1e-4, linear_end: float = 2e-2, cosine_s: float = 8e-3,
                          v_posterior: float = 0.0, persistent: bool = True) -> None:
        """Register the schedule buffers, computed in float64 and stored as float32 like the original."""
        betas = (given_betas if given_betas is not None
                 else make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s))
        values = schedule_values(betas, v_posterior)
        self.num_timesteps = len(values["betas"])
        self.linear_start, self.linear_end = linear_start, linear_end
        for name in SCHEDULE_BUFFERS:
            self.register_buffer(name, torch.tensor(values[name], dtype=torch.float32, device="cpu"),
                                 persistent=persistent)
        weights = lvlb_weights(values, self.parameterization)
        self.register_buffer("lvlb_weights", torch.tensor(weights, dtype=torch.float32, device="cpu"),
                             persistent=False)

    @property
    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.of(self)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Noise clean latents to step t: sqrt(a_t) x0 + sqrt(1 - a_t) eps."""
        return self.schedule.q_sample(x_start, t, standard_noise(x_start) if noise is None else noise)

    def get_v(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.v_target(x, noise, t)

    def predict_start_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.schedule.x0_from_v(x_t, t, v)

    def predict_eps_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.schedule.eps_from_v(x_t, t, v)

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.schedule.x0_from_eps(x_t, t, noise)

    # ----- first and conditioning stages -------------------------------------------------------------------
    def train(self, mode: bool = True) -> LatentDiffusion:
        """Switch the trainable parts only; the VAE and the text encoder always stay in eval mode."""
        super().train(mode)
        self.first_stage_model.eval()
        self.text_encoder.eval()
        return self

    @property
    def text_encoder(self) -> nn.Module:
        """The text part: SD1.x/2.x's `cond_stage_model` or SDXL's `conditioner`."""
        return getattr(self, self.text_part)

    @property
    def has_conditioner(self) -> bool:
        """Whether the text part is SDXL's conditioner (context and vector, from prompts and sizes)."""
        return self.text_part == "conditioner"

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

    def get_learned_conditioning(self, c: list[str], sizes: Mapping[str, torch.Tensor] | None = None,
                                 zero_text: bool = False) -> Context:
        """The prompts' context (SDXL: `{"crossattn", "vector"}`, with `sizes` the items' size conditionings, by
        default `default_sizes` of the model's image size; `zero_text`: zeros for the text parts, SDXL's
        unconditional)."""
        self.materialize()
        encoder = self.text_encoder
        with self.frozen_autocast(_device_of(encoder, self.device).type):
            if self.has_conditioner:
                out = encoder({TEXT_KEY: c, **self._sizes_or_default(sizes, len(c))},
                              force_zero_embeddings=(TEXT_KEY,) if zero_text else ())
            else:
                out = encoder.encode(c) if callable(getattr(encoder, "encode", None)) else encoder(c)
        out = out.mode() if isinstance(out, DiagonalGaussianDistribution) else out
        return map_context(out, lambda t: t.to(self.device, torch.float32))

    @torch.no_grad()
    def text_encodings(self, prompts: list[str]) -> Context:
        """What the text encoders alone make of `prompts`, to store and reuse (the training cache): SD's context, or
        SDXL's text context and pooled vector (`{"crossattn", "vector"}`), which `conditioning_from_text` completes
        with each item's size conditionings."""
        if not self.has_conditioner:
            return self.get_learned_conditioning(prompts)
        self.materialize()
        with self.frozen_autocast(_device_of(self.text_encoder, self.device).type):
            out = self.text_encoder.encode_key(TEXT_KEY, prompts)
        return map_context(out, lambda t: t.to(self.device, torch.float32))

    def conditioning_from_text(self, text: Context, sizes: Mapping[str, torch.Tensor] | None = None) -> Context:
        """The context of prompts whose `text_encodings` were computed before: as is (SD), or with the SDXL
        conditioner's size embeddings of `sizes` (default: `default_sizes` of the model's image size) added."""
        if not self.has_conditioner:
            return text
        rows = len(next(iter(text.values())))  # type: ignore[union-attr]
        with self.frozen_autocast(_device_of(self.text_encoder, self.device).type):
            out = self.text_encoder(self._sizes_or_default(sizes, rows), encoded={TEXT_KEY: text})
        return map_context(out, lambda t: t.to(self.device, torch.float32))

    def _sizes_or_default(self, sizes: Mapping[str, torch.Tensor] | None, n: int) -> dict[str, torch.Tensor]:
        """`sizes`, or SDXL's size conditionings of `n` images at the model's own size, whole and uncropped."""
        if sizes is not None:
            return dict(sizes)
        size = self.image_size * self.latent_factor
        return default_sizes(n, size, size)

    @torch.no_grad()
    def get_unconditional_conditioning(self, n: int, sizes: Mapping[str, torch.Tensor] | None = None) -> Context:
        """The empty prompt's context: "" encoded (SD1.x/2.x), or zero text with the size embeddings (SDXL, as sgm
        and diffusers sample it)."""
        return self.get_learned_conditioning([""] * n, sizes, zero_text=self.has_conditioner)

    @property
    def latent_factor(self) -> int:
        """Pixels per latent pixel: the VAE's downsampling (8 for SD's KL-f8)."""
        return int(getattr(self.first_stage_model, "downsampling_factor", 8))

    @torch.no_grad()
    def get_input(self, batch: Mapping[str, Any], k: str, bs: int | None = None, **kwargs: Any
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents of the batch's first `bs` images and the embedding of their prompts (see `batch_encoder`)."""
        posterior, context = self.batch_encoder(self, batch, k, bs)
        return self.get_first_stage_encoding(posterior).detach(), context

    # ----- the model and its loss --------------------------------------------------------------------------
    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any, *args: Any, **kwargs: Any
                    ) -> torch.Tensor:
        self.materialize()
        is_dict = isinstance(cond, Mapping) and "c_crossattn" in cond
        context = cat_conditions(cond["c_crossattn"], cond.get("y")) if is_dict else cond
        unet = self.model.diffusion_model
        crossattn, vector = unet_inputs(map_context(context, lambda c: as_input_for(unet, c)))
        with self.frozen_autocast():
            return unet(as_input_for(unet, x_noisy), t, context=crossattn, y=vector).to(x_noisy.dtype)

    def get_loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-element loss (not reduced)."""
        return self.diffusion_loss.elementwise(pred, target)

    def p_losses(self, x_start: torch.Tensor, cond: Any, t: torch.Tensor, noise: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        noise = self.recipe.noise(x_start) if noise is None else noise
        x_noisy = self.q_sample(x_start, t, noise)
        model_output = self.apply_model(x_noisy, t, cond)
        target = self.schedule.target(self.parameterization, x_start, noise, t)
        prefix = "train" if self.training else "val"
        weights = self.recipe.weights(self.alphas_cumprod, t, self.parameterization)
        loss, logs = self.diffusion_loss(model_output, target, t, self.lvlb_weights, prefix, weights)
        extra, extra_logs = self.extra_losses(x_start, x_noisy, t, cond, model_output, prefix)
        if extra is not None:
            loss = loss + extra
            logs = {**logs, **extra_logs, f"{prefix}/loss": loss.detach()}
        return loss, logs

    def extra_losses(self, x_start: torch.Tensor, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any,
                     model_output: torch.Tensor, prefix: str) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """Terms a subclass adds to the diffusion loss (ControlLDM's control reward); none here."""
        return None, {}

    def forward(self, x: torch.Tensor, c: Any, *args: Any, **kwargs: Any
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.materialize()
        t = self.recipe.timesteps(x.shape[0], self.num_timesteps, self.device)
        return self.p_losses(x, c, t, *args, **kwargs)

    def shared_step(self, batch: Mapping[str, Any], **kwargs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, c = self.get_input(batch, self.first_stage_key)
        return self(x, c)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss, logs = self.shared_step(batch)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"the loss of step {self.global_step + 1} is {loss.item()}: training stopped "
                                   "(try a lower learning rate, or --precision 32)")
        self.log_dict(logs, prog_bar=True, logger=True, on_step=True, on_epoch=False)
        return loss

    @torch.no_grad()
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        _, logs = self.shared_step(batch)
        self.log_dict(logs, prog_bar=False, logger=True, on_step=False, on_epoch=True)

    # ----- frozen weights in half precision ----------------------------------------------------------------
    @property
    def frozen_dtype(self) -> torch.dtype | None:
        """dtype the frozen weights are held in on the device while fitting (None: as loaded)."""
        return self.frozen_weights.dtype

    @frozen_dtype.setter
    def frozen_dtype(self, dtype: torch.dtype | None) -> None:
        self.frozen_weights.dtype = dtype

    def hold_frozen_weights_in(self, dtype: torch.dtype | None) -> None:
        """Hold every frozen parameter in `dtype` (None or float32: full precision again); see `FrozenWeights`.

        While weights are held in half precision, the parts run under autocast in that dtype wherever they are
        called (training step, sampling, image logging) and return float32; `state_dict()` returns the full-
        precision values. Lightning's `setup` applies `frozen_dtype`.
        """
        self.materialize()
        held = self.frozen_weights.hold(self, dtype)
        if held:
            rank_zero_info(f"frozen weights: {held / 1e6:.1f}M parameters held in {str(self.frozen_dtype)[6:]} "
                           f"({held * 2 / 1e9:.2f} GB less); checkpoints keep them at full precision")

    def frozen_autocast(self, device_type: str | None = None) -> contextlib.AbstractContextManager[Any]:
        """Autocast in `frozen_dtype` while frozen weights are held in it; else nothing."""
        return self.frozen_weights.autocast(device_type or self.device.type)

    def on_fit_start(self) -> None:
        if self.encoders_device is not None:
            self.place_encoders(self.encoders_device)

    def place_encoders(self, device: str | torch.device) -> None:
        """Move the text encoder and the VAE's encoding half (not its decoder, which image logging needs at
        speed) to `device`; encoding then runs there and its results come back to the model's device."""
        vae = self.first_stage_model
        for part in (self.text_encoder, getattr(vae, "encoder", None), getattr(vae, "quant_conv", None)):
            if part is not None:
                part.to(device)

    def setup(self, stage: str) -> None:
        self.materialize()
        if stage == "fit" and self.frozen_dtype is not None:
            self.hold_frozen_weights_in(self.frozen_dtype)

    # ----- loading and deferred initialisation ------------------------------------------------------------
    @classmethod
    def build_deferred(cls, **params: Any) -> LatentDiffusion:
        """Build without random weights (see `ldm.models.deferred`): loading a checkpoint then costs no
        initialisation, and a model used without loading gets its random weights on first use."""
        return build_deferred(cls, **params)

    def materialize(self) -> None:
        """Randomly initialise whatever a deferred build left uninitialised; a no-op afterwards."""
        if self.deferred.materialize(self):
            self.set_trainable_parts()

    def set_trainable_parts(self) -> None:
        """Freeze what must not train, and keep frozen weights (only those) in `frozen_dtype`."""
        self.freeze_parts()
        self.frozen_weights.sync(self)

    def freeze_parts(self) -> None:
        """The VAE and the text encoder never train."""
        _frozen(self.first_stage_model)
        _frozen(self.text_encoder)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """The weights, frozen ones at full precision even while held in `frozen_dtype`."""
        self.materialize()
        return self.frozen_weights.full_precision(super().state_dict(*args, **kwargs), kwargs.get("prefix", ""))

    def loadable(self, state_dict: Mapping[str, Any]) -> dict[str, Any]:
        """What of a checkpoint this model loads: not the EMA copies released files may carry, not buffers it derives
        itself (sgm's `denoiser.sigmas`; the schedule buffers, for a model whose checkpoints carry none)."""
        derived = IGNORED_KEYS if self.schedule_in_checkpoint else IGNORED_KEYS | set(SCHEDULE_BUFFERS)
        return {k: v for k, v in state_dict.items() if not k.startswith("model_ema.") and k not in derived}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load a checkpoint's weights (what `loadable` keeps of it). A misfit raises torch's `RuntimeError`
        (ControlLDM explains it in one line)."""
        state_dict = self.loadable(state_dict)
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.deferred.loaded(state_dict.keys())
        self.materialize()
        self.frozen_weights.update(state_dict)
        return result


def _device_of(module: nn.Module, default: torch.device) -> torch.device:
    """The device a module's weights are on (where its encoding runs)."""
    first = first_parameter(module)
    return default if first is None else first.device
