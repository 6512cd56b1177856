"""Command line for ControlNet generation: `python -m cldm.generate --config C --ckpt CKPT --prompt P ...`.

One unit comes from the unit flags (`--image`, `--preprocessor`, `--weight`, ...); several come from
`--units FILE.yaml|json`, a list of mappings with the `ControlUnit` fields, where `model` may be the path of a
further control file (relative paths are read from the units file's folder). Every PNG written carries a
JSON record of all settings under the text key "controlnet", with short sha256s of each file involved;
`--from-png FILE` re-runs that record, and flags given on the command line override it (unit flags apply to
the first unit); a record from a batch re-runs the whole batch, whose image at the recorded `index` is the
one reproduced. User errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from cldm.annotators import PREPROCESSORS
from cldm.control import CONTROL_MODES
from cldm.control_image import RESIZE_MODES
from cldm.generation import (
    DEFAULT_CFG_SCALE,
    RECORD_ONLY_KEYS,
    SAMPLERS,
    ControlNetPipeline,
    ControlUnit,
    load_image,
    record_hash,
)
from ldm.errors import DEBUG_HELP, InputError, MissingFileError, command_line

PNG_KEY = "controlnet"
RECORD_VERSION = 1
RUN_DEFAULTS: dict[str, Any] = {
    "negative_prompt": "", "width": None, "height": None, "steps": 20, "cfg_scale": DEFAULT_CFG_SCALE,
    "seed": 0, "sampler": "ddim", "eta": 0.0, "batch_size": 1, "low_vram": False,
    "original_size": None, "crop_top_left": None, "target_size": None,
}
UNIT_FLAGS = ("image", "preprocessor", "threshold_a", "threshold_b", "annotator_resolution", "pixel_perfect",
              "invert", "rgb_to_bgr", "resize_mode", "weight", "guidance_start", "guidance_end", "control_mode",
              "guess_mode")

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """Every option defaults to None so that a `--from-png` record fills what the command line leaves out."""
    p = argparse.ArgumentParser(prog="python -m cldm.generate", description=__doc__.splitlines()[0],
                                epilog=DEBUG_HELP)
    flag = argparse.BooleanOptionalAction
    models = p.add_argument_group("model")
    models.add_argument("--config", help="model YAML, e.g. models/cldm_v15.yaml")
    models.add_argument("--ckpt", help="full ControlLDM checkpoint, or a control-only file with --base")
    models.add_argument("--base", help="Stable Diffusion checkpoint for a control-only --ckpt")
    models.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    models.add_argument("--annotator_dir", help="annotator weights folder (default models/annotators)")
    models.add_argument("--half", action=flag,
                        help="networks in float16 on a GPU (bfloat16 on a CPU, which this does not speed up): "
                             "half the weights' memory (not faster at batch 1 on an H100: launch-bound)")
    run = p.add_argument_group("generation")
    run.add_argument("--prompt")
    run.add_argument("--negative_prompt")
    run.add_argument("--width", type=int, help="default: the model's own size (512 for SD1.5/2.1, 1024 for SDXL)")
    run.add_argument("--height", type=int, help="default: the model's own size")
    run.add_argument("--steps", type=int)
    run.add_argument("--cfg_scale", type=float, help=f"default {DEFAULT_CFG_SCALE}, the original demos' value")
    run.add_argument("--seed", type=int, help="default 0; -1 picks one at random (and records it)")
    run.add_argument("--sampler", choices=tuple(SAMPLERS))
    run.add_argument("--eta", type=float, help="DDIM noise; DPM++ 2M ignores it")
    run.add_argument("--batch_size", type=int)
    run.add_argument("--low_vram", action=flag, help="keep only the part in use on the accelerator")
    run.add_argument("--original_size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                     help="SDXL: the size the image is conditioned as coming from (default: the output size)")
    run.add_argument("--crop", dest="crop_top_left", type=int, nargs=2, metavar=("TOP", "LEFT"),
                     help="SDXL: the crop offset it is conditioned on (default 0 0)")
    run.add_argument("--target_size", type=int, nargs=2, metavar=("HEIGHT", "WIDTH"),
                     help="SDXL: the target size it is conditioned on (default: the output size)")
    unit = p.add_argument_group("control unit (one; use --units for several)")
    unit.add_argument("--image", help="control image file")
    unit.add_argument("--preprocessor", help=f"one of: {', '.join(PREPROCESSORS)}")
    unit.add_argument("--threshold_a", type=float)
    unit.add_argument("--threshold_b", type=float)
    unit.add_argument("--annotator_resolution", type=int)
    unit.add_argument("--pixel_perfect", action=flag)
    unit.add_argument("--invert", action=flag)
    unit.add_argument("--rgb_to_bgr", action=flag)
    unit.add_argument("--resize_mode", choices=RESIZE_MODES)
    unit.add_argument("--weight", type=float)
    unit.add_argument("--guidance_start", type=float)
    unit.add_argument("--guidance_end", type=float)
    unit.add_argument("--control_mode", choices=CONTROL_MODES,
                      help="balanced | prompt (my prompt is more important) | controlnet (ControlNet is more "
                           "important)")
    unit.add_argument("--guess_mode", action=flag)
    unit.add_argument("--units", help="YAML or JSON list of units, each with its own image and model path")
    out = p.add_argument_group("output")
    out.add_argument("--out", help="output PNG (a batch writes OUT-0.png, OUT-1.png, ...)")
    out.add_argument("--save_control", action=flag, help="also write each unit's control map")
    out.add_argument("--from-png", dest="from_png", help="re-run the settings recorded in a PNG from this tool")
    return p


def read_record(path: str | Path) -> dict[str, Any]:
    """The settings record of a PNG this tool wrote."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: PNG file not found")
    try:
        with Image.open(path) as img:
            text = getattr(img, "text", {}).get(PNG_KEY)
    except OSError as err:
        raise InputError(f"{path}: not a readable PNG ({type(err).__name__})") from err
    if text is None:
        raise InputError(f"{path}: has no {PNG_KEY!r} settings record (was it written by cldm.generate?)")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}: damaged settings record ({err.msg})") from err
    if not isinstance(record, dict) or record.get("version") != RECORD_VERSION:
        raise InputError(f"{path}: settings record of an unknown version")
    return record


