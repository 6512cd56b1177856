"""The whole ControlNet story on a CPU in minutes: pretrain a base, add a ControlNet, watch it take control.

Each stage runs the repository's own command line in a subprocess, exactly as a user would type it:

1. `training/make_fill50k.py`: circle outlines (hints), filled circles (targets) and prompts, at 16 px.
2. `training/pretrain_base.py`: the base text-to-image model (the part SD1.5 plays); skipped when its
   checkpoint exists. It draws the prompted colours, with the circle wherever it likes.
3. `tool_add_control.py`: the base checkpoint plus a ControlNet copied from its UNet encoder.
4. `tutorial_train.py --fidelity_every N`: trains the ControlNet (SD locked) and scores held-out hints every N
   steps, beside the no-control baseline: `fidelity.csv`, `fidelity.png` (the "sudden convergence"),
   image grids.
5. `python -m training.fidelity`: the final IoU on fresh held-out hints, with the baseline beside it.

    python demo.py                     # or: make demo
    python demo.py --quick             # a smoke run of the same pipeline in about a minute (no quality)

Each stage uses all CPU cores up to four (`--threads` or $OMP_NUM_THREADS say otherwise); the same thread count on
the same machine gives the same numbers.

Settings come from the `demo:` section of configs/demo_fill50k.yaml and the `pretrain:` section of
configs/base_fill50k.yaml; `--out` is recreated on every run (only a folder this script made is removed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from omegaconf import OmegaConf

from cldm.model import load_config
from ldm.errors import DEBUG_HELP, OutputExistsError, UserError, command_line
from ldm.util import settings_from
from training.fidelity import EvaluationSettings

ROOT = Path(__file__).resolve().parent
MARKER = ".made_by_demo"


@dataclass(frozen=True)
class DemoSettings:
    """What the demo trains and measures; the config's `demo:` section sets them."""

    seed: int = 0
    data_n: int = 10000
    batch_size: int = 16
    max_steps: int = 1500
    learning_rate: float = 3e-4
    drop_prompt: float = 0.0
    logger_freq: int = 250
    fidelity_every: int = 50
    fidelity_n: int = 16
    eval_n: int = 128
    eval_seed: int = 1
    eval_ddim_steps: int | None = None  # None: the config's evaluation section (its guidance too)
    pretrain_steps: int | None = None  # None: the base config's own


#: `--quick`: the same pipeline at smoke-test length; the scores it prints mean nothing.
QUICK = dict(data_n=64, batch_size=4, max_steps=4, logger_freq=4, fidelity_every=2, fidelity_n=2, eval_n=2,
             pretrain_steps=4, eval_ddim_steps=4)


def load_settings(config: Path, quick: bool) -> DemoSettings:
    section = OmegaConf.to_container(load_config(config).get("demo") or {})
    settings = settings_from(DemoSettings, section, f"{config}: demo")
    return replace(settings, **QUICK) if quick else settings


def run(stage: str, args: list[str], env: dict[str, str]) -> float:
    """Run one stage's command line from the repository root; stop the demo if it fails. Returns seconds."""
    print(f"\n== {stage}\n$ {' '.join(args)}", flush=True)
    start = time.time()
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=env)
    if result.returncode != 0:
        raise UserError(f"{stage} failed (exit status {result.returncode}); see its output above")
    seconds = time.time() - start
    print(f"-- {stage}: {seconds:.0f}s", flush=True)
    return seconds


def fresh_dir(path: Path) -> None:
    """Empty `path` for a new run, but only if this script made it (a marker file says so)."""
    if path.exists() and any(path.iterdir()):
        if not (path / MARKER).is_file():
            raise OutputExistsError(f"{path} exists and was not made by demo.py; choose another --out")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("made by demo.py; removed and remade by the next run\n")


