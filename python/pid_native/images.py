"""Pixels in and out: image loading for upscaling, and PIL/PNG output with the licence note."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from .errors import InvalidInputError, MissingFileError

LICENSE_NOTE = (
    "Decoded with NVIDIA PiD weights under the NVIDIA License (NSCLv1): "
    "research and evaluation use only, no commercial use."
)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """``[B, 3, H, W]`` in [-1, 1] to ``[B, H, W, 3]`` uint8, truncating like the reference."""
    x = (np.clip(images, -1.0, 1.0) + 1.0) * 127.5
    return np.transpose(x.astype(np.uint8), (0, 2, 3, 1))


def to_pil(images: np.ndarray) -> list[Image.Image]:
    """PIL images carrying the NSCLv1 restriction in their ``info`` (written by :func:`save_png`)."""
    out = []
    for arr in to_uint8(images):
        img = Image.fromarray(arr, "RGB")
        img.info["pid-license"] = LICENSE_NOTE
        out.append(img)
    return out


def save_png(image: Image.Image, path: str | os.PathLike[str], extra: dict[str, str] | None = None) -> Path:
    """Write a PNG with a text chunk stating the research/evaluation-only restriction.

    Atomically (through ``<name>.partial``), creating the folder if needed.
    """
    meta = PngImagePlugin.PngInfo()
    meta.add_text("pid-license", LICENSE_NOTE)
    for k, v in (extra or {}).items():
        meta.add_text(k, v)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    try:
        image.save(tmp, format="PNG", pnginfo=meta)
        os.replace(tmp, path)
    except BaseException:  # Ctrl-C and full disks included: leave no partial file behind
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_image(image: Any) -> np.ndarray:
    """An image as float32 ``[1, 3, H, W]`` in [-1, 1], centre-cropped to multiples of 16.

    Accepts a path, a PIL image, or an array ``[3, H, W]`` / ``[1, 3, H, W]`` in [-1, 1].
    """
    if isinstance(image, (str, os.PathLike)):
        p = Path(image)
        if not p.is_file():
            raise MissingFileError(f"image not found: {p}", "missing_file")
        try:
            image = Image.open(p)
            image.load()
        except Exception as exc:
            raise InvalidInputError(f"cannot read image {p}: {exc}", "image_unreadable") from None
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    else:
        arr = np.asarray(image, dtype=np.float32)
        if arr.ndim == 4 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 3 or arr.shape[0] != 3:
            raise InvalidInputError(f"image array must be [3, H, W], got shape {arr.shape}", "image_shape")
    _, h, w = arr.shape
    ch, cw = h // 16 * 16, w // 16 * 16
    if ch == 0 or cw == 0:
        raise InvalidInputError(f"image {w}x{h} is smaller than 16x16", "image_size")
    top, left = (h - ch) // 2, (w - cw) // 2
    return np.ascontiguousarray(arr[None, :, top : top + ch, left : left + cw])
