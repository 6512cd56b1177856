"""Train a ControlNet on your data as it is (see docs/train.md).

`--data` takes a `prompt.json` folder (Fill50K's), a Hugging Face `datasets` folder, parquet or arrow files, an
image folder with `metadata.jsonl`, a kohya-style folder of images with `.txt` captions, or tar shards
(`data/{00000..00099}.tar`, streamed); hints can be made on the fly (`--hint canny`) and images of any size
resized and cropped (`--resolution`) or bucketed by aspect ratio (`--buckets`).

The flow is the original tutorial's: create_model -> load_state_dict -> dataset -> DataLoader -> ImageLogger ->
Trainer.fit. With no arguments it trains SD1.5 + ControlNet on ./training/fill50k from
./models/control_sd15_ini.ckpt, batch 4, learning rate 1e-5, images logged every 300 steps.

Stopped by SIGTERM (a cluster's preemption, `kill`), it saves `last.ckpt` between steps and exits with status 143;
the first Ctrl-C finishes the step under way, saves and exits with status 130. Either way the same command with
`--resume` continues exactly.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, Dataset

from cldm.checkpoint import load_weights
from cldm.cldm import OPTIMIZERS, ControlLDM
from cldm.control import ControlReward
from cldm.logger import ImageLogger
from cldm.model import create_model
from ldm.errors import DEBUG_HELP, InputError, MissingFileError, TrainingDiverged, command_line
from ldm.models.diffusion.loss import TIMESTEP_SAMPLINGS, TrainingRecipe
from training.dataset import PairedDataset, open_dataset
from training.fidelity import (
    EDGE_PREPROCESSORS,
    EvaluationSettings,
    FidelityCallback,
    fidelity_callback_from_args,
    validation_heldout,
)
from training.geometry import CROPS, Geometry
from training.hints import HintMaker
from training.loop import (
    AtomicCheckpointIO,
    ExactResume,
    LastCheckpoint,
    StopOnNonFiniteGradients,
    Throughput,
    newest_resumable,
    worker_init,
)
from training.order import BucketBatchSampler, DataOrder, ResumableSampler
from training.rewards import measure_from_name
from training.sources import FORMATS, Columns, detect_format
from training.streaming import ShardStream

#: A run stopped by SIGTERM or Ctrl-C exits as a process killed by the signal would (128 + 15, 128 + 2), after
#: saving: not a success.
SIGTERM_STATUS = 143
SIGINT_STATUS = 130


def stopped(by: str, step: int, last_checkpoint: LastCheckpoint, status: int) -> int:
    """Say where a run stopped by a signal left its work, and return the signal's exit status."""
    print(f"stopped by {by} at step {step}; {last_checkpoint.status()}; continue with the same command and --resume",
          file=sys.stderr)
    return status


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
    p.add_argument("--data", default="./training/fill50k",
                   help="your data: a prompt.json folder, datasets folder, parquet/arrow file(s), image folder with "
                        "metadata.jsonl, kohya-style folder, or tar shards ('data/{00000..00099}.tar')")
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
    data = p.add_argument_group("data (see docs/train.md)")
    data.add_argument("--data_format", default=None, choices=FORMATS, help="the layout of --data (default: detected)")
    data.add_argument("--image_column", default="image", help="datasets layouts: the target image column")
    data.add_argument("--conditioning_image_column", default="conditioning_image",
                      help="datasets layouts: the hint image column")
    data.add_argument("--caption_column", default="text", help="datasets layouts: the caption column")
    data.add_argument("--conditioning_dir", default=None,
                      help="kohya-style folders: the hint folder (default: DATA/conditioning)")
    data.add_argument("--hint", default=None, metavar="PREPROCESSOR",
                      help="make each hint from its target on the fly: canny, hed, mlsd, scribble, normal, ... "
                           "(stored hints are then ignored)")
    data.add_argument("--threshold_a", type=float, default=None, help="the preprocessor's first threshold")
    data.add_argument("--threshold_b", type=float, default=None, help="the preprocessor's second threshold")
    data.add_argument("--random_thresholds", action="store_true",
                      help="--hint canny: draw both thresholds per item, as the paper did")
    data.add_argument("--annotator_dir", default=None, help="weights of the weight-file preprocessors (hed, ...)")
    data.add_argument("--image_size", type=positive_int, default=None,
                      help="resize source and target to this square size (the aspect ratio is not kept)")
    data.add_argument("--resolution", type=positive_int, default=None,
                      help="resize the short side to this, then crop a square (diffusers' behaviour)")
    data.add_argument("--crop", default="center", choices=CROPS, help="--resolution's crop")
    data.add_argument("--buckets", action="store_true",
                      help="with --resolution: aspect-ratio buckets of about N x N pixels, each batch from one")
    data.add_argument("--skip_bad", action="store_true", help="skip unusable items (counted and reported)")
    p.add_argument("--cache", default=None, metavar="DIR",
                   help="encode targets (VAE) and prompts (text encoder) once into DIR and train from that cache")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.ckpt exactly where it stopped")
    p.add_argument("--fidelity_every", type=non_negative_int, default=0,
                   help="score control fidelity every N steps (0: off)")
    p.add_argument("--fidelity_n", type=positive_int, default=8, help="held-out hints scored each time")
    p.add_argument("--fidelity_kind", default="auto", choices=["auto", "fill50k", "edges"])
    p.add_argument("--validation_image", action="append", default=[], metavar="FILE",
                   help="a hint to sample every --validation_steps into OUT/image_log/validation (repeatable, "
                        "paired in order with --validation_prompt)")
    p.add_argument("--validation_prompt", action="append", default=[], metavar="TEXT")
    p.add_argument("--validation_steps", type=positive_int, default=100)
    p.add_argument("--keep_last", type=non_negative_int, default=0,
                   help="also keep numbered checkpoints (OUT/checkpoints/step-N.ckpt, every --save_every steps), "
                        "the newest K")
    args = p.parse_args(argv)
    if len(args.validation_image) != len(args.validation_prompt):
        p.error(f"--validation_image and --validation_prompt come in pairs: got {len(args.validation_image)} "
                f"images and {len(args.validation_prompt)} prompts")
    return args


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