@command_line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=DEBUG_HELP)
    parser.add_argument("--config", type=Path, default=Path("configs/demo_fill50k.yaml"))
    parser.add_argument("--base_config", type=Path, default=Path("configs/base_fill50k.yaml"))
    parser.add_argument("--base", type=Path, default=None,
                        help="base checkpoint, pretrained when missing and reused when present "
                             "(default models/base_fill50k.ckpt; with --quick, OUT/base.ckpt, always pretrained)")
    parser.add_argument("--data", type=Path, default=None,
                        help="generated training set (default training/fill50k_demo; with --quick, OUT/data)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (recreated)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per stage (default: $OMP_NUM_THREADS, else the cores up to 4; use 1 when "
                             "something else keeps the cores busy: oversubscribed threads run several times slower)")
    parser.add_argument("--quick", action="store_true", help="smoke-test lengths: checks the pipeline, not quality")
    args = parser.parse_args(argv)
    settings = load_settings(args.config, args.quick)
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(args.threads or os.environ.get("OMP_NUM_THREADS") or min(os.cpu_count() or 1, 4))
    s, out = settings, args.out
    base = args.base or (out / "base.ckpt" if args.quick else Path("models/base_fill50k.ckpt"))
    data = args.data or (out / "data" if args.quick else Path("training/fill50k_demo"))
    fresh_dir(out)
    timings: dict[str, float] = {}
    start = time.time()

    size = int(OmegaConf.load(args.config).model.params.image_size)
    ddim_steps = s.eval_ddim_steps or EvaluationSettings.of_config(args.config).ddim_steps

    def eval_steps(flag: str) -> list[str]:
        """Sampling steps for grids and scores: the config's evaluation section (fewer with --quick)."""
        return [flag, str(ddim_steps)]

    if (data / "prompt.json").is_file() and len((data / "prompt.json").read_text().splitlines()) == s.data_n:
        print(f"\n== data: reusing {data} ({s.data_n} items)")
    else:
        timings["data"] = run("data", ["training/make_fill50k.py", "--out", str(data), "--n", str(s.data_n),
                                       "--size", str(size), "--seed", str(s.seed), "--overwrite"], env)
    if base.is_file() and not args.quick:
        print(f"\n== base: reusing {base} (delete it to pretrain again)")
    else:
        steps = [] if s.pretrain_steps is None else ["--steps", str(s.pretrain_steps)]
        timings["pretrain base"] = run("pretrain base", [
            "training/pretrain_base.py", "--config", str(args.base_config), "--out", str(base), *steps,
            "--seed", str(s.seed), "--grid", str(out / "base_samples.png")], env)
    initial = out / "control_ini.ckpt"
    timings["add control"] = run("add control", ["tool_add_control.py", str(base), str(initial),
                                                 "--config", str(args.config), "--seed", str(s.seed)], env)
    timings["train control"] = run("train control", [
        "tutorial_train.py", "--config", str(args.config), "--resume_path", str(initial), "--data", str(data),
        "--out", str(out), "--batch_size", str(s.batch_size), "--max_steps", str(s.max_steps),
        "--learning_rate", str(s.learning_rate), "--drop_prompt", str(s.drop_prompt),
        "--logger_freq", str(s.logger_freq), "--seed", str(s.seed), *eval_steps("--log_ddim_steps"),
        "--fidelity_every", str(s.fidelity_every), "--fidelity_n", str(s.fidelity_n),
        "--fidelity_kind", "fill50k"], env)
    timings["evaluate"] = run("evaluate", [
        "-m", "training.fidelity", "--config", str(args.config), "--ckpt", str(out / "last.ckpt"),
        "--n", str(s.eval_n), "--seed", str(s.eval_seed), *eval_steps("--ddim_steps"),
        "--grid", str(out / "heldout.png")], env)

    total = time.time() - start
    print("\n== done in {:.0f}s ({})".format(total, ", ".join(f"{k} {v:.0f}s" for k, v in timings.items())))
    print(f"results in {out}/:")
    print("  fidelity.png        held-out IoU vs step, no-control baseline, sudden-convergence marker")
    print("  fidelity.csv        step, iou, color_acc, baseline")
    print("  heldout.png         rows: hints, true images, samples with control, samples without")
    print("  fidelity_samples/   held-out samples at each scored step")
    print("  image_log/train/    training grids (control, reconstruction, prompt, samples)")
    print("  base_samples.png    what the base draws without control (when it was pretrained now)")
    print(f"  last.ckpt           the trained ControlLDM; base model: {base}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
