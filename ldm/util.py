"""Small helpers shared by the whole package: building objects from `target:`/`params:` configs."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any


def get_obj_from_str(path: str) -> Any:
    """Import `package.module.Name` and return `Name`."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"target {path!r} is not a dotted path like 'package.module.Class'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ImportError(f"cannot import module {module_name!r} named by config target {path!r}") from err
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise ImportError(f"module {module_name!r} has no {attr!r} (config target {path!r})") from err


def instantiate_from_config(config: Mapping[str, Any], **overrides: Any) -> Any:
    """Build `config.target(**config.params, **overrides)`, as the original ldm configs expect."""
    if "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise KeyError(f"config has no 'target' key: {dict(config)!r}")
    params = dict(config.get("params", None) or {})
    params.update(overrides)
    return get_obj_from_str(config["target"])(**params)


def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())
