"""Export a trained ControlNet to the files people generate with: the web UI's ControlNet extension, ComfyUI, diffusers.

SRC is a training run's `last.ckpt`, a full ControlLDM checkpoint, or any control file (control-only, diffusers
folder or file, or a difference file with --base). OUT is written atomically and never replaces a file:

    python tool_export_control.py runs/train/last.ckpt control_mine.safetensors             # control-only, fp16
    python tool_export_control.py runs/train/last.ckpt control_mine.pth --dtype fp32
    python tool_export_control.py runs/train/last.ckpt control_mine_diff.safetensors --diff  # over SRC's own UNet
    python tool_export_control.py runs/train/last.ckpt control_mine_diffusers --format diffusers
    python tool_export_control.py --info control_mine.safetensors                           # what a file holds

A `.safetensors` output carries metadata (base family, the ControlNet's config, training steps, a hash of the base
UNet, this command line) in its header; `--info` prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cldm.checkpoint import (
    CONTROL_PREFIX,
    CheckpointError,
    atomic_folder,
    check_control_fits,
    check_output_path,
    config_for_unet,
    context_dim_of,
    control_weights,
    describe_family,
    family_of,
    key_groups,
    read_checkpoint,
    save_state_dict,
    unet_weights,
)
from cldm.formats import (
    DIFFUSERS_CONFIG,
    DIFFUSERS_WEIGHTS,
    METADATA_PREFIX,
    EncoderLayout,
    difference,
    diffusers_config,
    metadata,
    tensor_digest,
    to_diffusers,
    undo_difference,
)
from cldm.model import load_config
from ldm.errors import DEBUG_HELP, InputError, command_line
from ldm.util import instantiate_from_config

FORMATS = ("control", "diffusers")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def control_stage_config(config: str | Path) -> Any:
    """The ControlNet part of a model config (what an exported file records as its architecture)."""
    params = load_config(config).model.get("params") or {}
    if "control_stage_config" not in params:
        raise InputError(f"{config}: has no model.params.control_stage_config (not a ControlLDM config)")
    return params.control_stage_config


def size_embedding_width(config: str | Path) -> int | None:
    """An SDXL config's width of each size number's embedding (its conditioner's `ConcatTimestepEmbedderND`
    outdim); None for configs without a conditioner."""
    params = load_config(config).model.get("params") or {}
    conditioner = params.get("conditioner_config")
    if conditioner is None:
        return None
    widths = {int(entry.params.outdim) for entry in conditioner.params.emb_models
              if str(entry.target).endswith("ConcatTimestepEmbedderND")}
    if len(widths) != 1:
        raise InputError(f"{config}: expected one size embedding width in conditioner_config, found {sorted(widths)}")
    return widths.pop()


def export_control(src: str | Path, out: str | Path, *, fmt: str = "control", dtype: str = "fp16", diff: bool = False,
                   base: str | Path | None = None, config: str | Path | None = None,
                   command: str | None = None) -> dict[str, Any]:
    """Write SRC's ControlNet to OUT in `fmt` (`control`, or `diffusers`: a folder), in `dtype`; returns a report."""
    if fmt not in FORMATS:
        raise InputError(f"unknown format {fmt!r}; known: {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPES)}")
    if diff and fmt != "control":
        raise InputError("the difference layout is a control file; it does not combine with --format diffusers")
    out = Path(out)
    if fmt == "control":
        check_output_path(out)
    source = read_checkpoint(src)
    base_unet = unet_weights(read_checkpoint(base).tensors) if base is not None else unet_weights(source.tensors)
    control = control_weights(source.tensors, src, base_unet or None)
    config = str(config) if config is not None else config_for_unet(control, "", str(src))
    net_config = control_stage_config(config)
    with torch.device("meta"):  # names, shapes and architecture: nothing allocated
        net = instantiate_from_config(net_config)
    check_control_fits(control, nn.Module.state_dict(net), str(src), config)
    if diff and not base_unet:
        raise CheckpointError(f"{src}: holds no UNet to take the difference over: pass --base")
    cast = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in control.items()}
    width = context_dim_of(control, "")
    family = family_of(width)
    earlier = source.metadata  # a control file exported before passes its provenance on
    info = metadata({
        "format": "diff" if diff else fmt, "family": family.name if family else describe_family(width),
        "dtype": dtype, "config": net_config,
        "steps": source.extras.get("global_step", earlier.get("controlnet.steps")),
        "base_unet_sha256": tensor_digest(base_unet) if base_unet else earlier.get("controlnet.base_unet_sha256"),
        "source": str(src), "command": command,
    })
    inexact = 0
    if fmt == "diffusers":
        # first: a ControlNet diffusers cannot express is refused plainly
        config_json = diffusers_config(net, size_embedding_width(config))
        tensors = to_diffusers(cast, EncoderLayout.of(net))
        atomic_folder(out, lambda tmp: _fill_diffusers_folder(tmp, tensors, config_json, info))
    else:
        tensors = difference(cast, base_unet) if diff else cast
        if diff:
            rebuilt = undo_difference(tensors, base_unet)
            inexact = sum(int((rebuilt[k] != v).sum()) for k, v in cast.items())
        tensors = {(CONTROL_PREFIX + k if k in cast else k): v for k, v in tensors.items()}
        save_state_dict(tensors, out, metadata=info)
    return {"source": str(src), "output": str(out), "format": "diff" if diff else fmt, "dtype": dtype,
            "config": config, "inexact": inexact, "tensors": len(tensors),
            "groups": key_groups(CONTROL_PREFIX + k for k in cast), "bytes": _size(out)}


