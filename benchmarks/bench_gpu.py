"""GPU benchmarks: SD1.5 ControlNet training at 512 px in bf16-mixed, ours vs diffusers; memory; generation.
SDXL (`--family sdxl`): ControlNet training at 1024 px from cached latents and text, ours vs diffusers.

Run on a CUDA machine (nothing is downloaded; both contenders have random weights):

    python -m benchmarks.bench_gpu --out benchmarks/results/gpu.json
    python -m benchmarks.bench_gpu --family sdxl --size 1024 --out benchmarks/results/gpu_sdxl.json
    python -m benchmarks.bench_gpu --family sdxl --tiny --dry_run_cpu --child train --cached --impl diffusers

Each measurement runs in its own process, so `torch.cuda.max_memory_allocated` is its own. Training
contenders do diffusers' `train_controlnet.py --mixed_precision bf16` step: the frozen UNet, VAE and text
encoder held in bf16, the ControlNet in fp32 under bf16 autocast; VAE encode, text encode, noise, ControlNet,
UNet with residuals, MSE, backward, AdamW. Ours holds its frozen weights in bf16 the same way
(`hold_frozen_weights_in`, what `tutorial_train.py --precision bf16-mixed` does).

Reported: seconds per step (median of CUDA-synchronised steps after warm-up), samples/s, peak allocated
memory, FLOPs per step (FlopCounterMode) and their share of the measured bf16 matmul peak.

SDXL runs as diffusers' `train_controlnet_sdxl.py` trains (it precomputes the text embeddings) with the latents
cached too, as `tutorial_train.py --cache` does: each step is noise, ControlNet (10 residuals, `label_emb` of the
pooled text and the size embeddings), UNet, MSE, backward and the optimizer, in bf16 autocast with the frozen UNet
in bf16 and the ControlNet in fp32. The two networks are the same size in both (2,567,463,684 and 1,251,014,160
parameters, checked when built); `--tiny` takes the tiny SDXL config, to check the script on a CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import emit_result, run_child

CONFIG = "models/cldm_v15.yaml"
#: --family sdxl: our config, and diffusers' UNet (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json).
SDXL_CONFIG, SDXL_TINY_CONFIG = "models/cldm_xl.yaml", "models/cldm_xl_tiny.yaml"
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816, "norm_num_groups": 32, "act_fn": "silu",
}
#: models/cldm_xl_tiny.yaml's UNet in diffusers' terms (context 32, pooled text 24, size embeddings 6 x 8).
SDXL_TINY_UNET: dict[str, Any] = {
    **SDXL_UNET, "sample_size": 8, "block_out_channels": [32, 64, 64], "transformer_layers_per_block": [0, 1, 2],
    "attention_head_dim": [2, 4, 4], "cross_attention_dim": 32, "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 72,
}
#: The SDXL UNet's and ControlNet's parameter counts, in both contenders.
SDXL_PARAMETERS = [2_567_463_684, 1_251_014_160]
#: SDXL's VAE scale (sd_xl_base.yaml's scale_factor).
SDXL_LATENT_SCALE = 0.13025
PROMPT = "cornflower blue circle with dark salmon background"
GiB = 1024**3
Step = Callable[[dict[str, Any]], torch.Tensor]
#: "cuda"; `--dry_run_cpu` sets "cpu" to check the script's logic on a machine without a GPU (no figures).
DEVICE = "cuda"


def synchronize() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / GiB if DEVICE == "cuda" else float("nan")


def reset_peak() -> None:
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()


def bf16_peak_tflops(n: int = 8192, repeats: int = 10) -> float:
    """Median bf16 matmul TFLOP/s on random data: the ceiling the %-of-peak figures use."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n**3 / statistics.median(times) / 1e12


