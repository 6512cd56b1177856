"""Checkpoint files for the tools: writing them safely, and telling what a state dict holds.

Writing: checkpoints are written to a temporary file in the destination's folder, flushed to disk (fsync) and only
then moved into place, so OUTPUT is either absent or complete. By default an existing file is never
replaced: tools that derive one checkpoint from another must not destroy a user's weights by a typo.

Reading: `key_groups` names the parts of a state dict for summaries, and `config_for_unet` picks the
bundled config that fits a checkpoint's UNet, so the tools say "use models/cldm_v21.yaml" instead of
failing on the first of hundreds of mismatched shapes.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from cldm.model import CONFIG_FOR_CONTEXT_DIM, CheckpointError, context_dim_of, describe_family

#: Key prefixes of the parts of a ControlLDM checkpoint.
UNET_PREFIX = "model.diffusion_model."
CONTROL_PREFIX = "control_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
#: Submodules only a ControlNet has: a file holding them without a prefix is a control-only checkpoint.
CONTROL_ONLY_PARTS = ("input_hint_block.", "zero_convs.", "middle_block_out.")
#: Extensions that `save_state_dict` writes with `torch.save` (the others: `.safetensors`).
TORCH_SUFFIXES = (".ckpt", ".pth", ".pt")
SAFETENSORS_SUFFIX = ".safetensors"


def check_output_path(path: str | Path) -> Path:
    """Fail before any work is done when OUTPUT cannot be written: it exists, or its type is unknown."""
    out = Path(path)
    if out.suffix not in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
        raise ValueError(f"{out}: unknown checkpoint extension {out.suffix!r} (use .ckpt, .pth or .safetensors)")
    if out.exists():
        raise FileExistsError(f"{out}: already exists; refusing to overwrite it (choose another name)")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{out.parent}: output folder does not exist")
    return out


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | Path, *, overwrite: bool = False) -> Path:
    """Write `state_dict` to PATH atomically: `.ckpt`/`.pth` as `{"state_dict": sd}`, else `.safetensors`.

    Without `overwrite` an existing PATH is kept and `FileExistsError` raised, also when another process
    creates it while this one is writing (the final step is a hard link, which refuses to replace).
    """
    out = Path(path)
    if out.suffix not in (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX):
        raise ValueError(f"{out}: unknown checkpoint extension {out.suffix!r} (use .ckpt, .pth or .safetensors)")
    if not overwrite and out.exists():
        raise FileExistsError(f"{out}: already exists; refusing to overwrite it")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if out.suffix == SAFETENSORS_SUFFIX:
            _write_safetensors(state_dict, tmp)
        else:
            torch.save({"state_dict": dict(state_dict)}, tmp)
        _fsync_file(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes the file private; give it the usual permissions
        _move_into_place(tmp, out, overwrite)
        _fsync_dir(out.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return out


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes as stored (before any decoding), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_short(path: str | Path, length: int = 10) -> str:
    """First `length` hex digits of a file's SHA-256: enough to tell checkpoints apart in logs and reports."""
    return file_sha256(path)[:length]


def _write_safetensors(state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
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
    save_file(tensors, str(path))


def _move_into_place(tmp: Path, out: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, out)
        return
    try:
        os.link(tmp, out)  # atomic and never replaces an existing file
    except FileExistsError as err:
        raise FileExistsError(f"{out}: already exists; refusing to overwrite it") from err
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
            raise
        if out.exists():  # a file system without hard links: check, then rename
            raise FileExistsError(f"{out}: already exists; refusing to overwrite it") from err
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


# ----- what a state dict holds ---------------------------------------------------------------------------
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


def config_for_unet(state_dict: Mapping[str, torch.Tensor], prefix: str, label: str) -> str:
    """The bundled config whose UNet has the text width of the checkpoint's (768: v15, 1024: v21)."""
    width = context_dim_of(state_dict, prefix)
    if width is None:
        raise CheckpointError(f"{label}: cannot tell the Stable Diffusion version (no {prefix}"
                              "...attn2.to_k weight): pass --config")
    config = CONFIG_FOR_CONTEXT_DIM.get(width)
    if config is None:
        raise CheckpointError(f"{label}: {describe_family(width)}, which no bundled config builds: pass --config")
    return config


def family_mismatch(state_dict: Mapping[str, torch.Tensor], prefix: str, expected: Mapping[str, torch.Tensor],
                    expected_prefix: str) -> tuple[int, int] | None:
    """(checkpoint's, config's) text width of the UNet-like weights under the prefixes, when they differ."""
    have, want = context_dim_of(state_dict, prefix), context_dim_of(expected, expected_prefix)
    return None if have is None or want is None or have == want else (have, want)


def advice_for_width(width: int) -> str:
    config = CONFIG_FOR_CONTEXT_DIM.get(width)
    return f"use {config}" if config else f"use a config with context_dim {width}"


def shape_mismatches(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor],
                     keys: Iterable[str]) -> list[str]:
    """Keys that both hold but with different shapes, each as `key [have] vs [want]`."""
    return [f"{k} {list(state_dict[k].shape)} vs {list(expected[k].shape)}" for k in keys
            if k in state_dict and k in expected and state_dict[k].shape != expected[k].shape]