def _fill_diffusers_folder(folder: Path, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                           info: Mapping[str, str]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / DIFFUSERS_WEIGHTS), metadata=dict(info))
    (folder / DIFFUSERS_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def describe(path: str | Path) -> list[str]:
    """What `--info` prints: the file's tensors and its `controlnet.*` metadata."""
    checkpoint = read_checkpoint(path)
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in checkpoint.tensors.values()})
    size = sum(v.numel() * v.element_size() for v in checkpoint.tensors.values())
    lines = [f"{checkpoint.path}: {len(checkpoint.tensors)} tensors, {', '.join(dtypes)}, {size / 1e6:.1f} MB"]
    found = {k[len(METADATA_PREFIX):]: v for k, v in checkpoint.metadata.items() if k.startswith(METADATA_PREFIX)}
    lines += [f"  {name}: {value}" for name, value in found.items()] or ["  no controlnet metadata (only exported "
                                                                          ".safetensors files carry it)"]
    return lines


@command_line
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=DEBUG_HELP)
    parser.add_argument("src", nargs="?", help="last.ckpt, a full ControlLDM checkpoint, or a control file/folder")
    parser.add_argument("out", nargs="?", help="output file (.safetensors or .pth), or folder for --format diffusers")
    parser.add_argument("--format", default="control", choices=FORMATS,
                        help="control: control_model.* tensors (web UI, ComfyUI); diffusers: a ControlNetModel folder")
    parser.add_argument("--dtype", default="fp16", choices=tuple(DTYPES))
    parser.add_argument("--diff", action="store_true", help="the web UI's difference layout (needs a base UNet)")
    parser.add_argument("--base", help="the Stable Diffusion checkpoint the control was trained on (default: SRC's "
                                       "own UNet, when SRC is a full checkpoint)")
    parser.add_argument("--config", help="model config (default: the bundled one of SRC's family)")
    parser.add_argument("--info", metavar="FILE", help="print what FILE holds, and its metadata")
    args = parser.parse_args(argv)
    if args.info:
        print("\n".join(describe(args.info)))
        return 0
    if not args.src or not args.out:
        parser.error("SRC and OUT are required (or --info FILE)")
    report = export_control(args.src, args.out, fmt=args.format, dtype=args.dtype, diff=args.diff, base=args.base,
                            config=args.config, command=" ".join(["tool_export_control.py", *sys.argv[1:]]))
    print(f"config: {report['config']}")
    print(f"written: {report['output']} ({report['format']}, {report['dtype']}, {report['tensors']} tensors, "
          f"{report['bytes'] / 1e6:.1f} MB)")
    if report["format"] == "diff":
        print("base + difference reproduces the control exactly" if not report["inexact"] else
              f"note: base + difference misses the control by a rounding step at {report['inexact']} values "
              "(where the control moved further from its base than the base's own size)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
