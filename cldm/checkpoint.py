"""Checkpoint files and what they hold: the one place for prefixes, base families, reading, writing, fit checks and
control-weight extraction. `load_state_dict`, `ControlLDM.load_state_dict`, both tools, training and the generation
pipeline use it, so a file is read, judged and explained the same way everywhere.

Reading is safe: pickled files load with `weights_only=True`, and every bad file is a one-line `CheckpointError`
naming it. Writing is atomic: a temporary file in the destination's folder, flushed to disk (fsync), then moved
into place, so OUTPUT is either absent or complete; an existing file is never replaced unless asked, because tools
that derive one checkpoint from another must not destroy a user's weights by a typo.

A base *family* (SD1.x, SD2.x, SDXL) is told by the text width of the UNet's cross-attention; `FAMILIES` names the
bundled config that builds each, so errors say "use models/cldm_v21.yaml" instead of failing on the first of
hundreds of mismatched shapes. Bundled configs resolve from the project's `models/` folder beside the packages (the
editable install the set-up makes), not from the working directory.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pickle
import re
import shutil
import tempfile
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cldm.formats import (
    DIFFERENCE_KEY,
    DIFFUSERS_CONFIG,
    PIPELINE_INDEX,
    UNET_PREFIX,
    from_diffusers,
    is_diffusers_controlnet,
    part_tensors,
    sd_from_diffusers_pipeline,
    shard_index,
    undo_difference,
    weights_file,
)
from ldm.errors import InputError, MissingFileError, OutputExistsError, UserError, one_line

# ----- errors ------------------------------------------------------------------------------------------------


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file that is missing, unreadable, truncated or not a model checkpoint."""


class CheckpointMismatchError(CheckpointError):
    """A readable checkpoint that does not fit the model built from the config (or another checkpoint)."""


# ----- layout ------------------------------------------------------------------------------------------------
#: Key prefixes of the parts of a ControlLDM checkpoint (those of SD itself are defined with its layouts).
CONTROL_PREFIX = "control_model."
#: Submodules only a ControlNet has: a file holding them without a prefix is a control-only checkpoint.
CONTROL_ONLY_PARTS = ("input_hint_block.", "zero_convs.", "middle_block_out.")
#: The first cross-attention key of SD1.x/2.x UNets and ControlNets; its input width is the text width.
CROSS_ATTN_KEY = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
#: Extensions that `save_state_dict` writes with `torch.save` (the others: `.safetensors`).
TORCH_SUFFIXES = (".ckpt", ".pth", ".pt")
SAFETENSORS_SUFFIX = ".safetensors"
#: How `atomic_write` names its temporary files (`.NAME.<random>.tmp` beside NAME).
TEMPORARY_SUFFIX = ".tmp"

# ----- families ----------------------------------------------------------------------------------------------
#: The bundled configs (`models/*.yaml`), beside the packages.
MODELS_DIR = Path(__file__).resolve().parent.parent / "models"


@dataclass(frozen=True)
class Family:
    """A Stable Diffusion base family: its name, the text width of its cross-attention, its bundled config."""

    name: str
    context_dim: int
    config_name: str

    @property
    def config(self) -> Path:
        return MODELS_DIR / self.config_name


FAMILIES = (Family("SD1.x", 768, "cldm_v15.yaml"), Family("SD2.x", 1024, "cldm_v21.yaml"),
            Family("SDXL", 2048, "cldm_xl.yaml"))


def family_of(context_dim: int | None) -> Family | None:
    return next((f for f in FAMILIES if f.context_dim == context_dim), None)


def display_path(path: str | Path) -> str:
    """A path as a user in the current folder would type it: relative when it is below it."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def context_dim_of(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int | None:
    """Text width that a UNet's or ControlNet's weights under `prefix` were trained with (768 SD1.x, 1024 SD2.x,
    2048 SDXL, whose first level has no attention: its first cross-attention is found by name)."""
    weight = state_dict.get(prefix + CROSS_ATTN_KEY)
    if weight is None:
        weight = next((v for k, v in state_dict.items()
                       if k.startswith(prefix) and k.endswith(".attn2.to_k.weight")), None)
    return None if weight is None or weight.dim() != 2 else int(weight.shape[1])


def describe_family(context_dim: int | None) -> str:
    """`an SD1.x model (text width 768)`: how errors name a checkpoint's family."""
    family = family_of(context_dim)
    return f"an {family.name} model (text width {context_dim})" if family else f"a model with text width {context_dim}"


