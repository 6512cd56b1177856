"""ControlNet training step, ours vs diffusers, full SD1.5 size with random weights, on whatever CPU this is.

Both contenders do what one optimisation step of ControlNet training does (diffusers' contender follows
examples/controlnet/train_controlnet.py): VAE-encode the target and sample the posterior, encode the prompt,
draw t and the noise, run the ControlNet and the UNet with its residuals, MSE against the noise, backward,
AdamW on the ControlNet only (UNet, VAE and text encoder frozen, requires_grad False). fp32, batch 1,
256 px, the same seed. Each contender runs in its own process, so peak RSS is its own.

Two modes:

* `--mode step` (default): the step on one fixed batch; median seconds per step after warm-up, a phase
  breakdown (encode / forward / backward / optimizer), FLOPs per step (FlopCounterMode) and % of the
  measured fp32 matmul peak.
* `--mode loop`: the end-to-end loop over a small Fill50K (generated at 256 px with
  training/make_fill50k.py) through a DataLoader: ours uncached, ours with `training/cache.py` (the one-off
  cache build is timed separately) and diffusers.

Contenders are named `ours`, `ours-cached` (loop mode only) or `diffusers`, with optional suffixes:
`+cl` (channels_last memory format), `+fused` (AdamW(fused=True)), `+ckpt` / `+nockpt` (gradient
checkpointing in both the UNet and the ControlNet, or in neither; default: `--checkpointing`), `+ckptall`
(ours: checkpoint every block, also those the CPU policy of `ldm.modules.diffusionmodules.util.checkpoint`
skips because their activations are small).

Examples::

    .venv/bin/python -m benchmarks.bench_train_step --contenders ours diffusers --rounds 2
    .venv/bin/python -m benchmarks.bench_train_step --mode loop --steps 6 \\
        --contenders ours ours-cached diffusers
    .venv/bin/python -m benchmarks.bench_train_step --child ours --profile /tmp/ours.txt
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.common import (
    CLEAN_CPU_SHARE,
    REPO_ROOT,
    best_peak,
    clean_times,
    count_flops,
    finish_child,
    machine,
    markdown_table,
    run_rounds,
    start_parent,
    summarize,
    write_results,
)

PROMPT = "cornflower blue circle with dark salmon background"
Batch = dict[str, Any]
#: A step takes a batch and returns the seconds spent in each phase.
Step = Callable[[Batch], dict[str, float]]


@dataclass(frozen=True)
class Contender:
    """A parsed contender name: implementation, cache, channels_last, checkpointing."""

    impl: str
    cached: bool
    channels_last: bool
    checkpointing: bool
    fused_adamw: bool
    checkpoint_all: bool

    @classmethod
    def parse(cls, name: str, default_checkpointing: bool) -> Contender:
        base, *flags = name.split("+")
        unknown = set(flags) - {"cl", "ckpt", "ckptall", "nockpt", "fused"}
        if base not in ("ours", "ours-cached", "diffusers") or unknown:
            raise ValueError(f"unknown contender {name!r}")
        checkpointing = default_checkpointing
        if {"ckpt", "ckptall", "nockpt"} & set(flags):
            checkpointing = "nockpt" not in flags
        return cls("diffusers" if base == "diffusers" else "ours", base == "ours-cached", "cl" in flags,
                   checkpointing, "fused" in flags, "ckptall" in flags)

    @property
    def label(self) -> str:
        name = "ours" + (" cached" if self.cached else "") if self.impl == "ours" else "diffusers"
        return name + (" +channels_last" if self.channels_last else "") + (
            " +fused AdamW" if self.fused_adamw else "") + (
            (" +ckpt all blocks" if self.checkpoint_all else " +ckpt") if self.checkpointing else " no-ckpt")


class PhaseClock:
    """Seconds between successive marks, by phase name."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self._last
        self._last = now


def random_batch(size: int, seed: int) -> Batch:
    """One ControlDataset-shaped item batch: target HWC in [-1, 1], hint HWC in [0, 1], prompt."""
    rng = np.random.default_rng(seed)
    return {
        "jpg": torch.from_numpy(rng.uniform(-1, 1, (1, size, size, 3)).astype(np.float32)),
        "hint": torch.from_numpy((rng.random((1, size, size, 3)) > 0.9).astype(np.float32)),
        "txt": [PROMPT],
    }