def read_units_file(path: str | Path) -> list[dict[str, Any]]:
    """Unit mappings from YAML/JSON; relative image and model paths are taken from the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: units file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML/JSON ({type(err).__name__})") from err
    if isinstance(data, dict) and "units" in data:
        data = data["units"]
    if not isinstance(data, list) or not all(isinstance(u, dict) for u in data):
        raise InputError(f"{path}: expected a list of unit mappings")
    units = []
    for entry in data:
        unit = dict(entry)
        for key in ("image", "model"):
            value = unit.get(key)
            if isinstance(value, str) and not value.isdigit() and not Path(value).is_absolute():
                unit[key] = str(path.parent / value)
        units.append(unit)
    return units


def _pick(args: argparse.Namespace, record: dict[str, Any], key: str, default: Any = None) -> Any:
    value = getattr(args, key)
    return value if value is not None else record.get(key, default)


def resolve_units(args: argparse.Namespace, record: dict[str, Any]) -> list[dict[str, Any]]:
    """Units from --units, else the record; unit flags then override the first (or make the only) unit."""
    if args.units is not None:
        units = read_units_file(args.units)
    else:
        units = [{k: v for k, v in u.items() if k not in RECORD_ONLY_KEYS} for u in record.get("units", [])]
    given = {k: getattr(args, k) for k in UNIT_FLAGS if getattr(args, k) is not None}
    if given:
        if not units:
            if "image" not in given:
                raise InputError("unit flags need --image (the control image)")
            units = [{}]
        units[0] = {**units[0], **given}
    return units


def _record_file(entry: dict[str, Any] | None) -> str | None:
    return None if not entry else entry["path"]


def _warn_if_changed(entry: dict[str, Any] | None, what: str) -> None:
    if entry and entry.get("sha256") and Path(entry["path"]).is_file():
        if record_hash(entry["path"]) != entry["sha256"]:
            log.warning("%s %s differs from the recorded file: the result will differ", what, entry["path"])


def generate(args: argparse.Namespace) -> list[Path]:
    """Run one command line; returns the files written."""
    record = read_record(args.from_png) if args.from_png else {}
    try:
        prompt = _pick(args, record, "prompt")
        config = _pick(args, record, "config")
        ckpt = args.ckpt if args.ckpt is not None else _record_file(record.get("ckpt"))
        base = args.base if args.base is not None else _record_file(record.get("base"))
    except (KeyError, TypeError) as err:
        raise InputError(f"{args.from_png}: malformed settings record ({err})") from err
    for name, value in (("--prompt", prompt), ("--config", config), ("--ckpt", ckpt)):
        if value is None:
            raise InputError(f"{name} is required (or --from-png)")
    run = {key: _pick(args, record, key, default) for key, default in RUN_DEFAULTS.items()}
    if run["seed"] == -1:
        run["seed"] = secrets.randbelow(2**31)
    unit_dicts = resolve_units(args, record)
    if record:
        for what in ("ckpt", "base"):
            if getattr(args, what) is None:
                _warn_if_changed(record.get(what), what)
        for u in unit_dicts:
            if args.units is None and isinstance(u.get("image"), str) and u.get("image_sha256"):
                _warn_if_changed({"path": u["image"], "sha256": u["image_sha256"]}, "image")

    extra_controls: list[str] = []
    for u in unit_dicts:
        model = u.get("model", 0)
        if isinstance(model, str) and not model.isdigit() and Path(model) != Path(ckpt) \
                and model not in extra_controls:
            extra_controls.append(model)
    units = [ControlUnit.from_dict(u) for u in unit_dicts]
    for unit in units:
        load_image(unit.image)  # a missing or unreadable image fails before the models load
    out = Path(args.out) if args.out else (Path(args.from_png).with_name(Path(args.from_png).stem + "-rerun.png")
                                           if args.from_png else None)
    if out is None:
        raise InputError("--out is required")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    annotator_dir = _pick(args, record, "annotator_dir")
    half = bool(_pick(args, record, "half"))
    dtype = (torch.float16 if torch.device(device).type == "cuda" else torch.bfloat16) if half else torch.float32
    pipeline = ControlNetPipeline.from_checkpoints(config, ckpt, base, extra_controls, device=device,
                                                   annotator_dir=annotator_dir, dtype=dtype)
    result = pipeline(prompt, units, progress=True, **run)

    settings = dict(result.settings)
    models = settings.pop("models")
    base_record = {"version": RECORD_VERSION, **settings, **models, "annotator_dir": annotator_dir, "half": half}
    out.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for i, image in enumerate(result.images):
        path = out if len(result.images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}")
        info = PngInfo()
        info.add_text(PNG_KEY, json.dumps({**base_record, "index": i}))
        image.save(path, format="PNG", pnginfo=info)
        written.append(path)
    if args.save_control:
        for k, control_map in enumerate(result.control_maps):
            path = out.with_name(f"{out.stem}-control{k}.png")
            control_map.save(path, format="PNG")
            written.append(path)
    return written


@command_line
def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    written = generate(args)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
