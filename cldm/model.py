"""The original's entry points: `create_model(config)` and `load_state_dict(path)` (the latter from `cldm.checkpoint`).

    from cldm.model import create_model, load_state_dict
    model = create_model('./models/cldm_v15.yaml').cpu()
    model.load_state_dict(load_state_dict('./models/control_sd15_canny.pth', location='cpu'))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from cldm.checkpoint import (
    CROSS_ATTN_KEY,
    CheckpointError,
    CheckpointMismatchError,
    get_state_dict,
    load_state_dict,
)
from ldm.errors import InputError, MissingFileError, one_line
from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.util import check_params, get_obj_from_str, instantiate_from_config

__all__ = ["CROSS_ATTN_KEY", "CheckpointError", "CheckpointMismatchError", "create_model", "get_state_dict",
           "load_config", "load_state_dict"]


def load_config(config_path: str | Path) -> Any:
    """A YAML config with a `model:` section; a missing or malformed file is one line naming it."""
    path = Path(config_path)
    if not path.is_file():
        raise MissingFileError(f"{path}: config file not found")
    try:
        config = OmegaConf.load(path)
    except Exception as err:  # parsing the user's file: YAML and OmegaConf raise many types, all mean the same
        raise InputError(f"{path}: not a valid YAML config ({one_line(err)})") from err
    if not isinstance(config, DictConfig) or "model" not in config:
        raise InputError(f"{path}: config has no top-level 'model' section")
    return config


def create_model(config_path: str | Path) -> nn.Module:
    """Build the model a YAML config's `model:` section describes, on the CPU.

    Diffusion models are built deferred (see `ldm.models.deferred`): loading a checkpoint right after costs no
    random initialisation, and a model used without loading gets its random weights then.
    """
    config = load_config(config_path)
    try:
        target = get_obj_from_str(config.model.get("target"))
        if isinstance(target, type) and issubclass(target, LatentDiffusion):
            params = config.model.get("params", {})
            check_params(target, params, config.model.target)
            model = target.build_deferred(**params)
        else:
            model = instantiate_from_config(config.model)
    except InputError as err:  # a config's own mistake (a target or a parameter): name the file
        raise InputError(f"{config_path}: {one_line(err)}") from err
    print(f"Loaded model config from [{config_path}]")
    return model