def advice_for_width(width: int) -> str:
    family = family_of(width)
    return f"use {display_path(family.config)}" if family else f"use a config with context_dim {width}"


def config_for_unet(state_dict: Mapping[str, torch.Tensor], prefix: str, label: str) -> str:
    """The bundled config whose UNet has the text width of the checkpoint's (768: v15, 1024: v21)."""
    width = context_dim_of(state_dict, prefix)
    if width is None:
        raise CheckpointError(f"{label}: cannot tell the Stable Diffusion version (no {prefix}"
                              "...attn2.to_k weight): pass --config")
    family = family_of(width)
    if family is None:
        raise CheckpointError(f"{label}: {describe_family(width)}, which no bundled config builds: pass --config")
    return display_path(family.config)


def check_family(state_dict: Mapping[str, torch.Tensor], prefix: str, want: int | None, label: str,
                 config: str | Path) -> None:
    """Weights under `prefix` of one family do not fit a config of another: say so, and which config fits."""
    have = context_dim_of(state_dict, prefix)
    if have is not None and want is not None and have != want:
        raise CheckpointMismatchError(f"{label}: is {describe_family(have)} but {config} builds "
                                      f"{describe_family(want)}: {advice_for_width(have)}")


# ----- reading -----------------------------------------------------------------------------------------------
def get_state_dict(d: Mapping[str, Any]) -> Mapping[str, Any]:
    """Unwrap Lightning's and the original's `{'state_dict': ...}` container."""
    return d.get("state_dict", d)


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint file holds: its tensors (unwrapped from `{'state_dict': ...}`), the other top-level
    entries of a pickled file (Lightning's `global_step`, `epoch`, ...) and a safetensors file's metadata."""

    path: Path
    tensors: dict[str, torch.Tensor]
    extras: dict[str, Any]
    metadata: dict[str, str]


def read_checkpoint(ckpt_path: str | Path, location: str | torch.device = "cpu") -> Checkpoint:
    """Read a `.ckpt`/`.pth` (safely: `weights_only=True`) or `.safetensors` file, or a diffusers model folder."""
    path = Path(ckpt_path)
    _check_location(location)
    def tensors_of(file: Path) -> dict[str, torch.Tensor]:  # one weights file of a diffusers folder
        return read_checkpoint(file, location).tensors

    if path.is_dir() and (path / PIPELINE_INDEX).is_file():
        try:
            tensors = sd_from_diffusers_pipeline(path, tensors_of)
        except InputError as err:
            raise CheckpointError(f"{path}: not a Stable Diffusion pipeline this project reads ({one_line(err)})") \
                from err
        return Checkpoint(path, tensors, {}, {})
    if path.is_dir() and (path / DIFFUSERS_CONFIG).is_file():  # a diffusers model folder: its weights file(s)
        try:
            if shard_index(path) is not None:
                return Checkpoint(path, part_tensors(path, tensors_of), {}, {})
            path = weights_file(path)
        except InputError as err:
            raise CheckpointError(str(err)) from err
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    metadata: dict[str, str] = {}
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            state: Any = load_file(str(path), device=str(location))
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
        except MemoryError:
            raise
        except Exception as err:  # the device was checked: a failure to parse means the file is not readable
            raise CheckpointError(f"{path}: not a readable safetensors file ({one_line(err)})") from err
    else:
        try:
            with warnings.catch_warnings():  # torch warns about pickle protocols before refusing a file anyway
                warnings.simplefilter("ignore", UserWarning)
                state = torch.load(path, map_location=location, weights_only=True)
        except MemoryError:
            raise
        except Exception as err:  # the device was checked: whatever fails parsing the user's file, it is the file
            raise CheckpointError(f"{path}: {_unreadable(path, err)}") from err
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    extras = {k: v for k, v in state.items() if k != "state_dict" and not isinstance(v, torch.Tensor)}
    state = get_state_dict(state)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, Mapping) else {}
    if not tensors:
        raise CheckpointError(f"{path}: contains no tensors")
    return Checkpoint(path, tensors, extras, metadata)


def load_state_dict(ckpt_path: str | Path, location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (see `read_checkpoint`): the original's entry point."""
    return read_checkpoint(ckpt_path, location).tensors


def _check_location(location: str | torch.device) -> None:
    """A device to load onto that this machine has (so that a failure to load is the file's, not the machine's)."""
    try:
        device = torch.device(location)
    except (RuntimeError, TypeError) as err:
        raise InputError(f"{location!r} is not a device (use 'cpu' or 'cuda')") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"cannot load onto {location}: this machine has no CUDA device (use 'cpu')")


