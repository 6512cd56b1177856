"""Small helpers shared by the whole package: building objects from `target:`/`params:` configs, settings sections."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from ldm.errors import InputError

if TYPE_CHECKING:
    import torch

SettingsT = TypeVar("SettingsT")


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


def settings_from(cls: type[SettingsT], section: Mapping[str, Any] | None, where: str) -> SettingsT:
    """A settings dataclass from a config section: its defaults, then the section's values; an unknown key is an
    error naming it (a typo in a config must not be silently ignored)."""
    values = dict(section or {})
    unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})  # type: ignore[arg-type]
    if unknown:
        raise InputError(f"{where}: unknown settings {', '.join(unknown)}")
    return cls(**values)


def count_params(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def log_txt_as_img(wh: tuple[int, int], texts: list[str], size: int = 10) -> torch.Tensor:
    """Render each prompt, wrapped, as a black-on-white image in [-1, 1] (N, 3, H, W) for image grids."""
    import textwrap

    import numpy as np
    import torch
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=size)
    chars_per_line = max(1, int(wh[0] / (size * 0.6)))
    images = []
    for text in texts:
        canvas = Image.new("RGB", wh, color="white")
        ImageDraw.Draw(canvas).multiline_text((0, 0), textwrap.fill(text, chars_per_line), fill="black", font=font)
        images.append(np.asarray(canvas, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