def make_batch(batch: int, size: int, cached: bool, seed: int = 0, family: str = "sd15", tiny: bool = False
               ) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    items: dict[str, Any] = {"hint": (torch.rand(batch, size, size, 3, generator=g) > 0.9).float(),
                             "txt": [PROMPT] * batch}
    if family == "sdxl":  # what training/cache.py hands an SDXL step: two-encoder text, pooled text and sizes
        if not cached:
            raise SystemExit("error: the SDXL benchmark trains from cached latents and text: add --cached")
        width, pooled = (32, 24) if tiny else (2048, 1280)
        items["context"] = {"crossattn": torch.randn(batch, 77, width, generator=g),
                            "vector": torch.randn(batch, pooled, generator=g)}
        sizes = torch.tensor([[float(size), float(size)]]).repeat(batch, 1)
        items.update({"original_size_as_tuple": sizes, "crop_coords_top_left": torch.zeros(batch, 2),
                      "target_size_as_tuple": sizes.clone()})
    elif cached:  # what training/cache.py hands the step: posterior moments and prompt embeddings
        items["context"] = torch.randn(batch, 77, 768, generator=g)
    if cached:
        items["latent_moments"] = torch.randn(batch, 8, size // 8, size // 8, generator=g)
    else:
        items["jpg"] = torch.rand(batch, size, size, 3, generator=g) * 2 - 1
    return items


# ----- ours --------------------------------------------------------------------------------------------------
def build_ours(checkpointing: bool, optimizer: str, cached: bool, channels_last: bool = False,
               compile_nets: bool = False, family: str = "sd15", tiny: bool = False) -> Step:
    from cldm.model import create_model
    from training.cache import cached_batch_encoder

    config = CONFIG if family == "sd15" else SDXL_TINY_CONFIG if tiny else SDXL_CONFIG
    model = create_model(config).to(DEVICE)
    with torch.device(DEVICE):
        model.materialize()
    for module in model.modules():
        if hasattr(module, "use_checkpoint"):
            module.use_checkpoint = checkpointing
    model.hold_frozen_weights_in(torch.bfloat16)
    if cached:  # as tutorial_train.py --cache: latents and text from the batch, encoders off the GPU
        model.batch_encoder = cached_batch_encoder
        model.place_encoders("cpu")
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile_nets:  # inductor over the two networks that run every step
        model.model.diffusion_model.compile()
        model.control_model.compile()
    if family == "sdxl" and not tiny:  # the same networks as diffusers', not merely alike
        sizes = [sum(p.numel() for p in net.parameters()) for net in (model.model.diffusion_model, model.control_model)]
        assert sizes == SDXL_PARAMETERS, sizes
    model.train()
    model.optimizer = optimizer
    opt = model.configure_optimizers()

    def step(batch: dict[str, Any]) -> torch.Tensor:
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            x, c = model.get_input(batch, model.first_stage_key)
            loss, _ = model(x, c)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


# ----- diffusers (examples/controlnet/train_controlnet.py, --mixed_precision bf16) ----------------------------
def build_diffusers(checkpointing: bool, optimizer: str, cached: bool, channels_last: bool = False,
                    compile_nets: bool = False, family: str = "sd15", tiny: bool = False) -> Step:
    if family == "sdxl":
        return build_diffusers_sdxl(checkpointing, optimizer, channels_last, compile_nets, tiny)
    from benchmarks import diffusers_sd

    with torch.device(DEVICE):
        parts = diffusers_sd.build(seed=0)
    weight_dtype = torch.bfloat16
    for net in (parts.unet, parts.vae, parts.text_encoder):
        net.requires_grad_(False)
        net.to(dtype=weight_dtype)
    if cached:
        parts.vae.encoder.to("cpu")
        parts.text_encoder.to("cpu")
    if channels_last:
        parts.to_channels_last()
    if compile_nets:
        parts.unet.compile()
        parts.controlnet.compile()
    parts.controlnet.train()
    if checkpointing:
        parts.controlnet.enable_gradient_checkpointing()
        parts.unet.enable_gradient_checkpointing()
    opt = diffusers_optimizer(optimizer, parts.controlnet.parameters())
    scheduler = diffusers_sd.ddpm_scheduler()
    tokenizer = diffusers_sd.clip_tokenizer(Path(tempfile.mkdtemp(prefix="clip_tok_")))

    def step(batch: dict[str, Any]) -> torch.Tensor:
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            if cached:
                moments = batch["latent_moments"].to(DEVICE)
                mean, logvar = moments.chunk(2, dim=1)
                latents = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * 0.18215
                hidden = batch["context"].to(DEVICE, weight_dtype)
            else:
                pixels = batch["jpg"].to(DEVICE).permute(0, 3, 1, 2).to(weight_dtype)
                latents = parts.vae.encode(pixels).latent_dist.sample() * parts.vae.config.scaling_factor
                ids = tokenizer(list(batch["txt"]), padding="max_length", max_length=77, truncation=True,
                                return_tensors="pt").input_ids.to(DEVICE)
                hidden = parts.text_encoder(ids, return_dict=False)[0]
            loss = diffusers_loss(parts.controlnet, parts.unet, scheduler, latents, hidden, batch["hint"])
        return optimizer_step(loss, opt)

    return step


def diffusers_loss(controlnet: Any, unet: Any, scheduler: Any, latents: torch.Tensor, hidden: torch.Tensor,
                   hint: torch.Tensor, added: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The examples' loss from latents and text (under autocast): noise at a random t, the ControlNet, the UNet
    with its residuals (in the frozen weights' bf16), MSE against the noise. `added`: SDXL's added_cond_kwargs."""
    weight_dtype = torch.bfloat16
    extra = {} if added is None else {"added_cond_kwargs": added}
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (latents.shape[0],), device=DEVICE).long()
    noisy = scheduler.add_noise(latents, noise, t)
    cond = hint.to(DEVICE).permute(0, 3, 1, 2).to(weight_dtype)
    down, mid = controlnet(noisy, t, encoder_hidden_states=hidden, controlnet_cond=cond, return_dict=False, **extra)
    pred = unet(noisy, t, encoder_hidden_states=hidden, down_block_additional_residuals=[r.to(weight_dtype)
                                                                                           for r in down],
                mid_block_additional_residual=mid.to(weight_dtype), return_dict=False, **extra)[0]
    return F.mse_loss(pred.float(), noise.float(), reduction="mean")


def optimizer_step(loss: torch.Tensor, opt: torch.optim.Optimizer) -> torch.Tensor:
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss


def diffusers_optimizer(optimizer: str, params: Any) -> torch.optim.Optimizer:
    if optimizer == "adamw8bit":  # the examples' --use_8bit_adam
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(params, lr=1e-5)
    # the examples' default: torch's AdamW with its default (foreach) implementation
    return torch.optim.AdamW(params, lr=1e-5, fused=optimizer == "adamw-fused" or None)


# ----- diffusers SDXL (examples/controlnet/train_controlnet_sdxl.py, --mixed_precision bf16) -----------------
def build_diffusers_sdxl(checkpointing: bool, optimizer: str, channels_last: bool, compile_nets: bool,
                         tiny: bool) -> Step:
    """The SDXL example's step from precomputed text embeddings and cached latents (see the module docstring)."""
    from diffusers import ControlNetModel, DDPMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    with torch.device(DEVICE):
        unet = UNet2DConditionModel(**(SDXL_TINY_UNET if tiny else SDXL_UNET))
        controlnet = ControlNetModel.from_unet(unet)
    if not tiny:  # the same networks as ours, not merely alike
        sizes = [sum(p.numel() for p in net.parameters()) for net in (unet, controlnet)]
        assert sizes == SDXL_PARAMETERS, sizes
    weight_dtype = torch.bfloat16
    unet.requires_grad_(False)
    unet.to(dtype=weight_dtype)
    if channels_last:
        for net in (unet, controlnet):
            net.to(memory_format=torch.channels_last)
    if compile_nets:
        unet.compile()
        controlnet.compile()
    controlnet.train()
    if checkpointing:
        controlnet.enable_gradient_checkpointing()
        unet.enable_gradient_checkpointing()
    opt = diffusers_optimizer(optimizer, controlnet.parameters())
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")

    def step(batch: dict[str, Any]) -> torch.Tensor:
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            mean, logvar = batch["latent_moments"].to(DEVICE).chunk(2, dim=1)
            latents = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * SDXL_LATENT_SCALE
            hidden = batch["context"]["crossattn"].to(DEVICE, weight_dtype)
            time_ids = torch.cat([batch[k] for k in ("original_size_as_tuple", "crop_coords_top_left",
                                                     "target_size_as_tuple")], dim=1).to(DEVICE)
            added = {"text_embeds": batch["context"]["vector"].to(DEVICE), "time_ids": time_ids}
            loss = diffusers_loss(controlnet, unet, scheduler, latents, hidden, batch["hint"], added)
        return optimizer_step(loss, opt)

    return step


BUILDERS = {"ours": build_ours, "diffusers": build_diffusers}


def timed_steps(step: Step, batch: dict[str, Any], warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step(batch)
    synchronize()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss = step(batch)
        loss.item()  # synchronises
        times.append(time.perf_counter() - start)
    return times


def train_child(args: argparse.Namespace) -> None:
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    step = BUILDERS[args.impl](args.checkpointing, args.optimizer, args.cached, args.channels_last, args.compile,
                               args.family, args.tiny)
    weights_gib = torch.cuda.memory_allocated() / GiB if DEVICE == "cuda" else float("nan")
    reset_peak()
    result: dict[str, Any] = {"impl": args.impl, "family": args.family, "batch": args.batch, "size": args.size,
                              "checkpointing": args.checkpointing, "optimizer": args.optimizer,
                              "cached": args.cached, "channels_last": args.channels_last,
                              "compile": args.compile, "weights_gib": weights_gib}
    if args.max_batch:
        result["max_batch"] = largest_batch(step, args)
        emit_result(result)
        return
    batch = make_batch(args.batch, args.size, args.cached, family=args.family, tiny=args.tiny)
    times = timed_steps(step, batch, args.warmup, args.steps)
    result["peak_gib"] = peak_gib()
    result["s_per_step"] = statistics.median(times)
    result["samples_per_s"] = args.batch / result["s_per_step"]
    if args.profile:
        write_profile(step, batch, Path(args.profile))
    if args.flops:
        counter = FlopCounterMode(display=False)
        with counter:
            step(batch)
        result["tflop_per_step"] = counter.get_total_flops() / 1e12
        result["achieved_tflops"] = result["tflop_per_step"] / result["s_per_step"]
    emit_result(result)


def write_profile(step: Step, batch: dict[str, Any], path: Path) -> None:
    """torch.profiler's table of one step's CUDA kernels, by total GPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(batch).item()
    path.write_text(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70))


def largest_batch(step: Step, args: argparse.Namespace) -> dict[str, Any]:
    """The largest batch among `args.max_batch` sizes that trains two steps without running out of memory."""
    best: dict[str, Any] = {}
    for size in args.max_batch:
        try:
            times = timed_steps(step, make_batch(size, args.size, args.cached, family=args.family, tiny=args.tiny),
                                1, 1)
        except torch.OutOfMemoryError:
            break
        best = {"batch": size, "s_per_step": times[0], "peak_gib": peak_gib()}
        print(f"batch {size}: {times[0]:.2f} s, peak {best['peak_gib']:.1f} GiB", flush=True)
    gc.collect()
    torch.cuda.empty_cache()
    return best


# ----- generation -------------------------------------------------------------------------------------------
def generate_child(args: argparse.Namespace) -> None:
    """20 DDIM steps, CFG 9, one ControlNet at `size`, fp16 weights, ours vs diffusers' pipeline."""
    from benchmarks.bench_generate import circle_hint

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    dtype = torch.float16 if DEVICE == "cuda" else torch.bfloat16
    hint = circle_hint(args.size, 0).to(DEVICE)
    x_t = torch.randn((1, 4, args.size // 8, args.size // 8), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    if args.impl == "ours":
        from cldm.model import create_model
        from ldm.models.diffusion.ddim import DDIMSampler

        model = create_model(CONFIG).to(DEVICE)
        with torch.device(DEVICE):
            model.materialize()
        for net in (model.model, model.control_model, model.first_stage_model, model.cond_stage_model):
            net.to(dtype)  # the networks only: the noise schedule stays in fp32
        model.eval()

        @torch.no_grad()
        def generate() -> torch.Tensor:  # no autocast: the networks take their inputs in their own dtype
            context = model.get_learned_conditioning([PROMPT, ""])
            cond = {"c_concat": [hint], "c_crossattn": [context[:1]]}
            uncond = {"c_concat": [hint], "c_crossattn": [context[1:]]}
            samples, _ = DDIMSampler(model).sample(args.steps, 1, x_t.shape[1:], cond, eta=0.0, verbose=False,
                                                   x_T=x_t, unconditional_guidance_scale=9.0,
                                                   unconditional_conditioning=uncond)
            return model.decode_first_stage(samples)
    else:
        from diffusers import StableDiffusionControlNetPipeline

        from benchmarks import diffusers_sd

        with torch.device(DEVICE):
            parts = diffusers_sd.build(seed=0)
        pipe = StableDiffusionControlNetPipeline(
            vae=parts.vae, text_encoder=parts.text_encoder,
            tokenizer=diffusers_sd.clip_tokenizer(Path(tempfile.mkdtemp(prefix="clip_tok_"))),
            unet=parts.unet, controlnet=parts.controlnet, scheduler=diffusers_sd.ddim_scheduler(),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False).to(DEVICE, dtype)
        pipe.set_progress_bar_config(disable=True)

        @torch.no_grad()
        def generate() -> torch.Tensor:
            return pipe(PROMPT, image=hint.to(dtype), height=args.size, width=args.size,
                        num_inference_steps=args.steps, guidance_scale=9.0, latents=x_t.to(dtype),
                        output_type="pt").images

    generate()
    reset_peak()
    times = []
    for _ in range(args.repeats):
        synchronize()
        start = time.perf_counter()
        image = generate()
        synchronize()
        times.append(time.perf_counter() - start)
    assert torch.isfinite(image.float()).all()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            generate()
            synchronize()
        Path(args.profile).write_text(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40,
                                                                max_name_column_width=70))
    emit_result({"impl": args.impl, "size": args.size, "steps": args.steps, "s_per_image": statistics.median(times),
                 "peak_gib": peak_gib()})


# ----- parent -----------------------------------------------------------------------------------------------
def plan(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    if args.family == "sdxl":
        return sdxl_plan(args)
    size, b = str(args.size), str(args.batch)
    runs = []
    for impl, opt in (("ours", "adamw"), ("diffusers", "adamw"), ("diffusers", "adamw-fused")):
        for ckpt in ([], ["--checkpointing"]):
            runs.append((f"train {impl} {opt} b{b}{' ckpt' if ckpt else ''}",
                         ["--child", "train", "--impl", impl, "--optimizer", opt, "--batch", b, "--size", size,
                          "--flops", *ckpt]))
    for impl in ("ours", "diffusers"):
        for opt in ("adamw", "adamw8bit"):
            runs.append((f"lowmem {impl} {opt} b1 cached ckpt",
                         ["--child", "train", "--impl", impl, "--optimizer", opt, "--batch", "1", "--size", size,
                          "--cached", "--checkpointing", "--steps", "3"]))
        runs.append((f"maxbatch {impl} ckpt", ["--child", "train", "--impl", impl, "--size", size,
                                               "--checkpointing", "--max_batch", "8", "16", "32", "48", "64",
                                               "96", "128"]))
    for impl in ("ours", "diffusers"):
        runs.append((f"train {impl} adamw b16", ["--child", "train", "--impl", impl, "--batch", "16", "--size", size,
                                                 "--flops", "--steps", "6"]))
        for option in ("--channels_last", "--compile"):
            runs.append((f"train {impl} adamw b{b} {option[2:]}",
                         ["--child", "train", "--impl", impl, "--batch", b, "--size", size, "--flops", option]))
    runs.append(("profile ours b4", ["--child", "train", "--impl", "ours", "--batch", b, "--size", size,
                                     "--steps", "3", "--profile", str(Path(args.out or ".").parent / "profile.txt")]))
    for impl in ("ours", "diffusers"):
        runs.append((f"generate {impl}", ["--child", "generate", "--impl", impl, "--size", size]))
    return [r for r in runs if not args.only or any(word in r[0] for word in args.only)]


def sdxl_plan(args: argparse.Namespace) -> list[tuple[str, list[str]]]:
    """SDXL at `--size` (1024): batch 1 in the least memory, a larger batch for speed, the largest batch."""
    common = ["--child", "train", "--family", "sdxl", "--size", str(args.size), "--cached", "--checkpointing"]
    runs = []
    # ours' adamw is torch's fused AdamW; diffusers' example uses the default (foreach): both kernels for diffusers
    for impl, opts in (("ours", ("adamw8bit", "adamw")), ("diffusers", ("adamw8bit", "adamw", "adamw-fused"))):
        for opt in opts:
            runs.append((f"sdxl lowmem {impl} {opt} b1 cached ckpt",
                         [*common, "--impl", impl, "--optimizer", opt, "--batch", "1", "--steps", "5"]))
        runs.append((f"sdxl train {impl} {opts[-1]} b{args.batch} cached ckpt",
                     [*common, "--impl", impl, "--optimizer", opts[-1], "--batch", str(args.batch), "--steps", "5",
                      "--flops"]))
    for impl, opt in (("ours", "adamw"), ("diffusers", "adamw-fused")):  # both fused
        runs.append((f"sdxl maxbatch {impl} {opt} cached ckpt", [*common, "--impl", impl, "--optimizer", opt,
                                                                 "--max_batch", "8", "16", "24", "32", "48"]))
    return [r for r in runs if not args.only or any(word in r[0] for word in args.only)]


def parent(args: argparse.Namespace) -> None:
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                               "bf16_peak_tflops": bf16_peak_tflops(), "runs": {}}
    print(f"{results['device']}: bf16 matmul {results['bf16_peak_tflops']:.0f} TFLOP/s", flush=True)
    for name, child_args in plan(args):
        try:
            results["runs"][name] = run_child("benchmarks.bench_gpu", child_args, timeout_s=900)
        except RuntimeError as err:
            results["runs"][name] = {"error": str(err)}
        print(name, json.dumps(results["runs"][name]), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=1))
    peak = results["bf16_peak_tflops"]
    for name, r in results["runs"].items():
        extra = f", {100 * r['achieved_tflops'] / peak:.0f}% of bf16 peak" if "achieved_tflops" in r else ""
        print(f"{name}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                      for k, v in r.items()) + extra)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", choices=["train", "generate"])
    p.add_argument("--impl", choices=list(BUILDERS), default="ours")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "adamw-fused", "adamw8bit"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--size", type=int, default=None, help="pixels (default 512; SDXL 1024)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3, help="generation: timed images")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--cached", action="store_true", help="train from cached latents/text, encoders on the CPU")
    p.add_argument("--flops", action="store_true")
    p.add_argument("--channels_last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet and the ControlNet")
    p.add_argument("--profile", help="child: write a torch.profiler table of one step here")
    p.add_argument("--max_batch", type=int, nargs="*", default=None)
    p.add_argument("--only", nargs="*", help="parent: run only plans whose name contains one of these words")
    p.add_argument("--out", help="parent: write results as JSON here")
    p.add_argument("--dry_run_cpu", action="store_true", help="child: run on the CPU to check the script only")
    p.add_argument("--family", choices=["sd15", "sdxl"], default="sd15")
    p.add_argument("--tiny", action="store_true", help="sdxl: the tiny config (to check the script on a CPU)")
    args = p.parse_args(argv)
    args.size = args.size or (1024 if args.family == "sdxl" else 512)
    global DEVICE
    if args.dry_run_cpu:
        DEVICE = "cpu"
    elif not torch.cuda.is_available():
        sys.exit("error: bench_gpu needs a CUDA GPU (--dry_run_cpu checks the script without one)")
    if args.child == "train":
        train_child(args)
    elif args.child == "generate":
        args.steps = 20 if args.steps == 10 else args.steps
        generate_child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
