"""What control adds to Stable Diffusion: the ControlNet, the UNet that takes its residuals, ControlLDM."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from cldm.checkpoint import CheckpointMismatchError, explain_mismatch
from cldm.control import GUESS_MODE_DECAY, Control, ControlReward, UNetWithControls, guess_mode_scales
from ldm.errors import InputError
from ldm.models.diffusion import sampling
from ldm.models.diffusion.conditioning import Context, cat_conditions, rows_of
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.models.diffusion.guidance import ClassifierFreeGuidance
from ldm.models.diffusion.sampling import StepCallback
from ldm.modules.diffusionmodules.openaimodel import (
    EmbedsTimesteps,
    TimestepEmbedSequential,
    UNetEncoderSpec,
    UNetModel,
)
from ldm.modules.diffusionmodules.util import as_input_for, conv_nd, zero_module
from ldm.modules.encoders.conditioner import sizes_of
from ldm.util import instantiate_from_config, log_txt_as_img

__all__ = ["GUESS_MODE_DECAY", "OPTIMIZERS", "ControlLDM", "ControlNet", "ControlledUnetModel", "guess_mode_scales"]


class ControlledUnetModel(UNetModel):
    """The locked SD UNet: control residuals are added to its skip connections and middle output.

    The encoder and middle block run without autograd: they are never trained (with `sd_locked=False` the
    original unlocks only the decoder and output), so storing their activations would be wasted memory.
    """

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                control: list[torch.Tensor] | None = None, only_mid_control: bool = False,
                y: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        with torch.no_grad():
            h, skips, emb = self.encode(x, timesteps, context, y)
        if control is None:
            return self.decode(h, skips, emb, context)
        if len(control) != len(skips) + 1:
            raise ValueError(f"expected {len(skips) + 1} control residuals, got {len(control)}")
        h = h + control[-1]
        if not only_mid_control:
            skips = [skip + residual for skip, residual in zip(skips, control[:-1])]
        return self.decode(h, skips, emb, context)


class ControlNet(EmbedsTimesteps):
    """A trainable copy of the UNet encoder that reads a control image and returns its residuals (13 for SD1.x/2.x,
    10 for SDXL: one per input block and the middle block's).

    The hint goes through a small conv stack down to latent size (`input_hint_block`) and is added after
    the first input block; every skip feature and the middle output leave through a zero-initialised
    1x1 conv, so a fresh ControlNet changes nothing.
    """

    def __init__(self, image_size: int | None = None, *, in_channels: int, model_channels: int,
                 hint_channels: int, num_res_blocks: int | Sequence[int], attention_resolutions: Sequence[int],
                 use_fp16: bool = False, use_bf16: bool = False,
                 use_new_attention_order: bool = False, spatial_transformer_attn_type: str | None = None,
                 hint_block_widths: Sequence[int] = (16, 32, 96, 256), hint_downsample: int = 8,
                 **spec_params: Any) -> None:
        super().__init__()
        self.spec = UNetEncoderSpec.from_params(in_channels=in_channels, model_channels=model_channels,
                                                num_res_blocks=num_res_blocks,
                                                attention_resolutions=attention_resolutions, **spec_params)
        self.model_channels = model_channels
        #: The hint block's shape, for exporting to other layouts (see `cldm.formats`).
        self.hint_channels, self.hint_block_widths, self.hint_downsample = hint_channels, tuple(hint_block_widths), \
            hint_downsample
        self.time_embed = self.spec.time_embedding()
        self.label_emb = self.spec.vector_embedding()
        self.input_hint_block = self._hint_block(hint_channels, model_channels, self.spec.dims,
                                                 hint_block_widths, hint_downsample)
        self.input_blocks, self.middle_block, skip_channels = self.spec.build_encoder()
        self.zero_convs = nn.ModuleList(self._zero_conv(ch) for ch in skip_channels)
        self.middle_block_out = self._zero_conv(skip_channels[-1])

    @staticmethod
    def _hint_block(hint_channels: int, model_channels: int, dims: int, widths: Sequence[int],
                    downsample: int) -> TimestepEmbedSequential:
        """Convs from image to latent resolution, two per width; the last conv starts at zero.

        The released models use widths 16/32/96/256 and downsample 8x (the VAE's factor); a pixel-space
        model (`IdentityFirstStage`) uses `hint_downsample=1`. Key names do not depend on either.
        """
        halvings = {1: 0, 2: 1, 4: 2, 8: 3}.get(downsample)
        if halvings is None or halvings > len(widths) - 1:
            raise InputError(f"hint_downsample must be 1, 2, 4 or 8 (at most 2**{len(widths) - 1}), got {downsample}")
        layers: list[nn.Module] = [conv_nd(dims, hint_channels, widths[0], 3, padding=1), nn.SiLU()]
        for stage, (c_in, c_out) in enumerate(zip(widths[:-1], widths[1:])):
            stride = 2 if stage >= len(widths) - 1 - halvings else 1
            layers += [conv_nd(dims, c_in, c_in, 3, padding=1), nn.SiLU(),
                       conv_nd(dims, c_in, c_out, 3, padding=1, stride=stride), nn.SiLU()]
        layers.append(zero_module(conv_nd(dims, widths[-1], model_channels, 3, padding=1)))
        return TimestepEmbedSequential(*layers)

    def _zero_conv(self, channels: int) -> TimestepEmbedSequential:
        return TimestepEmbedSequential(zero_module(conv_nd(self.spec.dims, channels, channels, 1, padding=0)))

    @property
    def num_residuals(self) -> int:
        return len(self.zero_convs) + 1

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor,
                context: torch.Tensor | None, y: torch.Tensor | None = None, **kwargs: Any) -> list[torch.Tensor]:
        emb = self.embed(timesteps, y, x.dtype)
        guided_hint = self.input_hint_block(hint, emb, context)
        residuals = []
        h = x
        for index, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if index == 0:
                h = h + guided_hint
            residuals.append(zero_conv(h, emb, context))
        h = self.middle_block(h, emb, context)
        residuals.append(self.middle_block_out(h, emb, context))
        return residuals


OPTIMIZERS = ("adamw", "adamw8bit")


def adamw_8bit(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit, with one-line errors where it cannot run (it is an optional, GPU-only extra)."""
    devices = {p.device.type for p in params}
    if devices != {"cuda"}:
        raise InputError(f"8-bit AdamW (bitsandbytes) runs on CUDA GPUs only, these parameters are on "
                         f"{', '.join(sorted(devices))}: use the optimizer adamw")
    try:
        import bitsandbytes
    except ImportError:
        raise ImportError("8-bit AdamW needs bitsandbytes: pip install bitsandbytes (CUDA only)") from None
    return bitsandbytes.optim.AdamW8bit(params, lr=lr)


class ControlLDM(LatentDiffusion):
    """Stable Diffusion with a ControlNet: the Lightning module that trains and samples.

    `cond` dicts are `{'c_crossattn': [text embedding], 'c_concat': [hint in [0, 1], NCHW]}`;
    `c_concat: None` runs the plain UNet. SDXL's vector goes in as `'y': [vector]` (or the whole
    `get_learned_conditioning` output stands in `c_crossattn`). `control_scales` multiplies residual i (the
    original's guess mode and control weight set it) on every path that runs the model. With `sd_locked` only the
    ControlNet trains; otherwise the UNet decoder and output layer train too.
    """

    def __init__(self, control_stage_config: Any, control_key: str, only_mid_control: bool,
                 *args: Any, sd_locked: bool = True, learning_rate: float = 1e-5, optimizer: str = "adamw",
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.control_model: ControlNet = instantiate_from_config(control_stage_config)
        self.part_configs["control_model"] = control_stage_config
        self.control_key = control_key
        self.only_mid_control = only_mid_control
        self.control_scales = [1.0] * self.control_model.num_residuals
        self.learning_rate = learning_rate
        self.optimizer = optimizer
        #: An optional consistency reward on the control (see `ControlReward`); training scripts set it.
        self.reward: ControlReward | None = None
        self.sd_locked = sd_locked

    @property
    def sd_locked(self) -> bool:
        return self._sd_locked

    @sd_locked.setter
    def sd_locked(self, locked: bool) -> None:
        self._sd_locked = locked
        self.set_trainable_parts()

    def freeze_parts(self) -> None:
        """Freeze the UNet (or all but its decoder) so that a locked SD never takes a gradient."""
        super().freeze_parts()
        unet = self.model.diffusion_model
        unet.requires_grad_(False)
        if not self._sd_locked:
            unet.output_blocks.requires_grad_(True)
            unet.out.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        params = list(self.control_model.parameters())
        if not self.sd_locked:
            unet = self.model.diffusion_model
            params += list(unet.output_blocks.parameters()) + list(unet.out.parameters())
        return params

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the trainable parameters: `optimizer` `adamw` (fused where the device has the kernel) or
        `adamw8bit` (bitsandbytes, CUDA only: 2 bytes of state per parameter instead of 8, 2.6 GB less for an
        SD1.5 ControlNet)."""
        self.materialize()
        params = self.trainable_parameters()
        if self.optimizer == "adamw8bit":
            return adamw_8bit(params, self.learning_rate)
        if self.optimizer != "adamw":
            raise InputError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        # The fused kernel is one call for all tensors instead of a Python loop over each: 3.4 s -> 0.25 s
        # of a CPU SD1.5 step (docs/BENCHMARKS.md).
        fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
        return torch.optim.AdamW(params, lr=self.learning_rate, fused=fused or None)

    def compile_networks(self, **options: Any) -> None:
        """torch.compile the UNet and the ControlNet in place, so state-dict names stay as they are.

        Pays on a GPU, where an eager step is bound by kernel launches: 0.201 -> 0.155 s per SD1.5 step at
        512 px, batch 4 on an H100 (docs/BENCHMARKS.md), after a minute or two of compiling. On a small CPU
        the compilation itself takes many minutes.
        """
        self.materialize()
        self.model.diffusion_model.compile(**options)
        self.control_model.compile(**options)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load a checkpoint's weights; a checkpoint that does not fit is explained in one line (any other failure,
        out of memory say, is left as it is)."""
        try:
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        except RuntimeError as err:
            reason = explain_mismatch(self, state_dict)
            if reason is None:
                raise
            raise CheckpointMismatchError(reason) from err

    @torch.no_grad()
    def get_input(self, batch: dict[str, Any], k: str, bs: int | None = None, *args: Any, **kwargs: Any
                  ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        x, c = super().get_input(batch, self.first_stage_key, *args, bs=bs, **kwargs)
        control = batch[self.control_key]
        if bs is not None:
            control = control[:bs]
        control = control.to(self.device).permute(0, 3, 1, 2).contiguous().float()
        if isinstance(c, Mapping):  # SDXL: the vector conditioning travels as `y`
            return x, dict(c_crossattn=[c["crossattn"]], c_concat=[control], y=[c["vector"]])
        return x, dict(c_crossattn=[c], c_concat=[control])

    def extra_losses(self, x_start: torch.Tensor, x_noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, Any],
                     model_output: torch.Tensor, prefix: str) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """The control reward on the steps' low-noise samples (the decode runs on those rows only)."""
        reward = self.reward
        hints = cond.get("c_concat")
        if reward is None or not reward.weight or hints is None:
            return None, {}
        rows = t < reward.max_timestep
        if not bool(rows.any()):
            return None, {}
        schedule, x_t, out = self.schedule, x_noisy[rows], model_output[rows]
        x0 = schedule.x0_from_v(x_t, t[rows], out) if self.parameterization == "v" else \
            schedule.x0_from_eps(x_t, t[rows], out) if self.parameterization == "eps" else out
        vae = self.first_stage_model
        with self.frozen_autocast():
            images = vae.decode(as_input_for(vae, x0 / self.scale_factor)).float()
            with torch.no_grad():
                targets = vae.decode(as_input_for(vae, x_start[rows] / self.scale_factor)).float()
        scores = reward.measure(images, torch.cat(hints, 1)[rows], targets)
        loss = reward.weight * (1.0 - scores).mean()
        return loss, {f"{prefix}/reward_score": scores.mean().detach(), f"{prefix}/loss_reward": loss.detach()}

    # ----- the one denoising path ------------------------------------------------------------------------
    def controlled_unet(self, controls: Sequence[Control] = ()) -> UNetWithControls:
        """The UNet steered by `controls`, with this model's `control_scales`, `only_mid_control` and frozen-weight
        autocast: every path that runs the model (loss, `apply_model`, logging, fidelity, the pipeline) is this."""
        self.materialize()
        return UNetWithControls(self.model.diffusion_model, controls, only_mid_control=self.only_mid_control,
                                residual_scales=self.control_scales, autocast=self.frozen_autocast)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: dict[str, Any], *args: Any,
                    **kwargs: Any) -> torch.Tensor:
        """The original's entry: the model output for `cond`'s text and hint (`c_concat: None`: no control)."""
        self.materialize()  # before `self.control_model` is read: a deferred build replaces it
        hints = cond.get("c_concat")
        controls = [] if hints is None else [Control(self.control_model, torch.cat(hints, 1))]
        return self.controlled_unet(controls)(x_noisy, t, cat_conditions(cond["c_crossattn"], cond.get("y")))

    @torch.no_grad()
    def sample_latents(self, noise: torch.Tensor, context: Context, controls: Sequence[Control] = (),
                       uncond_context: Context | None = None, guidance_scale: float = 1.0, *,
                       sampler: str = "ddim", steps: int = 20, eta: float = 0.0,
                       generator: torch.Generator | None = None, batched_guidance: bool = True,
                       callback: StepCallback | None = None, progress: bool = False) -> torch.Tensor:
        """Latents sampled from `noise` under classifier-free guidance, steered by `controls`.

        `context`/`uncond_context` are the prompt's and the negative prompt's embeddings, batched like `noise`;
        `callback(i, x, x0)` sees each step.
        """
        guided = ClassifierFreeGuidance(self.controlled_unet(controls), context, uncond_context, guidance_scale,
                                        batched=batched_guidance)
        return sampling.sample(guided, noise, alphas_cumprod=self.alphas_cumprod,
                               parameterization=self.parameterization, sampler=sampler, steps=steps, eta=eta,
                               generator=generator, callback=callback, progress=progress)

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], N: int = 4, n_row: int = 2, sample: bool = True,
                   ddim_steps: int = 50, ddim_eta: float = 0.0, unconditional_guidance_scale: float = 9.0,
                   sample_batch_size: int | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Control, reconstruction, prompt and guided samples of the first N items, all in [-1, 1].

        Samples are drawn `sample_batch_size` at a time (all at once by default): smaller chunks bound the
        memory that logging adds on top of training. The unconditional half keeps the hint, as the original's.
        """
        z, c = self.get_input(batch, self.first_stage_key, bs=N)
        hint, text = c["c_concat"][0], cat_conditions(c["c_crossattn"], c.get("y"))
        n = z.shape[0]
        log = {
            "reconstruction": self.decode_first_stage(z),
            "control": hint * 2.0 - 1.0,
            "conditioning": log_txt_as_img((hint.shape[3], hint.shape[2]), list(batch[self.cond_stage_key][:n]),
                                           size=max(8, hint.shape[2] // 20)).to(z.device),
        }
        if sample:
            chunk = sample_batch_size or n
            sizes = sizes_of(batch, n, *batch[self.first_stage_key].shape[1:3]) if self.has_conditioner else None
            uncond_text = self.get_unconditional_conditioning(n, sizes)
            samples = []
            for start in range(0, n, chunk):
                part = slice(start, start + chunk)
                noise = torch.randn((hint[part].shape[0], *z.shape[1:]), device=z.device)
                latents = self.sample_latents(noise, rows_of(text, part),
                                              [Control(self.control_model, hint[part])],
                                              rows_of(uncond_text, part),
                                              unconditional_guidance_scale, steps=ddim_steps, eta=ddim_eta)
                samples.append(self.decode_first_stage(latents))
            log[f"samples_cfg_scale_{unconditional_guidance_scale:.2f}"] = torch.cat(samples)
        return log
