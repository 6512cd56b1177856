"""Training recipes measured on the demo's fidelity curve: when does each converge, and how well does it end?

On the built-in demo's setup (its pretrained base, its generated Fill50K, 16 px, batch 16, learning rate 3e-4, a
1,500-step budget), each recipe trains with three seeds. For each run: the convergence step (first crossing of
halfway between the no-control baseline and the final score, as the demo's plot marks it), the final held-out IoU
on fresh seeds never used in training or tuning (7 and 8, 64 hints each) at the recipe's best guidance (chosen on
tuning seed 2 from 2, 3 and 5 with the recipe's seed-0 run), and the seconds per training step. Runs go two at a
time, one thread each; a finished run is not run again (delete its folder to redo it).

    .venv/bin/python -m benchmarks.bench_recipes --out benchmarks/results/recipes          # all recipes
    .venv/bin/python -m benchmarks.bench_recipes --out benchmarks/results/recipes --recipes uniform cubic
    .venv/bin/python -m benchmarks.bench_recipes --out benchmarks/results/recipes --report   # table and plot only
    .venv/bin/python -m benchmarks.bench_recipes --out benchmarks/results/recipes --step_cost 3  # s/step, idle machine
    .venv/bin/python -m benchmarks.bench_recipes --out benchmarks/results/recipes --early 100 10  # finer crossing
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchmarks.common import REPO_ROOT

CONFIG = "configs/demo_fill50k.yaml"
DATA = REPO_ROOT / "training" / "fill50k_demo"
BASE = REPO_ROOT / "models" / "base_fill50k.ckpt"
BATCH, STEPS, LR, EVERY = 16, 1500, 3e-4, 50
SEEDS = (0, 1, 2)
TUNING_SEED, EVAL_SEEDS, EVAL_N = 2, (7, 8), 64
GUIDANCES = (2.0, 3.0, 5.0)
#: Samples each step-cost run trains on (640: 40 steps of batch 16).
COST_SAMPLES = 640
#: name -> (extra flags, optimizer steps, fidelity interval): equal samples seen (24,000) for every recipe.
RECIPES: dict[str, tuple[list[str], int, int]] = {
    "uniform": ([], STEPS, EVERY),
    "cubic": (["--timestep_sampling", "cubic"], STEPS, EVERY),
    "logit_normal": (["--timestep_sampling", "logit_normal"], STEPS, EVERY),
    "min_snr5": (["--min_snr_gamma", "5"], STEPS, EVERY),
    "noise_offset0.1": (["--noise_offset", "0.1"], STEPS, EVERY),
    "reward0.5": (["--reward_weight", "0.5", "--reward_max_timestep", "200", "--reward_measure", "fill50k"], STEPS,
                  EVERY),
    "accumulate4": (["--accumulate_grad_batches", "4"], STEPS // 4, EVERY // 4),
}


def run(args: list[str], log: Path, threads: int = 1) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed; see {log}")


def prepare(out: Path) -> Path:
    """The demo's data and base (made as `make demo` makes them when missing) and the initial control."""
    if not (DATA / "prompt.json").is_file():
        run(["training/make_fill50k.py", "--out", str(DATA), "--n", "10000", "--size", "16", "--seed", "0",
             "--overwrite"], out / "data.log", threads=2)
    if not BASE.is_file():
        run(["training/pretrain_base.py", "--config", "configs/base_fill50k.yaml", "--out", str(BASE), "--seed", "0"],
            out / "pretrain.log", threads=2)
    initial = out / "control_ini.ckpt"
    if not initial.is_file():
        run(["tool_add_control.py", str(BASE), str(initial), "--config", CONFIG, "--seed", "0"], out / "ini.log")
    return initial


def train(name: str, flags: list[str], steps: int, every: int, seed: int, initial: Path, out: Path,
          tag: str = "") -> Path:
    folder = out / f"{name}{tag}_seed{seed}"
    if not (folder / "done.json").is_file():
        fidelity = ["--fidelity_every", str(every), "--fidelity_n", "16", "--fidelity_kind", "fill50k"]
        run_training(folder, [*fidelity, *flags], steps, seed, initial)
    return folder


def run_training(folder: Path, flags: list[str], steps: int, seed: int, initial: Path) -> None:
    """The demo's training command with `flags`, in `folder`; `done.json` records its wall time when it ends."""
    folder.mkdir(parents=True, exist_ok=True)
    start = time.time()
    run(["tutorial_train.py", "--config", CONFIG, "--resume_path", str(initial), "--data", str(DATA),
         "--out", str(folder), "--batch_size", str(BATCH), "--max_steps", str(steps), "--learning_rate", str(LR),
         "--logger_freq", "100000", "--save_every", str(steps), "--seed", str(seed), *flags], folder / "train.log")
    (folder / "done.json").write_text(json.dumps({"wall_s": time.time() - start}))