#: How torch words the refusal of a pickled object that is not a tensor (2.4-2.13).
_REFUSED_GLOBAL = re.compile(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)")
_ZIP_MAGIC = b"PK\x03\x04"


def _unreadable(path: Path, err: BaseException) -> str:
    """Why a weights-only load refused a `.ckpt`/`.pth` file, in plain words (torch's message is long and styled)."""
    refused = _REFUSED_GLOBAL.search(str(err))
    if refused:
        return (f"refused for safety: it holds pickled code or objects that are not weights ({refused.group(1)}), "
                "which are never run here; use a .safetensors file, or a state dict saved with torch.save")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == _ZIP_MAGIC:
        return f"corrupt or truncated checkpoint ({one_line(err)})"
    if head[:1] == b"\x80" and isinstance(err, pickle.UnpicklingError):
        return ("refused for safety: a pickle that holds more than tensors (or uses pickle features a weights-only "
                "load refuses); use a .safetensors file, or a state dict saved with torch.save")
    return "not a checkpoint (neither a PyTorch zip archive nor a pickle of tensors)"


def atomic_folder(path: str | Path, fill: Callable[[Path], None]) -> Path:
    """Make folder PATH so that it is never seen half-written: `fill(tmp)` fills a temporary folder beside it
    (`.PATH.*.tmp`), which is then renamed into place. An existing PATH is never replaced."""
    out = Path(path)
    if out.exists():
        raise OutputExistsError(f"{out}: already exists; refusing to overwrite it (choose another name)")
    if not out.parent.is_dir():
        raise MissingFileError(f"{out.parent}: output folder does not exist")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=TEMPORARY_SUFFIX, dir=out.parent))
    try:
        fill(staging)
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes the folder private; give it the usual permissions
        if out.exists():  # made meanwhile: rename would replace an empty folder
            raise OutputExistsError(f"{out}: already exists; refusing to overwrite it")
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> Any:
    """Read `path` and load it into `model`; a misfit is one line that names the file."""
    state = load_state_dict(path)
    try:
        return model.load_state_dict(state, strict=strict)
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(f"{path}: {err}") from err


# ----- writing -----------------------------------------------------------------------------------------------
def _check_extension(out: Path) -> None:
    if out.suffix not in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
        raise InputError(f"{out}: unknown checkpoint extension {out.suffix!r} (use .ckpt, .pth or .safetensors)")


def check_output_path(path: str | Path) -> Path:
    """Fail before any work is done when OUTPUT cannot be written: it exists, or its type is unknown."""
    out = Path(path)
    _check_extension(out)
    if out.exists():
        raise OutputExistsError(f"{out}: already exists; refusing to overwrite it (choose another name)")
    if not out.parent.is_dir():
        raise MissingFileError(f"{out.parent}: output folder does not exist")
    return out