# ----- ours ------------------------------------------------------------------------------------------------
def build_ours(contender: Contender, config: str) -> tuple[Any, Step]:
    from cldm.model import create_model

    model = create_model(config)
    model.materialize()
    for module in model.modules():
        if hasattr(module, "use_checkpoint"):
            module.use_checkpoint = contender.checkpointing
        if contender.checkpoint_all and hasattr(module, "checkpoint_cpu_min_elements"):
            module.checkpoint_cpu_min_elements = 0  # every block, as diffusers does, not only the large ones
    if contender.channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = model.configure_optimizers()
    if contender.fused_adamw:  # one kernel per tensor instead of ~8 passes over memory (see README)
        optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=model.learning_rate, fused=True)

    def step(batch: Batch) -> dict[str, float]:
        clock = PhaseClock()
        x, c = model.get_input(batch, model.first_stage_key)
        clock.mark("encode")
        loss, _ = model(x, c)
        clock.mark("forward")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clock.mark("backward")
        optimizer.step()
        clock.mark("optimizer")
        return clock.phases

    return model, step


# ----- diffusers -------------------------------------------------------------------------------------------
def build_diffusers(contender: Contender, config: str) -> tuple[Any, Step]:
    """diffusers' parts at SD1.5 size (`config` is ours only and ignored here)."""
    from benchmarks import diffusers_sd

    parts = diffusers_sd.build(seed=0)
    for net in (parts.unet, parts.vae, parts.text_encoder):
        net.requires_grad_(False)
    parts.controlnet.train()
    if contender.checkpointing:  # both networks, like use_checkpoint: True in models/cldm_v15.yaml
        parts.controlnet.enable_gradient_checkpointing()
        parts.unet.enable_gradient_checkpointing()
    if contender.channels_last:
        parts.to_channels_last()
    scheduler = diffusers_sd.ddpm_scheduler()
    # The example's defaults otherwise (it sets no `fused`, so the per-tensor loop runs on CPU).
    optimizer = torch.optim.AdamW(parts.controlnet.parameters(), lr=1e-5, fused=contender.fused_adamw or None)
    tokenizer = diffusers_sd.clip_tokenizer(Path(tempfile.mkdtemp(prefix="clip_tok_")))
    memory_format = torch.channels_last if contender.channels_last else torch.contiguous_format

    def step(batch: Batch) -> dict[str, float]:
        clock = PhaseClock()
        pixel_values = batch["jpg"].permute(0, 3, 1, 2).contiguous(memory_format=memory_format)
        cond = batch["hint"].permute(0, 3, 1, 2).contiguous(memory_format=memory_format)
        input_ids = batch.get("input_ids")
        if input_ids is None:  # the example tokenizes in its data pipeline
            input_ids = tokenizer(list(batch["txt"]), padding="max_length", max_length=77, truncation=True,
                                  return_tensors="pt").input_ids
        latents = parts.vae.encode(pixel_values).latent_dist.sample() * parts.vae.config.scaling_factor
        encoder_hidden_states = parts.text_encoder(input_ids, return_dict=False)[0]
        clock.mark("encode")
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],)).long()
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        down, mid = parts.controlnet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                                     controlnet_cond=cond, return_dict=False)
        model_pred = parts.unet(noisy_latents, timesteps, encoder_hidden_states=encoder_hidden_states,
                                down_block_additional_residuals=down, mid_block_additional_residual=mid,
                                return_dict=False)[0]
        loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
        clock.mark("forward")
        loss.backward()
        clock.mark("backward")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.mark("optimizer")
        return clock.phases

    return parts, step


# ----- the child: one contender ----------------------------------------------------------------------------
def loop_batches(contender: Contender, model: Any, data: Path, size: int, cache_dir: Path,
                 seed: int) -> tuple[Iterator[Batch], dict[str, Any]]:
    """An endless shuffled DataLoader over the data set (cached for `ours-cached`), and cache build info."""
    from torch.utils.data import DataLoader

    from training.dataset import ControlDataset

    dataset: Any = ControlDataset(data, size=size)
    info: dict[str, Any] = {}
    if contender.cached:
        from training.cache import CachedDataset, build_cache, cached_batch_encoder, model_fingerprint

        start = time.perf_counter()
        report = build_cache(model, dataset, cache_dir, batch_size=4)
        info = {"cache_build_s": time.perf_counter() - start, "cache_report": report.as_dict()}
        dataset = CachedDataset(dataset, cache_dir, model_fingerprint(model))
        model.batch_encoder = cached_batch_encoder

    def forever() -> Iterator[Batch]:
        epoch = 0
        while True:
            generator = torch.Generator().manual_seed(seed + epoch)
            yield from DataLoader(dataset, batch_size=1, shuffle=True, generator=generator, num_workers=0)
            epoch += 1

    return forever(), info