@dataclass
class TrainingData:
    """What training reads: the loader, the order `ExactResume` positions, and the items (None when streamed)."""

    loader: DataLoader
    order: DataOrder
    items: PairedDataset | None

    def skipped(self) -> int:
        return len(self.items.skipped) if self.items is not None else self.order.skipped()  # type: ignore[attr-defined]

    def report(self) -> str:
        return self.items.report() if self.items is not None else self.order.report()  # type: ignore[attr-defined]


def training_data(args: argparse.Namespace, model: ControlLDM) -> TrainingData:
    """The data of `--data` in its layout, placed, hinted and ordered as the flags say (and cached with --cache)."""
    geometry = Geometry.from_options(args.image_size, args.resolution, args.crop, args.buckets)
    hint_maker = HintMaker(args.hint, args.threshold_a, args.threshold_b, args.random_thresholds,
                           args.annotator_dir) if args.hint else None
    if not args.hint and args.random_thresholds:
        raise InputError("--random_thresholds draws canny's thresholds: it needs --hint canny")
    data_format = args.data_format or detect_format(Path(args.data))
    pin_memory = torch.cuda.is_available()
    size_conditioning = model.has_conditioner  # SDXL: each item's size and crop
    if data_format == "webdataset":
        if args.cache:
            raise InputError("--cache encodes a data set on disk once; streamed shards are encoded as they come: "
                             "drop --cache")
        if args.buckets:
            raise InputError("--buckets needs every item's size up front; streamed shards give them as they come: "
                             "use --resolution N without --buckets")
        stream = ShardStream(args.data, batch_size=args.batch_size, num_workers=args.num_workers, geometry=geometry,
                             hint_maker=hint_maker, drop_prompt=args.drop_prompt, seed=args.seed,
                             skip_bad=args.skip_bad, size_conditioning=size_conditioning)
        print(f"{stream.description}: streamed")
        return TrainingData(stream.loader(pin_memory), stream, None)
    items = open_dataset(args.data, data_format=data_format,
                         columns=Columns(args.image_column, args.conditioning_image_column, args.caption_column),
                         conditioning_dir=args.conditioning_dir, skip_bad=args.skip_bad, geometry=geometry,
                         hint_maker=hint_maker, drop_prompt=args.drop_prompt, seed=args.seed,
                         size_conditioning=size_conditioning)
    print(items.report())
    dataset: Dataset = items
    if args.cache:  # the training step then runs neither the VAE encoder nor the text encoder
        from training.cache import CachedDataset, build_cache, cached_batch_encoder, model_fingerprint

        fingerprint = model_fingerprint(model)
        print(build_cache(model, items, args.cache, fingerprint=fingerprint))
        dataset = CachedDataset(items, args.cache, fingerprint)
        model.batch_encoder = cached_batch_encoder
        model.encoders_device = "cpu"  # no GPU memory for encoders that only image logging still uses
    workers = {"num_workers": args.num_workers, "persistent_workers": args.num_workers > 0, "pin_memory": pin_memory,
               "worker_init_fn": worker_init}
    if geometry.buckets:
        buckets = BucketBatchSampler([items.output_size(i) for i in range(len(items))], args.batch_size, args.seed)
        return TrainingData(DataLoader(dataset, batch_sampler=buckets, **workers), buckets, items)
    sampler = ResumableSampler(len(items), seed=args.seed, with_epochs=items.varies)
    return TrainingData(DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, **workers), sampler, items)