def atomic_write(path: str | Path, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Write PATH so that it is never seen half-written: `write(tmp)` fills a temporary file beside it (named
    `.PATH.*.tmp`), which is flushed to disk, given the usual permissions and only then moved into place.

    Without `overwrite` an existing PATH is kept and `OutputExistsError` raised, also when another process
    creates it while this one is writing (the final step is a hard link, which refuses to replace).
    """
    out = Path(path)
    if not overwrite and out.exists():
        raise OutputExistsError(f"{out}: already exists; refusing to overwrite it")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=TEMPORARY_SUFFIX, dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        _fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it the usual permissions
        _move_into_place(tmp, out, overwrite)
        _fsync_dir(out.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return out


def stale_temporaries(path: str | Path) -> list[Path]:
    """Temporary files that `atomic_write` left beside PATH when its process was killed mid-write."""
    out = Path(path)
    return sorted(out.parent.glob(f".{out.name}.*{TEMPORARY_SUFFIX}")) if out.parent.is_dir() else []


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | Path, *, overwrite: bool = False,
                    metadata: Mapping[str, str] | None = None) -> Path:
    """Write `state_dict` to PATH atomically: `.ckpt`/`.pth` as `{"state_dict": sd}`, else `.safetensors` (with
    `metadata` in its header; pickles have no header to carry it)."""
    out = Path(path)
    _check_extension(out)
    if out.suffix == SAFETENSORS_SUFFIX:
        return atomic_write(out, lambda tmp: _write_safetensors(state_dict, tmp, metadata), overwrite=overwrite)
    return atomic_write(out, lambda tmp: torch.save({"state_dict": dict(state_dict)}, tmp), overwrite=overwrite)


def check_resumable(path: str | Path) -> Path:
    """A Lightning checkpoint to resume from must be a complete zip archive; a killed copy or a truncated download
    is not (its central directory, at the end, is missing). Cheap: only the directory is read."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path}: truncated or not a checkpoint ({one_line(err)}): delete it to start "
                              "over, or resume from an intact copy") from err
    return path


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes as stored (before any decoding), read in 1 MiB blocks; for a folder (a diffusers
    model), of its files' names and bytes in name order."""
    path = Path(path)
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def sha256_short(path: str | Path, length: int = 10) -> str:
    """First `length` hex digits of a file's SHA-256: enough to tell checkpoints apart in logs and reports."""
    return file_sha256(path)[:length]


def _write_safetensors(state_dict: Mapping[str, torch.Tensor], path: Path,
                       metadata: Mapping[str, str] | None = None) -> None:
    """safetensors stores neither views nor tensors sharing memory: give each its own contiguous copy."""
    from safetensors.torch import save_file

    seen: set[tuple[int, int]] = set()
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        t = tensor.detach()
        storage = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) if t.numel() else None
        if storage is not None and storage in seen:
            t = t.clone()
        elif storage is not None:
            seen.add(storage)
        tensors[key] = t.contiguous()
    save_file(tensors, str(path), metadata=dict(metadata) if metadata else None)


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, out)
        return
    try:
        os.link(tmp, out)  # atomic and never replaces an existing file
    except FileExistsError as err:
        raise OutputExistsError(f"{out}: already exists; refusing to overwrite it") from err
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if out.exists():  # a file system without hard links: check, then rename
            raise OutputExistsError(f"{out}: already exists; refusing to overwrite it") from err
        os.replace(tmp, out)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(folder: Path) -> None:
    """Persist the new directory entry too; some platforms cannot open a folder, which is harmless."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----- what a state dict holds -------------------------------------------------------------------------------
def key_group(key: str) -> str:
    """The part a key belongs to, as a glob: `control_model.zero_convs.*`, `model_ema.*`, `betas`."""
    parts = key.split(".")
    depth = {"model": 3, "model_ema": 1}.get(parts[0], 2)
    if len(parts) <= depth:
        return key
    return ".".join(parts[:depth]) + ".*"


def key_groups(keys: Iterable[str]) -> dict[str, int]:
    """How many keys each part has, in first-seen order: a summary short enough to print."""
    return dict(Counter(key_group(k) for k in keys))


def shape_mismatches(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                     keys: Iterable[str]) -> list[str]:
    """Keys that both hold but with different shapes, each as `key [have] vs [want]`."""
    return [f"{k} {list(state_dict[k].shape)} vs {list(expected[k].shape)}" for k in keys
            if k in state_dict and k in expected and state_dict[k].shape != expected[k].shape]


def has_control(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict holds ControlNet weights, with the `control_model.` prefix or as a control-only file."""
    return (any(k.startswith((CONTROL_PREFIX, *CONTROL_ONLY_PARTS)) for k in state_dict)
            or is_diffusers_controlnet(state_dict))


def has_unet(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(UNET_PREFIX) for k in state_dict)