def child(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    contender = Contender.parse(args.child, args.checkpointing)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model, step = (build_diffusers if contender.impl == "diffusers" else build_ours)(contender, args.config)
    build_s = time.perf_counter() - start
    result: dict[str, Any] = {"contender": args.child, "label": contender.label, "build_s": build_s,
                              "mode": args.mode, "size": args.size, "machine": machine()}
    if args.mode == "step":
        batch = random_batch(args.size, args.seed)

        def batches() -> Iterator[Batch]:
            while True:
                yield batch

        source = batches()
    else:
        cache_dir = Path(args.cache_dir or tempfile.mkdtemp(prefix="controlnet_cache_"))
        source, info = loop_batches(contender, model, Path(args.data), args.size, cache_dir, args.seed)
        result.update(info)

    torch.manual_seed(args.seed)
    for _ in range(args.warmup):
        step(next(source))
    times, cpu_times, phases = [], [], []
    for i in range(args.steps):
        begin, cpu_begin = time.perf_counter(), time.process_time()
        phases.append(step(next(source)))
        times.append(time.perf_counter() - begin)
        cpu_times.append(time.process_time() - cpu_begin)
        print(f"[{contender.label}] step {i + 1}/{args.steps}: {times[-1]:.2f} s wall, {cpu_times[-1]:.2f} s CPU",
              file=sys.stderr, flush=True)
    result.update(summarize(times, cpu_times))
    result["times_s"] = times
    result["cpu_times_s"] = cpu_times  # CPU time well below threads x wall means the cores were shared
    clean = [p for p, w, c in zip(phases, times, cpu_times) if w in clean_times(times, cpu_times)] or phases
    result["phases_median_s"] = {k: statistics.median(p[k] for p in clean) for k in clean[0]}
    result["phases_s"] = phases
    if args.count_flops:
        result["flops"] = count_flops(lambda: step(next(source)))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step(next(source))
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows)
        Path(args.profile).write_text(table)
        print(table, file=sys.stderr)
    finish_child(result)


# ----- the parent: all contenders, a table -----------------------------------------------------------------
def parent(args: argparse.Namespace) -> None:
    peak = start_parent(args.threads)
    if args.mode == "loop" and not args.data:
        data = Path(tempfile.mkdtemp(prefix="fill50k_")) / "fill50k"
        from training.make_fill50k import make_fill50k

        make_fill50k(data, args.n_data, args.size, args.seed)
        args.data = str(data)
    common = ["--threads", str(torch.get_num_threads()), "--mode", args.mode, "--steps", str(args.steps),
              "--warmup", str(args.warmup),
              "--size", str(args.size), "--seed", str(args.seed),
              "--checkpointing" if args.checkpointing else "--no-checkpointing", "--config", args.config]
    if args.data:
        common += ["--data", args.data]
    count_flops = not args.no_flops and args.mode == "step"
    results = run_rounds("benchmarks.bench_train_step", args.contenders, args.rounds, common,
                         ["--count-flops"] if count_flops else [])
    peak = best_peak(peak, results)
    rows, table = render(results, peak, torch.get_num_threads(), args.mode, args.size)
    print(table)
    write_results(args.out, peak, args, rows, table)


