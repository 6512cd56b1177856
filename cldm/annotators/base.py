"""Shared pieces of the annotators: weight locations, the missing-weights error, devices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cldm.control_image import resize_image_to_resolution, to_rgb_uint8
from ldm.errors import MissingFileError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ANNOTATOR_DIR = REPO_ROOT / "models" / "annotators"


class MissingAnnotatorWeights(MissingFileError):
    """An annotator's weight file is absent; the message names the file and where to put it.

    Nothing is downloaded at run time, so the user must place the file themselves.
    """

    def __init__(self, filename: str, folder: Path | str, what: str = "") -> None:
        detail = f" ({what})" if what else ""
        super().__init__(f"missing annotator weights {filename!r}{detail}: put it in the folder {Path(folder)}")
        # not ``filename``: OSError.__str__ would then print its errno-style format
        self.weights_file = filename
        self.folder = Path(folder)


def annotator_dir(model_dir: Path | str | None) -> Path:
    """The weights folder: ``model_dir`` if given, else ``<repo>/models/annotators``."""
    return Path(model_dir) if model_dir is not None else DEFAULT_ANNOTATOR_DIR


def require_file(folder: Path, filename: str, what: str = "") -> Path:
    """Return ``folder / filename`` or raise :class:`MissingAnnotatorWeights`."""
    path = folder / filename
    if not path.is_file():
        raise MissingAnnotatorWeights(filename, folder, what)
    return path


def prepare_input(img: np.ndarray, resolution: int) -> np.ndarray:
    """RGB uint8 at the annotator working size (shorter side ~resolution, multiples of 64)."""
    return resize_image_to_resolution(to_rgb_uint8(img), resolution)


def as_device(device: torch.device | str | None) -> torch.device:
    """``None`` means CPU: annotators are cheap next to diffusion and CPU is always there."""
    return torch.device(device) if device is not None else torch.device("cpu")


HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def require_hf_folder(folder: Path, what: str) -> Path:
    """Check a transformers-format folder (config, weights, preprocessor config) before loading it.

    Checking first turns transformers' long hub-oriented errors into one line naming the missing
    file and the folder it belongs in.
    """
    require_file(folder, "config.json", what)
    if not any((folder / name).is_file() for name in HF_WEIGHT_FILES):
        alternatives = ", ".join(HF_WEIGHT_FILES[1:])
        raise MissingAnnotatorWeights(HF_WEIGHT_FILES[0], folder, f"{what}; or {alternatives}")
    require_file(folder, "preprocessor_config.json", what)
    return folder
