"""Preparing control images: colour/format normalisation and resizing to the generation size.

Everything here works on HWC ``uint8`` numpy arrays (RGB unless stated) so that the same ops serve
user-drawn control maps and annotator outputs alike. The conventions follow the original ControlNet
annotator helpers (``HWC3``/``resize_image``) and the sd-webui-controlnet resize modes, because the
released ControlNet models were trained and are used with maps prepared that way.
"""

from __future__ import annotations

from typing import Literal

import cv2
import numpy as np

ResizeMode = Literal["just_resize", "crop_and_resize", "resize_and_fill"]
RESIZE_MODES: tuple[str, ...] = ("just_resize", "crop_and_resize", "resize_and_fill")


def invert(img: np.ndarray) -> np.ndarray:
    """Return ``255 - img``.

    User scribbles are usually black lines on white paper, while ControlNet scribble/lineart
    models expect white lines on black.
    """
    return (255 - np.asarray(img, dtype=np.uint8)).astype(np.uint8)


def rgb_to_bgr(img: np.ndarray) -> np.ndarray:
    """Swap the first and third channels (RGB <-> BGR), returning a contiguous copy.

    Some models (notably the v1.0 normal-map model) were trained on channel-reversed maps.
    """
    return np.ascontiguousarray(np.asarray(img)[..., ::-1])


