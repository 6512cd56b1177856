"""Generation with one ControlNet, ours vs diffusers: 20 DDIM steps at 256 px, classifier-free guidance, CPU.

Contenders (each in its own process, full SD1.5 size, random weights, fp32, batch 1, the same seed and
starting noise):

* `ours`: ControlLDM from models/cldm_v15.yaml sampled with `DDIMSampler` (batched CFG: conditional and
  unconditional halves in one forward pass), then VAE-decoded.
* `ours-window`: the same with the ControlNet applied only in the first half of the steps (progress in
  [0, 0.5)); afterwards the denoiser passes `c_concat: None`, so the ControlNet does not run at all.
* `diffusers`: `StableDiffusionControlNetPipeline` from same-sized random parts (DDIM scheduler with SD's
  config, no safety checker, nothing from the hub), `output_type="pt"`.
* `diffusers-window`: the pipeline with `control_guidance_end=0.5`, its own notion of the same window.

Reported: seconds per image (text encoding + 20 steps + VAE decode), median seconds per denoising step,
GFLOP per image and % of the fp32 matmul peak, peak RSS. FLOPs are counted on 2- and 4-step runs (which
double as warm-up) and extrapolated: F(20) = F(2) + 9 * (F(4) - F(2)), exact for both the plain and the
windowed schedules since each pair of steps holds one step of each half.

    .venv/bin/python -m benchmarks.bench_generate --contenders ours ours-window diffusers
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    CLEAN_CPU_SHARE,
    REPO_ROOT,
    best_peak,
    count_flops,
    finish_child,
    machine,
    markdown_table,
    run_rounds,
    start_parent,
    write_results,
)

PROMPT = "cornflower blue circle with dark salmon background"
GUIDANCE = 9.0
WINDOW_END = 0.5
#: generate(steps, on_step) -> image; on_step() is called after every denoising step.
Generate = Callable[[int, Callable[[], None]], torch.Tensor]


def circle_hint(size: int, seed: int) -> torch.Tensor:
    """A Fill50K-like control image: a white circle outline on black, [1, 3, H, W] in [0, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cy, cx, r = rng.integers(size // 4, 3 * size // 4, 2).tolist() + [size // 5]
    ring = np.abs(np.hypot(yy - cy, xx - cx) - r) < max(1.0, size / 128)
    return torch.from_numpy(np.repeat(ring[None, None].astype(np.float32), 3, axis=1))


def build_ours(window: bool, channels_last: bool, size: int, seed: int, config: str) -> Generate:
    from cldm.control import Control
    from cldm.model import create_model
    from ldm.models.diffusion.ddim import DDIMSampler

    model = create_model(config)
    model.materialize()
    model.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format)
    hint = circle_hint(size, seed).contiguous(memory_format=memory_format)
    x_T = torch.randn((1, model.channels, size // 8, size // 8), generator=torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def generate(steps: int, on_step: Callable[[], None]) -> torch.Tensor:
        context = model.get_learned_conditioning([PROMPT, ""])
        cond = {"c_concat": [hint], "c_crossattn": [context[:1]]}
        uncond = {"c_concat": [hint], "c_crossattn": [context[1:]]}
        if not window:
            samples, _ = DDIMSampler(model).sample(steps, 1, x_T.shape[1:], cond, eta=0.0, verbose=False,
                                                   x_T=x_T, unconditional_guidance_scale=GUIDANCE,
                                                   unconditional_conditioning=uncond,
                                                   callback=lambda i: on_step())
        else:  # the unit setting guidance_end: outside its window the ControlNet does not run at all
            control = Control(model.control_model, hint, guidance_end=WINDOW_END)
            samples = model.sample_latents(x_T, context[:1], [control], context[1:], GUIDANCE, steps=steps,
                                           callback=lambda i, x, x0: on_step())
        return model.decode_first_stage(samples)

    return generate


def build_diffusers(window: bool, channels_last: bool, size: int, seed: int, config: str) -> Generate:
    """The pipeline at SD1.5 size (`config` is ours only and ignored here)."""
    from diffusers import StableDiffusionControlNetPipeline

    from benchmarks import diffusers_sd

    parts = diffusers_sd.build(seed=0)
    if channels_last:
        parts.to_channels_last()
    pipe = StableDiffusionControlNetPipeline(
        vae=parts.vae, text_encoder=parts.text_encoder,
        tokenizer=diffusers_sd.clip_tokenizer(Path(tempfile.mkdtemp(prefix="clip_tok_"))),
        unet=parts.unet, controlnet=parts.controlnet, scheduler=diffusers_sd.ddim_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    hint = circle_hint(size, seed)
    x_T = torch.randn((1, 4, size // 8, size // 8), generator=torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def generate(steps: int, on_step: Callable[[], None]) -> torch.Tensor:
        def callback(pipeline: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            on_step()
            return kwargs

        return pipe(PROMPT, image=hint, height=size, width=size, num_inference_steps=steps,
                    guidance_scale=GUIDANCE, latents=x_T.clone(), output_type="pt",
                    control_guidance_end=WINDOW_END if window else 1.0,
                    callback_on_step_end=callback).images

    return generate


def child(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    base, *flags = args.child.split("+")
    impl, _, variant = base.partition("-")
    if impl not in ("ours", "diffusers") or variant not in ("", "window") or set(flags) - {"cl"}:
        raise SystemExit(f"unknown contender {args.child!r}")
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    generate = (build_ours if impl == "ours" else build_diffusers)(variant == "window", "cl" in flags,
                                                                   args.size, args.seed, args.config)
    build_s = time.perf_counter() - start
    result: dict[str, Any] = {"contender": args.child, "build_s": build_s, "size": args.size,
                              "steps": args.steps, "machine": machine()}

    def nothing() -> None:
        return None

    if args.count_flops:  # also the warm-up
        f2 = count_flops(lambda: generate(2, nothing))
        f4 = count_flops(lambda: generate(4, nothing))
        result["flops"] = f2 + (args.steps // 2 - 1) * (f4 - f2)
    else:
        generate(2, nothing)
    marks: list[float] = []
    begin, cpu_begin = time.perf_counter(), time.process_time()
    image = generate(args.steps, lambda: marks.append(time.perf_counter()))
    result["s_per_image"] = time.perf_counter() - begin
    result["cpu_s_per_image"] = time.process_time() - cpu_begin
    step_times = np.diff(marks).tolist()
    result["step_times_s"] = step_times
    result["median_step_s"] = statistics.median(step_times)
    if len(step_times) >= 4:  # the window's two halves separately (step i ends at marks[i])
        half = len(marks) // 2
        result["median_step_first_half_s"] = statistics.median(step_times[: half - 1])
        result["median_step_second_half_s"] = statistics.median(step_times[half - 1:])
    result["image_shape"] = list(image.shape)
    result["image_finite"] = bool(torch.isfinite(image).all())
    print(f"[{args.child}] {result['s_per_image']:.1f} s/image, median step {result['median_step_s']:.2f} s",
          file=sys.stderr, flush=True)
    finish_child(result)


def parent(args: argparse.Namespace) -> None:
    peak = start_parent(args.threads)
    common = ["--threads", str(torch.get_num_threads()), "--steps", str(args.steps), "--size", str(args.size),
              "--seed", str(args.seed), "--config", args.config]
    runs = run_rounds("benchmarks.bench_generate", args.contenders, args.rounds, common,
                      [] if args.no_flops else ["--count-flops"])
    peak = best_peak(peak, runs)
    threads = torch.get_num_threads()
    rows = []
    for name, results in runs.items():
        clean = [r for r in results if r["cpu_s_per_image"] >= CLEAN_CPU_SHARE * threads * r["s_per_image"]]
        seconds = statistics.median(r["s_per_image"] for r in clean or results)
        row: dict[str, Any] = {
            "contender": name, "s_per_image": seconds, "images_per_s": 1.0 / seconds,
            "clean_runs": f"{len(clean)}/{len(results)}",
            "cpu_s_per_image": statistics.median(r["cpu_s_per_image"] for r in results),
            "median_step_s": statistics.median(r["median_step_s"] for r in results),
            "peak_rss_gib": max(r["peak_rss_mib"] for r in results) / 1024.0, "runs": results,
        }
        if "flops" in results[0]:
            row["gflop_per_image"] = results[0]["flops"] / 1e9
            row["pct_peak"] = 100.0 * row["gflop_per_image"] / seconds / peak
        rows.append(row)
    by_name = {row["contender"]: row for row in rows}
    for row in rows:
        impl = row["contender"].split("-")[0].split("+")[0]
        reference = by_name.get("diffusers")
        if reference:
            row["speedup_vs_diffusers"] = reference["s_per_image"] / row["s_per_image"]
            row["cpu_speedup_vs_diffusers"] = reference["cpu_s_per_image"] / row["cpu_s_per_image"]
        plain = by_name.get(row["contender"].replace("-window", ""))
        if "-window" in row["contender"] and plain and plain is not row:
            row["window_saving_pct"] = 100.0 * (1.0 - row["s_per_image"] / plain["s_per_image"])
            row["window_saving_cpu_pct"] = 100.0 * (1.0 - row["cpu_s_per_image"] / plain["cpu_s_per_image"])
        row["impl"] = impl
    columns = [("contender", "contender"), ("s_per_image", "s/image"), ("images_per_s", "images/s"),
               ("clean_runs", "clean runs"), ("cpu_s_per_image", "CPU s/image"),
               ("median_step_s", "s/step (median)"), ("peak_rss_gib", "peak RSS GiB"),
               ("gflop_per_image", "GFLOP/image"), ("pct_peak", "% of peak"),
               ("speedup_vs_diffusers", "x diffusers"), ("cpu_speedup_vs_diffusers", "x diffusers (CPU s)"),
               ("window_saving_pct", "window saves %"), ("window_saving_cpu_pct", "window saves % (CPU s)")]
    table = markdown_table(rows, columns)
    print(f"\n{args.steps} DDIM steps, {args.size} px, CFG {GUIDANCE} (batched), fp32, "
          f"{torch.get_num_threads()} thread(s), matmul peak {peak:.1f} GFLOP/s\n\n{table}")
    write_results(args.out, peak, args, rows, table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contenders", nargs="+", default=["ours", "ours-window", "diffusers"])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in every process (default: torch's choice, one per core)")
    parser.add_argument("--no-flops", action="store_true")
    parser.add_argument("--config", default=str(REPO_ROOT / "models" / "cldm_v15.yaml"),
                        help="our model's config (smoke tests: models/cldm_tiny.yaml)")
    parser.add_argument("--out", help="write all results as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps % 2:
        parser.error("--steps must be even (the FLOP extrapolation pairs steps)")
    if args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
