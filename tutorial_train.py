"""Train a ControlNet on a folder of source/target images with a prompt.json (see docs/train.md).

The flow is the original tutorial's: create_model -> load_state_dict -> MyDataset -> DataLoader ->
ImageLogger -> Trainer.fit. With no arguments it trains SD1.5 + ControlNet on ./training/fill50k from
./models/control_sd15_ini.ckpt, batch 4, learning rate 1e-5, images logged every 300 steps.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger
from torch.utils.data import DataLoader

from cldm.checkpoint import check_resumable, load_weights
from cldm.cldm import OPTIMIZERS
from cldm.control import ControlReward
from cldm.logger import ImageLogger
from cldm.model import create_model
from ldm.errors import DEBUG_HELP, InputError, MissingFileError, TrainingDiverged, command_line
from ldm.models.diffusion.loss import TIMESTEP_SAMPLINGS, TrainingRecipe
from training.fidelity import EvaluationSettings, fidelity_callback_from_args
from training.loop import (
    AtomicCheckpointIO,
    ExactResume,
    LastCheckpoint,
    ResumableSampler,
    StopOnNonFiniteGradients,
    Throughput,
)
from training.rewards import measure_from_name
from tutorial_dataset import MyDataset


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog=DEBUG_HELP)
    p.add_argument("--config", default="./models/cldm_v15.yaml", help="model YAML")
    p.add_argument("--resume_path", default="./models/control_sd15_ini.ckpt",
                   help="initial weights: a checkpoint made by tool_add_control.py (or a trained ControlNet)")
    p.add_argument("--data", default="./training/fill50k", help="folder with prompt.json, source/, target/")
    p.add_argument("--out", default="./runs/train", help="last.ckpt, logs and image_log/ go here")
    p.add_argument("--batch_size", type=positive_int, default=4)
    p.add_argument("--max_steps", type=int, default=-1, help="optimizer steps; -1 trains until stopped")
    p.add_argument("--learning_rate", type=float, default=1e-5)
    p.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS,
                   help="adamw (fused where the device has it) or adamw8bit (bitsandbytes, CUDA only, less memory)")
    p.add_argument("--logger_freq", type=positive_int, default=300, help="image grids every N steps")
    p.add_argument("--log_ddim_steps", type=positive_int, default=50, help="DDIM steps of the logged samples")
    p.add_argument("--log_guidance_scale", type=float, default=None,
                   help="classifier-free guidance of the samples drawn during training: image grids and fidelity "
                        "(default: the config's evaluation section, else 9)")
    p.add_argument("--save_every", type=positive_int, default=None,
                   help="write last.ckpt every N steps (default: logger_freq)")
    p.add_argument("--sd_locked", action=argparse.BooleanOptionalAction, default=True,
                   help="keep SD frozen (--no-sd_locked also trains the UNet decoder)")
    p.add_argument("--only_mid_control", action="store_true", help="feed only the middle-block residual")
    p.add_argument("--drop_prompt", type=float, default=0.0,
                   help="fraction of prompts replaced by '' (the paper used 0.5 so the control learns semantics)")
    p.add_argument("--precision", default="32", choices=["32", "16-mixed", "bf16-mixed"])
    p.add_argument("--frozen_weights", default="auto", choices=["auto", "full", "half"],
                   help="precision of the frozen SD weights on the device: half = the mixed precision's dtype "
                        "(2.1 GB less for SD1.5; checkpoints still hold them at full precision); auto = half "
                        "with bf16-mixed, full otherwise")
    p.add_argument("--accumulate_grad_batches", type=positive_int, default=1)
    recipe = p.add_argument_group("training recipe (all off by default: the original's objective; see docs/train.md)")
    recipe.add_argument("--timestep_sampling", default="uniform", choices=TIMESTEP_SAMPLINGS,
                        help="uniform; cubic (T2I-Adapter: t = (1 - u^3) T, noisier steps); logit_normal (SD3)")
    recipe.add_argument("--logit_mean", type=float, default=0.0, help="logit_normal's mean")
    recipe.add_argument("--logit_std", type=float, default=1.0, help="logit_normal's standard deviation")
    recipe.add_argument("--min_snr_gamma", type=float, default=None, help="Min-SNR loss weighting with this gamma")
    recipe.add_argument("--noise_offset", type=float, default=0.0, help="offset noise: a per-channel constant")
    recipe.add_argument("--reward_weight", type=float, default=0.0,
                        help="ControlNet++-style consistency reward: weight of (1 - fidelity of the one-step "
                             "prediction) in the loss")
    recipe.add_argument("--reward_max_timestep", type=positive_int, default=200,
                        help="the reward applies to steps with t below this")
    recipe.add_argument("--reward_measure", default="fill50k",
                        help="fill50k (soft IoU of the circle), edges (soft edge F1), or package.module:Class")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the UNet and ControlNet (GPU: ~1.3x faster steps after a minute or two "
                        "of compiling; on a CPU compiling takes many minutes)")
    p.add_argument("--devices", default="1", help="number of devices, or a list like 0,1")
    p.add_argument("--accelerator", default="auto")
    p.add_argument("--strategy", default="auto", help="e.g. ddp, fsdp, deepspeed_stage_2 (see docs/train.md)")
    p.add_argument("--logger", default="csv", choices=["csv", "tensorboard"], help="where metrics go, under OUT/logs")
    p.add_argument("--num_workers", type=non_negative_int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image_size", type=positive_int, default=None, help="resize source and target to this square size")
    p.add_argument("--skip_bad", action="store_true", help="skip unusable dataset lines (counted and reported)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="encode targets (VAE) and prompts (text encoder) once into DIR and train from that cache")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.ckpt exactly where it stopped")
    p.add_argument("--fidelity_every", type=non_negative_int, default=0,
                   help="score control fidelity every N steps (0: off)")
    p.add_argument("--fidelity_n", type=positive_int, default=8, help="held-out hints scored each time")
    p.add_argument("--fidelity_kind", default="auto", choices=["auto", "fill50k", "edges"])
    return p.parse_args(argv)


def parse_devices(text: str) -> int | list[int] | str:
    if text == "auto":
        return text
    if "," in text:
        return [int(d) for d in text.split(",") if d]
    return int(text)


def frozen_dtype(choice: str, precision: str) -> torch.dtype | None:
    """The dtype `--frozen_weights` asks for under `--precision` (None: full precision)."""
    half = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    if choice == "half" and half is None:
        raise InputError(f"--frozen_weights half needs --precision bf16-mixed or 16-mixed, not {precision}")
    if choice == "half" or (choice == "auto" and precision == "bf16-mixed"):
        return half
    return None


def make_logger(kind: str, out: Path) -> Logger:
    if kind == "tensorboard":
        try:
            return TensorBoardLogger(out, name="logs")
        except ModuleNotFoundError as err:
            raise InputError("--logger tensorboard needs: pip install tensorboard") from err
    return CSVLogger(out, name="logs")


@command_line
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The frozen VAE and text encoder are in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    out = Path(args.out)
    last = out / "last.ckpt"
    resuming = args.resume and last.is_file()
    if args.resume and not resuming:
        print(f"note: --resume given but {last} does not exist yet; starting from {args.resume_path}")
    if resuming:
        check_resumable(last)
    elif not Path(args.resume_path).is_file():
        raise MissingFileError(f"{args.resume_path} not found; make it with: python tool_add_control.py "
                               f"./models/v1-5-pruned.ckpt {args.resume_path}")
    if not (Path(args.data) / "prompt.json").is_file():
        raise MissingFileError(f"{Path(args.data) / 'prompt.json'} not found; point --data at your folder or make "
                               f"Fill50K with: python training/make_fill50k.py --out {args.data} --n 50000 --size 512")
    pl.seed_everything(args.seed, workers=True)

    # Configs
    evaluation = EvaluationSettings.of_config(args.config)
    log_guidance = evaluation.guidance_scale if args.log_guidance_scale is None else args.log_guidance_scale
    model = create_model(args.config).cpu()
    if not resuming:  # a resumed run takes every weight from last.ckpt
        load_weights(model, args.resume_path)
    model.learning_rate = args.learning_rate
    model.optimizer = args.optimizer
    model.sd_locked = args.sd_locked
    model.only_mid_control = args.only_mid_control
    model.frozen_dtype = frozen_dtype(args.frozen_weights, args.precision)
    model.recipe = TrainingRecipe(args.timestep_sampling, args.logit_mean, args.logit_std, args.min_snr_gamma,
                                  args.noise_offset)
    if args.reward_weight:
        model.reward = ControlReward(measure_from_name(args.reward_measure), args.reward_weight,
                                     args.reward_max_timestep)
    if args.compile:
        model.compile_networks()

    # Misc
    dataset = MyDataset(root=args.data, skip_bad=args.skip_bad, drop_prompt=args.drop_prompt, seed=args.seed,
                        size=args.image_size)
    print(dataset.report())
    if args.cache:  # the training step then runs neither the VAE encoder nor the text encoder
        from training.cache import CachedDataset, build_cache, cached_batch_encoder, model_fingerprint

        fingerprint = model_fingerprint(model)
        print(build_cache(model, dataset, args.cache, fingerprint=fingerprint))
        dataset = CachedDataset(dataset, args.cache, fingerprint)
        model.batch_encoder = cached_batch_encoder
        model.encoders_device = "cpu"  # no GPU memory for encoders that only image logging still uses
    sampler = ResumableSampler(len(dataset), seed=args.seed)
    dataloader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                            persistent_workers=args.num_workers > 0, pin_memory=torch.cuda.is_available())
    devices = parse_devices(args.devices)
    world = devices if isinstance(devices, int) else len(devices) if isinstance(devices, list) else 1
    samples_per_step = args.batch_size * args.accumulate_grad_batches * max(world, 1)
    last_checkpoint = LastCheckpoint(out, args.save_every or args.logger_freq)
    callbacks: list[pl.Callback] = [
        ImageLogger(batch_frequency=args.logger_freq, save_dir=out,
                    log_images_kwargs={"ddim_steps": args.log_ddim_steps,
                                       "unconditional_guidance_scale": log_guidance}),
        ExactResume(sampler, samples_per_step),
        Throughput(args.batch_size),
        StopOnNonFiniteGradients(),
        last_checkpoint,
    ]
    if args.fidelity_every > 0:
        callbacks.append(fidelity_callback_from_args(
            kind=args.fidelity_kind, every_n_steps=args.fidelity_every, n=args.fidelity_n, seed=args.seed,
            data_root=args.data, image_size=args.image_size, out_dir=str(out), guidance_scale=log_guidance,
            ddim_steps=evaluation.ddim_steps))
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=devices, strategy=args.strategy, precision=args.precision,
        max_steps=args.max_steps, accumulate_grad_batches=args.accumulate_grad_batches, callbacks=callbacks,
        plugins=[AtomicCheckpointIO()], logger=make_logger(args.logger, out), default_root_dir=out,
        enable_checkpointing=False, use_distributed_sampler=False, log_every_n_steps=1,
    )

    # Train!
    try:
        trainer.fit(model, dataloader, ckpt_path=str(last) if resuming else None, weights_only=True)
    except TrainingDiverged as err:
        raise TrainingDiverged(f"{err}; {last_checkpoint.status()}") from err
    if trainer.is_global_zero:
        print(f"done: {trainer.global_step} steps; checkpoint {last}; image grids in {out / 'image_log'}")
        if getattr(dataset, "skipped", None):
            print(dataset.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