def render(results: dict[str, list[dict[str, Any]]], peak: float, threads: int, mode: str, size: int
           ) -> tuple[list[dict[str, Any]], str]:
    """One row per contender over all its runs, and the Markdown table of them.

    s/step is the median over the steps that had their cores to themselves (`clean_times`) across all
    rounds; CPU s/step, the median CPU time of all steps, is less sensitive to sharing with one thread.
    """
    rows = []
    for runs in results.values():
        walls = [t for run in runs for t in run["times_s"]]
        cpus = [t for run in runs for t in run["cpu_times_s"]]
        used = clean_times(walls, cpus, threads)  # all steps when none was clean
        clean = sum(1 for w, c in zip(walls, cpus) if c >= CLEAN_CPU_SHARE * threads * w)
        median = statistics.median(used)
        phases = [p for run in runs for p, w, c in zip(run.get("phases_s", []), run["times_s"], run["cpu_times_s"])
                  if c >= CLEAN_CPU_SHARE * threads * w] or [p for run in runs for p in run.get("phases_s", [])]
        row: dict[str, Any] = {
            "contender": runs[0]["label"], "s_per_step": median, "samples_per_s": 1.0 / median,
            "cpu_s_per_step": statistics.median(cpus), "clean_steps": f"{clean}/{len(walls)}",
            "peak_rss_gib": max(run["peak_rss_mib"] for run in runs) / 1024.0,
            "phases": ({k: statistics.median(p[k] for p in phases) for k in phases[0]} if phases
                       else runs[0]["phases_median_s"]),
            "runs": runs,
        }
        flops = next((run["flops"] for run in runs if "flops" in run), None)
        if flops is not None:
            row["gflop_per_step"] = flops / 1e9
            row["pct_peak"] = 100.0 * row["gflop_per_step"] / median / peak
        if "cache_build_s" in runs[0]:
            row["cache_build_s"] = runs[0]["cache_build_s"]
        rows.append(row)
    reference = next((r for r in rows if r["contender"].startswith("diffusers")), None)
    for row in rows:
        if reference:
            row["speedup_vs_diffusers"] = reference["s_per_step"] / row["s_per_step"]
            row["cpu_speedup_vs_diffusers"] = reference["cpu_s_per_step"] / row["cpu_s_per_step"]
        row["phases_str"] = " / ".join(f"{v:.2f}" for v in row["phases"].values())
    columns = [("contender", "contender"), ("s_per_step", "s/step"), ("samples_per_s", "samples/s"),
               ("clean_steps", "clean steps"), ("cpu_s_per_step", "CPU s/step"),
               ("peak_rss_gib", "peak RSS GiB"), ("gflop_per_step", "GFLOP/step"), ("pct_peak", "% of peak"),
               ("speedup_vs_diffusers", "x diffusers"), ("cpu_speedup_vs_diffusers", "x diffusers (CPU s)"),
               ("phases_str", "encode / fwd / bwd / optim s")]
    if mode == "loop":
        columns.append(("cache_build_s", "cache build s"))
    header = f"{mode} mode, {size} px, batch 1, fp32, {threads} thread(s), matmul peak {peak:.1f} GFLOP/s"
    return rows, header + "\n\n" + markdown_table(rows, columns)


def report(path: str) -> None:
    """Re-render a saved result file's table (e.g. after a change to `render`)."""
    saved = json.loads(Path(path).read_text())
    results = {row["contender"]: row["runs"] for row in saved["rows"]}
    args = saved["args"]
    threads = saved["rows"][0]["runs"][0]["machine"]["threads"]
    peak = best_peak(saved["peak_gflops"], results)
    print(render(results, peak, threads, args["mode"], args["size"])[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("step", "loop"), default="step")
    parser.add_argument("--contenders", nargs="+", default=["ours", "diffusers"])
    parser.add_argument("--rounds", type=int, default=1, help="runs of each contender, interleaved")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads in every process (default: torch's choice, one per core)")
    parser.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=False,
                        help="gradient checkpointing for contenders without +ckpt/+nockpt (default off)")
    parser.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    parser.add_argument("--count-flops", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", default=str(REPO_ROOT / "models" / "cldm_v15.yaml"),
                        help="our model's config (smoke tests: models/cldm_tiny.yaml)")
    parser.add_argument("--data", help="loop mode: a Fill50K folder (default: generate one)")
    parser.add_argument("--n-data", type=int, default=16, help="loop mode: items to generate")
    parser.add_argument("--cache-dir", help="loop mode: cache folder for ours-cached (default: a temp dir)")
    parser.add_argument("--out", help="write all results as JSON here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--profile", help="child only: write a torch.profiler table of one step here")
    parser.add_argument("--profile-rows", type=int, default=30)
    parser.add_argument("--report", help="only print the table of a saved --out file")
    args = parser.parse_args(argv)
    if args.report:
        report(args.report)
    elif args.child:
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
