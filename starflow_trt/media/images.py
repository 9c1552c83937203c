"""Image bytes in and out with Pillow, without torch (the HTTP ingress decodes uploads and encodes thumbnails
with it, and stays free of torch): :func:`decode_image`, :func:`encode_png`. :mod:`.io` re-exports both."""

from __future__ import annotations

import io

import numpy as np

from ..errors import InputError, StarflowError


def pil():
    """Pillow's ``Image`` module, or a one-line error naming the extra that installs it."""
    try:
        from PIL import Image
    except ImportError as exc:
        raise StarflowError("image input needs Pillow: pip install 'starflow-trt[media]'") from exc
    return Image


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes (PNG / JPEG) → [H, W, 3] uint8 RGB."""
    try:
        with pil().open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise InputError(f"cannot decode the image ({exc}); send a PNG or JPEG") from exc


def encode_png(rgb: np.ndarray) -> bytes:
    """[H, W, 3] uint8 RGB → PNG bytes."""
    buf = io.BytesIO()
    pil().fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG")
    return buf.getvalue()