def step_cost(out: Path, names: list[str], rounds: int, initial: Path) -> dict[str, float]:
    """Seconds per optimizer step of each recipe by itself, without the fidelity evaluations: short runs of the
    same command (`COST_SAMPLES` samples each), two at a time with one thread each as the measured runs were, the
    recipes taking turns in rounds so that a change in the machine's load hits all of them alike. Per recipe: the
    median over its rounds of each run's median logged rate."""
    jobs = [(name, r) for r in range(rounds) for name in names]

    def cost_run(job: tuple[str, int]) -> float:
        name, r = job
        flags, steps, _ = RECIPES[name]
        cost_steps = max(2, steps * COST_SAMPLES // (STEPS * BATCH))
        folder = out / "step_cost" / f"{name}_{cost_steps}steps_round{r}"
        if not (folder / "done.json").is_file():
            run_training(folder, flags, cost_steps, 0, initial)
            (folder / "last.ckpt").unlink(missing_ok=True)  # only its logged rates are wanted
        return seconds_per_step(folder, samples_per_step(flags))

    with ThreadPoolExecutor(max_workers=2) as pool:
        costs = list(pool.map(cost_run, jobs))
    return {name: statistics.median(c for (n, _), c in zip(jobs, costs) if n == name) for name in names}


def early_convergence(out: Path, names: list[str], seeds: tuple[int, ...], initial: Path, steps: int, every: int
                      ) -> dict[str, list[dict[str, Any]]]:
    """The halfway crossing at a finer resolution: each full run's first `steps` steps (a recipe with accumulation:
    the same samples) again, evaluated every `every` steps, against the full run's halfway line (its baseline and
    final score). The evaluations leave the training's random state alone, so the points the two runs share are
    equal (checked: `differs_from_full_at` lists the steps where they are not)."""
    jobs = [(name, seed) for name in names for seed in seeds if (out / f"{name}_seed{seed}" / "fidelity.csv").is_file()]

    for name in {name for name, _ in jobs}:  # the same samples-seen grid for every recipe
        full_steps = RECIPES[name][1]
        if (steps * full_steps) % STEPS or (every * full_steps) % STEPS:
            raise SystemExit(f"--early {steps} {every}: {name} makes {full_steps} steps of {STEPS}; pick values "
                             f"that scale to whole steps of it")

    def early_run(job: tuple[str, int]) -> Path:
        name, seed = job
        flags, full_steps, _ = RECIPES[name]
        return train(name, flags, steps * full_steps // STEPS, every * full_steps // STEPS, seed, initial, out,
                     tag=f"_early{steps}_{every}")

    with ThreadPoolExecutor(max_workers=2) as pool:
        folders = list(pool.map(early_run, jobs))
    results: dict[str, list[dict[str, Any]]] = {}
    for (name, seed), folder in zip(jobs, folders):
        per_step = samples_per_step(RECIPES[name][0])
        full, early = curve(out / f"{name}_seed{seed}"), curve(folder)
        shared = {r["step"]: r["iou"] for r in full}
        halfway = full[0]["baseline"] + 0.5 * (full[-1]["iou"] - full[0]["baseline"])
        gain = full[-1]["iou"] > full[0]["baseline"]  # without one there is nothing to cross
        crossing = next((r["step"] * per_step for r in early if r["iou"] >= halfway), None) if gain else None
        results.setdefault(name, []).append({
            "seed": seed, "halfway": halfway, "gain": gain, "crossing_samples": crossing,
            "curve": [(r["step"] * per_step, r["iou"]) for r in early],
            "differs_from_full_at": [r["step"] for r in early if r["step"] in shared and r["iou"] != shared[r["step"]]],
        })
    return results


def score(folder: Path, seed: int, guidance: float) -> float:
    """Held-out IoU of a run's last.ckpt on `EVAL_N` fresh hints of `seed` (cached in the run's folder)."""
    cache = folder / f"score_seed{seed}_g{guidance:g}.json"
    if cache.is_file():
        return json.loads(cache.read_text())["iou"]
    log = folder / f"score_seed{seed}_g{guidance:g}.log"
    run(["-m", "training.fidelity", "--config", CONFIG, "--ckpt", str(folder / "last.ckpt"), "--n", str(EVAL_N),
         "--seed", str(seed), "--guidance_scale", str(guidance)], log)
    found = re.search(r"iou=(\d\.\d+) baseline=(\d\.\d+)", log.read_text())
    assert found is not None, log
    result = {"iou": float(found.group(1)), "baseline": float(found.group(2))}
    cache.write_text(json.dumps(result))
    return result["iou"]


def curve(folder: Path) -> list[dict[str, float]]:
    with open(folder / "fidelity.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def convergence_samples(rows: list[dict[str, float]], samples_per_step: int) -> float | None:
    """Samples seen at the first evaluation reaching halfway from the baseline to the final score."""
    baseline, final = rows[0]["baseline"], rows[-1]["iou"]
    if final <= baseline:
        return None
    halfway = baseline + 0.5 * (final - baseline)
    return next(r["step"] * samples_per_step for r in rows if r["iou"] >= halfway)


def seconds_per_step(folder: Path, samples_per_step: int) -> float:
    """Median training time per optimizer step, from the logged samples/s (evaluations excluded)."""
    rates = []
    for path in folder.glob("logs/version_*/metrics.csv"):
        with open(path, newline="") as f:
            rates += [float(r["samples_per_sec"]) for r in csv.DictReader(f) if r.get("samples_per_sec")]
    return samples_per_step / statistics.median(rates) if rates else float("nan")


def samples_per_step(flags: list[str]) -> int:
    accumulate = flags[flags.index("--accumulate_grad_batches") + 1] if "--accumulate_grad_batches" in flags else 1
    return BATCH * int(accumulate)


def measure(name: str, folders: list[Path], pool: ThreadPoolExecutor) -> dict[str, Any]:
    """Tune the guidance on the seed-0 run, score every run on the fresh seeds, read the curves."""
    flags = RECIPES[name][0]
    per_step = samples_per_step(flags)
    tuned = dict(zip(GUIDANCES, pool.map(lambda g: score(folders[0], TUNING_SEED, g), GUIDANCES)))
    guidance = max(tuned, key=tuned.get)
    finals = list(pool.map(lambda job: score(*job), [(f, s, guidance) for f in folders for s in EVAL_SEEDS]))
    curves = [curve(f) for f in folders]
    converged = [convergence_samples(c, per_step) for c in curves]
    reached = [c for c in converged if c is not None]
    return {
        "recipe": name, "flags": flags, "guidance": guidance, "tuning": tuned,
        "convergence_samples": converged, "final_iou": finals, "final_iou_mean": statistics.mean(finals),
        "convergence_samples_mean": statistics.mean(reached) if reached else None,
        "s_per_step": statistics.median(seconds_per_step(f, per_step) for f in folders),
        "curves": [[(r["step"] * per_step, r["iou"]) for r in c] for c in curves],
        "baseline": statistics.mean(c[0]["baseline"] for c in curves),
    }


def report(out: Path) -> str:
    results = [json.loads(p.read_text()) for p in sorted(out.glob("result_*.json"))]
    if not results:
        return "no results yet"
    uniform = next((r for r in results if r["recipe"] == "uniform"), results[0])
    lines = ["| recipe | convergence (samples seen, per seed) | mean | vs uniform | final IoU (fresh seeds) | "
             "vs uniform | guidance | s/step |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        conv = ", ".join("-" if c is None else f"{c:.0f}" for c in r["convergence_samples"])
        mean = r["convergence_samples_mean"]
        ratio = f"{mean / uniform['convergence_samples_mean']:.2f}x" if mean and uniform["convergence_samples_mean"] \
            else "-"
        lines.append(f"| {r['recipe']} | {conv} | {mean:.0f} | {ratio} | {r['final_iou_mean']:.3f} | "
                     f"{r['final_iou_mean'] - uniform['final_iou_mean']:+.3f} | {r['guidance']:g} | "
                     f"{r['s_per_step']:.3f} |" if mean else f"| {r['recipe']} | {conv} | - | - | "
                     f"{r['final_iou_mean']:.3f} | {r['final_iou_mean'] - uniform['final_iou_mean']:+.3f} | "
                     f"{r['guidance']:g} | {r['s_per_step']:.3f} |")
    best = max(results, key=lambda r: r["final_iou_mean"])
    plot(out / "recipes.png", [uniform, best] if best is not uniform else [uniform])
    return "\n".join(lines)


def plot(path: Path, results: list[dict[str, Any]]) -> None:
    """Mean held-out IoU against samples seen, per recipe (mean over its seeds)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    for r in results:
        points = min(len(c) for c in r["curves"])
        xs = [r["curves"][0][i][0] for i in range(points)]
        ys = [statistics.mean(c[i][1] for c in r["curves"]) for i in range(points)]
        ax.plot(xs, ys, ".-", label=f"{r['recipe']} (mean of {len(r['curves'])} seeds)")
    ax.axhline(results[0]["baseline"], ls="--", color="gray", label="no control (base model)")
    ax.set_xlabel("training samples seen")
    ax.set_ylabel("held-out IoU (16 hints, during training)")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path)


def main() -> None:
    global STEPS, EVERY, SEEDS, EVAL_N, GUIDANCES, EVAL_SEEDS, COST_SAMPLES  # --quick shrinks the measurement
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "benchmarks" / "results" / "recipes")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--combine", nargs="+", default=None, metavar="RECIPE",
                        help="measure these recipes' flags together (the best combination) instead")
    parser.add_argument("--report", action="store_true", help="only print the table of what was measured")
    parser.add_argument("--early", type=int, nargs=2, default=None, metavar=("STEPS", "EVERY"),
                        help="instead: the first STEPS steps of each finished run again, evaluated every EVERY steps")
    parser.add_argument("--step_cost", type=int, default=0, metavar="ROUNDS",
                        help="instead: each recipe's seconds per step by itself, over ROUNDS rounds of short runs")
    parser.add_argument("--quick", action="store_true", help="4 steps, one seed, 2 hints: checks the script only")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help=f"training seeds (default {' '.join(map(str, SEEDS))}; the first one tunes the guidance)")
    parser.add_argument("--eval_seeds", type=int, nargs="+", default=None,
                        help=f"fresh seeds of the final score (default {' '.join(map(str, EVAL_SEEDS))})")
    parser.add_argument("--guidances", type=float, nargs="+", default=None,
                        help=f"guidances tuned on seed {TUNING_SEED} (default {' '.join(map(str, GUIDANCES))})")
    args = parser.parse_args()
    if args.quick:
        STEPS, EVERY, SEEDS, EVAL_N, GUIDANCES, EVAL_SEEDS, COST_SAMPLES = 4, 2, (0,), 2, (3.0,), (7,), 64
        for name, (flags, steps, every) in list(RECIPES.items()):
            RECIPES[name] = (flags, max(1, steps * 4 // 1500), max(1, every * 2 // 50))
    EVAL_SEEDS = tuple(args.eval_seeds) if args.eval_seeds else EVAL_SEEDS
    GUIDANCES = tuple(args.guidances) if args.guidances else GUIDANCES
    args.out.mkdir(parents=True, exist_ok=True)
    if args.combine:
        flags = [f for name in args.combine for f in RECIPES[name][0]]
        # the fewest steps of its parts: with accumulation's the same samples seen
        RECIPES["+".join(args.combine)] = (flags, min(RECIPES[n][1] for n in args.combine),
                                           min(RECIPES[n][2] for n in args.combine))
        args.recipes = ["+".join(args.combine)]
    if args.early:
        early = early_convergence(args.out, args.recipes, tuple(args.seeds) if args.seeds else SEEDS,
                                  prepare(args.out), *args.early)
        (args.out / f"early{args.early[0]}_{args.early[1]}.json").write_text(json.dumps(early, indent=1))
        for name, runs in early.items():
            crossings = ", ".join(("no gain over the baseline" if not r["gain"] else f"{r['crossing_samples']:.0f}"
                                   if r["crossing_samples"] is not None else f"not by step {args.early[0]}")
                                  + f" (seed {r['seed']})" for r in runs)
            differing = "".join(f"; seed {r['seed']} differs from its full run at steps {r['differs_from_full_at']}"
                                for r in runs if r["differs_from_full_at"])
            print(f"{name}: halfway crossed at (samples seen) {crossings}{differing}")
        return
    if args.step_cost:
        costs = step_cost(args.out, args.recipes, args.step_cost, prepare(args.out))
        (args.out / "step_cost.json").write_text(json.dumps(costs, indent=1))
        uniform = costs.get("uniform")
        for name, cost in costs.items():
            print(f"{name}: {cost:.3f} s/step" + (f" ({cost / uniform:.2f}x uniform)" if uniform else ""))
        return
    if not args.report:
        initial = prepare(args.out)
        seeds = tuple(args.seeds) if args.seeds else SEEDS
        with ThreadPoolExecutor(max_workers=2) as training, ThreadPoolExecutor(max_workers=1) as scoring:
            runs = {name: [training.submit(train, name, *RECIPES[name], seed, initial, args.out) for seed in seeds]
                    for name in args.recipes}
            for name, futures in runs.items():  # a recipe is scored as soon as its runs end: partial runs report
                result = measure(name, [f.result() for f in futures], scoring)
                (args.out / f"result_{name}.json").write_text(json.dumps(result, indent=1))
                print(f"{name}: convergence {result['convergence_samples']} final {result['final_iou']}", flush=True)
    print(report(args.out))


if __name__ == "__main__":
    main()
