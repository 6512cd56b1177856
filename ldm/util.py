"""Small helpers shared by the whole package: building objects from `target:`/`params:` configs, settings sections."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from ldm.errors import InputError

if TYPE_CHECKING:
    import torch

SettingsT = TypeVar("SettingsT")


class ConfigError(InputError, ImportError):
    """A config names a class that does not exist, or gives it parameters it does not take."""


def get_obj_from_str(path: str) -> Any:
    """Import `package.module.Name` and return `Name`."""
    module_name, _, attr = str(path).rpartition(".")
    if not module_name:
        raise ConfigError(f"target {path!r} is not a dotted path like 'package.module.Class'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name is not None and not module_name.startswith(err.name):
            raise  # the module exists but itself imports something missing: not the config's fault
        raise ConfigError(f"cannot import module {module_name!r} named by config target {path!r}") from err
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise ConfigError(f"module {module_name!r} has no {attr!r} (config target {path!r})") from err


def instantiate_from_config(config: Mapping[str, Any], **overrides: Any) -> Any:
    """Build `config.target(**config.params, **overrides)`, as the original ldm configs expect."""
    if not isinstance(config, Mapping) or "target" not in config:
        if config in ("__is_first_stage__", "__is_unconditional__"):
            return None
        raise ConfigError(f"a config section has no 'target' key: {config!r}")
    params = dict(config.get("params", None) or {})
    params.update(overrides)
    target = get_obj_from_str(config["target"])
    check_params(target, params, config["target"])
    return target(**params)


def check_params(target: Any, params: Mapping[str, Any], name: str) -> None:
    """A config's parameters must be ones `target` takes, with none it needs left out (a `ConfigError` if not)."""
    try:
        inspect.signature(target).bind(**params)
    except TypeError as err:
        raise ConfigError(f"{name}: {err}") from err
    except ValueError:  # no signature to check (a builtin): the call itself will say
        pass


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
