"""Building a model from a YAML config and reading checkpoint files, with one-line errors for bad input."""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.util import get_obj_from_str, instantiate_from_config

#: Text-embedding width of each Stable Diffusion family, its name, and the config that builds it.
FAMILY_OF_CONTEXT_DIM = {768: "SD1.x", 1024: "SD2.x"}
CONFIG_FOR_CONTEXT_DIM = {768: "models/cldm_v15.yaml", 1024: "models/cldm_v21.yaml"}
CROSS_ATTN_KEY = "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, unreadable, truncated or not a model checkpoint."""


def get_state_dict(d: Mapping[str, Any]) -> Mapping[str, Any]:
    """Unwrap Lightning's and the original's `{'state_dict': ...}` container."""
    return d.get("state_dict", d)


def load_state_dict(ckpt_path: str | Path, location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read the tensors of a `.ckpt`/`.pth` (safely: `weights_only=True`) or `.safetensors` file."""
    path = Path(ckpt_path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device=str(location))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from err
    else:
        try:
            state = torch.load(path, map_location=location, weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"{path}: {_unpickling_problem(str(err))}") from err
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
            first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({first_line})") from err
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict")
    state = get_state_dict(state)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: contains no tensors")
    return tensors


def _unpickling_problem(message: str) -> str:
    """Say in plain words why a weights-only load refused a file (torch's message is long and styled)."""
    message = re.sub(r"\x1b\[[0-9;]*m", "", message)
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", message)
    if refused:
        return (f"holds a pickled object ({refused.group(1)}) besides tensors, which a weights-only load "
                "refuses; only load such a file if you trust it, and re-save its state dict")
    if "invalid load key" in message or "could not find MARK" in message:
        return "not a checkpoint (neither a PyTorch zip archive nor a pickle)"
    return "not a readable checkpoint (the pickle inside is damaged)"


def context_dim_of(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int | None:
    """Text-embedding width that a UNet/ControlNet's weights were trained with (768 SD1.x, 1024 SD2.x)."""
    weight = state_dict.get(prefix + CROSS_ATTN_KEY)
    return None if weight is None else int(weight.shape[1])


def describe_family(context_dim: int | None) -> str:
    """`an SD1.x model (text width 768)`: how errors name a checkpoint's family."""
    family = FAMILY_OF_CONTEXT_DIM.get(context_dim or 0)
    return f"an {family} model (text width {context_dim})" if family else f"a model with text width {context_dim}"


def explain_mismatch(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> str:
    """One line saying why a checkpoint does not fit `model`, and what to use instead."""
    expected = nn.Module.state_dict(model)  # not a subclass override that may initialise weights first
    for prefix in ("model.diffusion_model.", "control_model."):
        have, want = context_dim_of(state_dict, prefix), context_dim_of(expected, prefix)
        if have is not None and want is not None and have != want:
            config = CONFIG_FOR_CONTEXT_DIM.get(have, "a config with context_dim " + str(have))
            family = FAMILY_OF_CONTEXT_DIM.get(have, "another")
            return (f"checkpoint is an {family} model (text width {have}) but the config builds text width "
                    f"{want}: use {config}")
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [k for k in expected if k in state_dict and state_dict[k].shape != expected[k].shape]
    if missing and all(k.startswith("control_model.") for k in missing):
        return ("checkpoint has no ControlNet weights (control_model.*): it is a plain Stable Diffusion "
                "checkpoint; make one with tool_add_control.py, or load it with strict=False")
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if keys:
            parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
    return "checkpoint does not fit this config: " + "; ".join(parts)


def load_config(config_path: str | Path) -> Any:
    path = Path(config_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    config = OmegaConf.load(path)
    if "model" not in config:
        raise ValueError(f"{path}: config has no top-level 'model' section")
    return config


def create_model(config_path: str | Path) -> nn.Module:
    """Build the model a YAML config's `model:` section describes, on the CPU.

    Diffusion models are built deferred (see `LatentDiffusion.build_deferred`): loading a checkpoint right
    after costs no random initialisation, and a model used without loading gets its random weights then.
    """
    from ldm.models.diffusion.ddpm import LatentDiffusion

    config = load_config(config_path)
    target = get_obj_from_str(config.model.target)
    if isinstance(target, type) and issubclass(target, LatentDiffusion):
        model = target.build_deferred(**config.model.get("params", {}))
    else:
        model = instantiate_from_config(config.model)
    print(f"Loaded model config from [{config_path}]")
    return model