def control_weights(state_dict: Mapping[str, torch.Tensor], label: str | Path,
                    base_unet: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The ControlNet's weights under our names, without prefix, from any layout a control travels in: a full
    ControlLDM checkpoint, a control-only file (with or without `control_model.`), a diffusers ControlNet, or the
    web UI's difference file (which needs `base_unet`, the UNet it was taken over, without prefix)."""
    if is_diffusers_controlnet(state_dict):
        try:
            return from_diffusers(state_dict)
        except InputError as err:
            raise CheckpointError(f"{label}: {err}") from err
    prefixed = {k[len(CONTROL_PREFIX):]: v for k, v in state_dict.items() if k.startswith(CONTROL_PREFIX)}
    if prefixed and DIFFERENCE_KEY in state_dict:
        if base_unet is None:
            raise CheckpointError(f"{label}: a difference file (control minus its base UNet): also give the "
                                  "Stable Diffusion checkpoint it was taken over (--base)")
        return undo_difference(prefixed, base_unet)
    if prefixed:
        return prefixed
    if any(k.startswith(CONTROL_ONLY_PARTS) for k in state_dict):
        return dict(state_dict)
    what = ("a plain Stable Diffusion checkpoint without ControlNet weights" if has_unet(state_dict)
            else "no ControlNet weights")
    raise CheckpointError(f"{label}: holds {what} (no control_model.*, input_hint_block.* or zero_convs.* keys): "
                          "not a ControlNet")


def unet_weights(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Stable Diffusion checkpoint's UNet, without the `model.diffusion_model.` prefix."""
    return {k[len(UNET_PREFIX):]: v for k, v in state_dict.items() if k.startswith(UNET_PREFIX)}


def check_is_sd(state_dict: Mapping[str, torch.Tensor], label: str | Path) -> None:
    """A plain Stable Diffusion checkpoint in the original layout: a UNet, and no ControlNet yet."""
    if has_control(state_dict):
        raise CheckpointError(f"{label}: already has ControlNet weights: it is already a ControlNet "
                              "checkpoint (give a plain Stable Diffusion checkpoint)")
    if not has_unet(state_dict):
        raise CheckpointError(f"{label}: has no model.diffusion_model.* weights: not a Stable Diffusion "
                              "checkpoint in the original layout")


def check_fits(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], label: str,
               config: str | Path, keys: Iterable[str]) -> None:
    """Every one of `keys` of the config's model must be in the checkpoint, with its shape (family first)."""
    check_family(state_dict, UNET_PREFIX, context_dim_of(expected, UNET_PREFIX), label, config)
    keys = list(keys)
    wrong = shape_mismatches(state_dict, expected, keys)
    if wrong:
        raise CheckpointMismatchError(f"{label}: {len(wrong)} weights do not fit {config} (e.g. {wrong[0]})")
    missing = [k for k in keys if k not in state_dict]
    if missing:
        raise CheckpointMismatchError(f"{label}: lacks {len(missing)} weights that {config} needs "
                                      f"({', '.join(key_groups(missing))}; e.g. {missing[0]})")


def check_control_fits(control: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], label: str,
                       config: str | Path) -> None:
    """ControlNet weights (no prefix) must be exactly those of the config's ControlNet (`expected`, no prefix)."""
    check_family(control, "", context_dim_of(expected, ""), label, config)
    missing = [k for k in expected if k not in control]
    extra = [k for k in control if k not in expected]
    wrong = shape_mismatches(control, expected, expected)
    for problem, keys in (("lacks", missing), ("has unknown", extra), ("has wrongly shaped", wrong)):
        if keys:
            raise CheckpointMismatchError(f"{label}: {problem} ControlNet weights for {config}: "
                                          f"{len(keys)} (e.g. {keys[0]})")


def explain_mismatch(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """One line saying why a checkpoint does not fit `model`, and what to use instead; None when it does fit."""
    expected = nn.Module.state_dict(model)  # not a subclass override that may initialise weights first
    loadable = getattr(model, "loadable", None)  # what the model itself would load of the checkpoint
    state_dict = loadable(state_dict) if callable(loadable) else \
        {k: v for k, v in state_dict.items() if not k.startswith("model_ema.")}
    for prefix in (UNET_PREFIX, CONTROL_PREFIX):
        have, want = context_dim_of(state_dict, prefix), context_dim_of(expected, prefix)
        if have is not None and want is not None and have != want:
            return f"checkpoint is {describe_family(have)} but the config builds text width {want}: " \
                   f"{advice_for_width(have)}"
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing and not any(k.startswith(CONTROL_PREFIX) for k in state_dict) \
            and all(k.startswith(CONTROL_PREFIX) for k in missing):
        return ("checkpoint has no ControlNet weights (control_model.*): it is a plain Stable Diffusion "
                "checkpoint; make one with tool_add_control.py, or load it with strict=False")
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if keys:
            parts.append(f"{len(keys)} {label} (e.g. {keys[0]}; {', '.join(key_groups(keys))})")
    return "checkpoint does not fit this config: " + "; ".join(parts) if parts else None
