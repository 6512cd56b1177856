"""Reading training images, whatever they are: files or bytes; grey, palette, RGBA or 16-bit; of any size.

Conversions (not errors): grayscale -> RGB; 16-bit -> 8-bit (rounded, v / 257); palette -> RGB; images with alpha
are composited, hints onto black (transparent means "no control signal", and hints are drawn on black) and targets
onto white (the usual matte for photos with transparency). An image over `MAX_IMAGE_PIXELS` (PIL's
decompression-bomb limit, about 89 megapixels) is refused from its header, before any decoding.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

#: Largest image (in pixels) this project decodes for training: PIL's decompression-bomb limit.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485
TARGET_MATTE, HINT_MATTE = 255, 0
ImageSource = str | Path | bytes


class ImageTooLarge(ValueError):
    """An image over `MAX_IMAGE_PIXELS`: decoding it could exhaust memory."""


def _open(source: ImageSource) -> Image.Image:
    return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)


def image_size(source: ImageSource) -> tuple[int, int]:
    """(width, height) from the header only; raises `OSError`/`PIL.UnidentifiedImageError` if unreadable and
    `ImageTooLarge` for an image over `MAX_IMAGE_PIXELS`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with _open(source) as image:
                width, height = image.size
        except Image.DecompressionBombError as err:  # over twice the limit: PIL gives the pixel count only
            found = re.search(r"\((\d+) pixels\)", str(err))
            shown = f"{int(found.group(1)) / 1e6:.0f} megapixels" if found else "far too large"
            raise ImageTooLarge(f"it is {shown}, more than the {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels this data set "
                                "decodes: downscale it first") from err
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLarge(f"it is {width}x{height} ({width * height / 1e6:.0f} megapixels), more than the "
                            f"{MAX_IMAGE_PIXELS / 1e6:.0f} megapixels this data set decodes: downscale it first")
    return width, height


def stored_suffix(source: ImageSource) -> str | None:
    """The suffix shards store this encoded image under as it is (`png`, `jpg`, `webp`), or None for formats they
    re-encode (to PNG, losslessly)."""
    with _open(source) as image:
        return {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}.get(image.format or "")


def to_uint8_rgb(array: np.ndarray, matte: int) -> np.ndarray:
    """Convert an OpenCV `IMREAD_UNCHANGED` array (gray/BGR/BGRA, 8 or 16 bit) to uint8 RGB.

    Alpha is composited onto a constant `matte` grey level (0 = black, 255 = white).
    """
    if array.dtype == np.uint16:
        array = ((array.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"unsupported pixel type {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    channels = array.shape[2]
    if channels in (2, 4):
        color, alpha = array[:, :, :-1].astype(np.float32), array[:, :, -1:].astype(np.float32) / 255.0
        array = np.rint(color * alpha + matte * (1.0 - alpha)).astype(np.uint8)
        channels -= 1
    if channels == 1:
        return np.repeat(array, 3, axis=2)
    if channels == 3:
        return cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
    raise ValueError(f"unsupported channel count {array.shape[2]}")


def decode_image(source: ImageSource, matte: int) -> np.ndarray:
    """uint8 RGB HWC of a file or encoded bytes; `ValueError` when it cannot be decoded."""
    if isinstance(source, bytes):
        array = cv2.imdecode(np.frombuffer(source, np.uint8), cv2.IMREAD_UNCHANGED)
    else:
        array = cv2.imread(str(source), cv2.IMREAD_UNCHANGED)
    if array is None:
        raise ValueError("cannot decode image")
    return to_uint8_rgb(array, matte)


def encode_png(rgb: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 RGB image (what the shard writer stores)."""
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("cannot encode the image as PNG")
    return data.tobytes()