def validation_callback(args: argparse.Namespace, data: TrainingData, out: Path, guidance_scale: float,
                        ddim_steps: int) -> FidelityCallback:
    """Samples of the `--validation_image` hints every `--validation_steps`, in OUT/image_log/validation, scored
    by edge F1 when the hints are edge maps (an edge `--hint`, or hints that look like one)."""
    if args.resolution:
        size = (args.resolution, args.resolution)
    elif args.image_size:
        size = (args.image_size, args.image_size)
    elif data.items is not None:
        size = data.items.output_size(0)
    else:
        raise InputError("--validation_image with streamed shards needs --resolution or --image_size (the size to "
                         "sample at)")
    pairs = list(zip(args.validation_image, args.validation_prompt))
    scored = True if args.hint in EDGE_PREPROCESSORS else None if args.hint is None else False
    for path, _ in pairs:
        if not Path(path).is_file():
            raise MissingFileError(f"{path}: validation image not found")
    return FidelityCallback(args.validation_steps, out / "image_log" / "validation",
                            lambda: validation_heldout(pairs, size, scored), seed=args.seed,
                            guidance_scale=guidance_scale, ddim_steps=ddim_steps, name="validation",
                            samples_subdir="")


@command_line
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The frozen VAE and text encoder are in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    out = Path(args.out)
    last = out / "last.ckpt"
    resume_from = newest_resumable(out) if args.resume else None
    if args.resume and resume_from is None:
        print(f"note: --resume given but {last} does not exist yet; starting from {args.resume_path}")
    if resume_from is None and not Path(args.resume_path).is_file():
        raise MissingFileError(f"{args.resume_path} not found; make it with: python tool_add_control.py "
                               f"./models/v1-5-pruned.ckpt {args.resume_path}")
    if "{" not in args.data and not Path(args.data).exists():
        raise MissingFileError(f"{args.data} not found; point --data at your data (see docs/train.md) or make "
                               f"Fill50K with: python training/make_fill50k.py --out {args.data} --n 50000 --size 512")
    resuming = resume_from is not None
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
    data = training_data(args, model)
    devices = parse_devices(args.devices)
    world = devices if isinstance(devices, int) else len(devices) if isinstance(devices, list) else 1
    samples_per_step = args.batch_size * args.accumulate_grad_batches * max(world, 1)
    last_checkpoint = LastCheckpoint(out, args.save_every or args.logger_freq, keep_last=args.keep_last)
    callbacks: list[pl.Callback] = [
        ImageLogger(batch_frequency=args.logger_freq, save_dir=out,
                    log_images_kwargs={"ddim_steps": args.log_ddim_steps,
                                       "unconditional_guidance_scale": log_guidance}),
        ExactResume(data.order, samples_per_step),
        Throughput(args.batch_size),
        StopOnNonFiniteGradients(),
        last_checkpoint,
    ]
    if args.fidelity_every > 0:
        callbacks.append(fidelity_callback_from_args(
            kind=args.fidelity_kind, every_n_steps=args.fidelity_every, n=args.fidelity_n, seed=args.seed,
            data_root=None, image_size=args.image_size, out_dir=str(out), guidance_scale=log_guidance,
            ddim_steps=evaluation.ddim_steps, dataset=data.items))
    if args.validation_image:
        callbacks.append(validation_callback(args, data, out, log_guidance, evaluation.ddim_steps))
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=devices, strategy=args.strategy, precision=args.precision,
        max_steps=args.max_steps, accumulate_grad_batches=args.accumulate_grad_batches, callbacks=callbacks,
        plugins=[AtomicCheckpointIO()], logger=make_logger(args.logger, out), default_root_dir=out,
        enable_checkpointing=False, use_distributed_sampler=False, log_every_n_steps=1,
    )

    # Train!
    try:
        trainer.fit(model, data.loader, ckpt_path=str(resume_from) if resuming else None, weights_only=True)
    except TrainingDiverged as err:
        raise TrainingDiverged(f"{err}; {last_checkpoint.status()}") from err
    except SIGTERMException:  # Lightning's: raised between steps after a SIGTERM, once LastCheckpoint has saved
        return stopped("SIGTERM", trainer.global_step, last_checkpoint, SIGTERM_STATUS)
    if last_checkpoint.interrupted_at is not None:
        return stopped("Ctrl-C", last_checkpoint.interrupted_at, last_checkpoint, SIGINT_STATUS)
    if trainer.is_global_zero:
        print(f"done: {trainer.global_step} steps; checkpoint {last}; image grids in {out / 'image_log'}")
        if data.skipped():
            print(data.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