def to_rgb_uint8(img: np.ndarray) -> np.ndarray:
    """Normalise any common image array to an HWC, 3-channel, ``uint8`` RGB array.

    - float arrays are taken to be in [0, 1] and scaled to [0, 255] (clipped, rounded);
    - ``uint16`` arrays are scaled by 255/65535 (other integer types are clipped to [0, 255]);
    - HW or HW1 grayscale is replicated to three channels;
    - RGBA is composited onto a white background, as the original annotators' ``HWC3`` does, so
      that transparent areas of a drawing read as paper rather than as black ink.
    """
    arr = np.asarray(img)
    if arr.dtype == np.uint8:
        out = arr
    elif np.issubdtype(arr.dtype, np.floating):
        out = np.clip(np.rint(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
    elif arr.dtype == np.uint16:
        out = np.rint(arr.astype(np.float64) * (255.0 / 65535.0)).astype(np.uint8)
    elif arr.dtype == np.bool_:
        out = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.integer):
        out = np.clip(arr, 0, 255).astype(np.uint8)
    else:
        raise TypeError(f"unsupported image dtype {arr.dtype}")

    if out.ndim == 2:
        out = out[:, :, None]
    if out.ndim != 3:
        raise ValueError(f"expected an HW or HWC image, got shape {arr.shape}")
    channels = out.shape[2]
    if channels == 1:
        return np.ascontiguousarray(np.repeat(out, 3, axis=2))
    if channels == 3:
        return np.ascontiguousarray(out)
    if channels == 4:
        color = out[:, :, :3].astype(np.float32)
        alpha = out[:, :, 3:4].astype(np.float32) / 255.0
        blended = color * alpha + 255.0 * (1.0 - alpha)
        return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    raise ValueError(f"expected 1, 3 or 4 channels, got {channels}")


def _interpolation(src_hw: tuple[int, int], dst_hw: tuple[int, int], nearest: bool) -> int:
    """INTER_AREA when shrinking (anti-aliases), INTER_CUBIC when enlarging, NEAREST on request."""
    if nearest:
        return cv2.INTER_NEAREST
    if dst_hw[0] * dst_hw[1] < src_hw[0] * src_hw[1]:
        return cv2.INTER_AREA
    return cv2.INTER_CUBIC


def _resize(img: np.ndarray, width: int, height: int, nearest: bool) -> np.ndarray:
    src_hw = (img.shape[0], img.shape[1])
    if src_hw == (height, width):
        return img.copy()
    out = cv2.resize(img, (width, height), interpolation=_interpolation(src_hw, (height, width), nearest))
    if out.ndim == 2 and img.ndim == 3:
        out = out[:, :, None]
    return out


def resize_for_output(
    img: np.ndarray,
    width: int,
    height: int,
    mode: ResizeMode = "just_resize",
    nearest: bool = False,
) -> np.ndarray:
    """Bring a control map to exactly ``height x width`` pixels.

    Modes (the names used by sd-webui-controlnet):

    - ``"just_resize"``: stretch to the target size, ignoring the aspect ratio.
    - ``"crop_and_resize"``: scale by ``max(height/h, width/w)`` so the map covers the target, then
      crop the centre.
    - ``"resize_and_fill"``: scale by ``min(height/h, width/w)`` so the whole map fits, then pad the
      remaining border symmetrically with zeros (black). Black is "no control" for edge, pose and
      line maps, which is why it is used rather than edge replication.

    Shrinking uses INTER_AREA and enlarging INTER_CUBIC; ``nearest=True`` uses INTER_NEAREST for maps
    whose exact values matter (segmentation colours, pose colours, binary scribbles).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"target size must be positive, got {width}x{height}")
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")
    src = np.asarray(img)
    h, w = src.shape[:2]

    if mode == "just_resize":
        return _resize(src, width, height, nearest)

    if mode == "crop_and_resize":
        k = max(height / h, width / w)
        new_w, new_h = max(width, int(round(w * k))), max(height, int(round(h * k)))
        scaled = _resize(src, new_w, new_h, nearest)
        top, left = (new_h - height) // 2, (new_w - width) // 2
        return np.ascontiguousarray(scaled[top : top + height, left : left + width])

    k = min(height / h, width / w)
    new_w, new_h = min(width, max(1, int(round(w * k)))), min(height, max(1, int(round(h * k))))
    scaled = _resize(src, new_w, new_h, nearest)
    out = np.zeros((height, width) + src.shape[2:], dtype=src.dtype)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    out[top : top + new_h, left : left + new_w] = scaled
    return out


def pixel_perfect_resolution(
    image_hw: tuple[int, int],
    target_hw: tuple[int, int],
    mode: ResizeMode = "just_resize",
) -> int:
    """Annotator resolution that makes the control map line up 1:1 with the output pixels.

    This is sd-webui-controlnet's "pixel perfect" estimate. With ``k_h = target_h / h`` and
    ``k_w = target_w / w``::

        resize_and_fill:            round(min(k_h, k_w) * min(h, w))
        just_resize/crop_and_resize: round(max(k_h, k_w) * min(h, w))

    i.e. the size the image's shorter side will have after the resize mode scales it, which is the
    ``resolution`` the annotators take (they scale the shorter side to it).
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")
    h, w = image_hw
    target_h, target_w = target_hw
    k_h, k_w = float(target_h) / float(h), float(target_w) / float(w)
    k = min(k_h, k_w) if mode == "resize_and_fill" else max(k_h, k_w)
    return int(np.round(k * float(min(h, w))))


def resize_image_to_resolution(img: np.ndarray, resolution: int) -> np.ndarray:
    """Scale so the shorter side is about ``resolution``, both sides rounded to multiples of 64.

    This is the original annotators' ``resize_image(HWC3(img), resolution)``: the detectors run at
    this working size and the latent grid of SD needs multiples of 8 (64 keeps the UNet's
    downsampling exact). Enlarging uses LANCZOS4, shrinking INTER_AREA, as the original.
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive, got {resolution}")
    rgb = to_rgb_uint8(img)
    h, w = rgb.shape[:2]
    k = float(resolution) / float(min(h, w))
    new_h = max(64, int(np.round(h * k / 64.0)) * 64)
    new_w = max(64, int(np.round(w * k / 64.0)) * 64)
    if (new_h, new_w) == (h, w):
        return rgb.copy()
    interp = cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA
    return cv2.resize(rgb, (new_w, new_h), interpolation=interp)
