"""Pixels in and out, as upstream's sampling script does it.

In (spec §11): load RGB, resize so the image covers the target frame (``scale`` = the larger of
the two ratios, sizes truncated to int, bilinear as torchvision's ``Resize`` on a PIL image),
centre-crop (torchvision's rounding), map to [-1, 1] (``x / 255``, then ``(x - 0.5) / 0.5``).
Videos: the same per frame, trimmed to ``1 + 4n`` frames for the VAE.

Out, for every output (``generate``'s and the demo's mp4, the server's PNG frames and mp4, the OpenAI
API's assets): one float → uint8 rule (:func:`frames_to_uint8`: clamp to [-1, 1], ``(x + 1) / 2 * 255``,
rounded) and one mp4 writer (:class:`Mp4Writer`: H.264, libx264, yuv420p, at ``fps`` = upstream's
``out_fps``), to which frames can be appended as they are decoded.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ..errors import InputError, StarflowError
from .images import decode_image, encode_png  # noqa: F401 - re-exported: the torch-free codec lives in .images
from .images import pil as _pil

PathLike = Union[str, os.PathLike]

#: libx264 settings of upstream's grid writer (``crf`` 10, ``preset`` slow).
H264_OPTIONS = {"crf": "10", "preset": "slow"}


def _av():
    try:
        import av
    except ImportError as exc:
        raise StarflowError("H.264 video I/O needs PyAV, a dependency of starflow-trt: pip install av") from exc
    return av


def load_image(path: PathLike) -> np.ndarray:
    """An image file → [H, W, 3] uint8 RGB."""
    Image = _pil()
    p = Path(path)
    if not p.is_file():
        raise InputError(f"image {p} not found; pass an existing PNG/JPEG file")
    try:
        with Image.open(p) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as exc:
        raise InputError(f"cannot read image {p} ({exc}); pass a PNG or JPEG file") from exc


def cover_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """[h, w, 3] uint8 → [height, width, 3] uint8: bilinear resize to cover, then centre crop."""
    Image = _pil()
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise InputError(f"image must be [H, W, 3] uint8 RGB, got {image.shape} {image.dtype}")
    ih, iw = image.shape[:2]
    scale = max(height / ih, width / iw)
    rh, rw = int(ih * scale), int(iw * scale)
    im = Image.fromarray(image).resize((rw, rh), Image.BILINEAR)
    arr = np.asarray(im)
    if rh < height or rw < width:  # float truncation left it a pixel short: torchvision pads with black
        pad_t, pad_l = max(0, (height - rh) // 2), max(0, (width - rw) // 2)
        pad_b, pad_r = max(0, (height - rh + 1) // 2), max(0, (width - rw + 1) // 2)
        arr = np.pad(arr, ((pad_t, pad_b), (pad_l, pad_r), (0, 0)))
        rh, rw = arr.shape[:2]
    top, left = int(round((rh - height) / 2.0)), int(round((rw - width) / 2.0))
    return np.ascontiguousarray(arr[top:top + height, left:left + width])


def to_model_range(frames: np.ndarray) -> torch.Tensor:
    """[..., H, W, 3] uint8 → [..., 3, H, W] float32 in [-1, 1] (ToTensor then Normalize(0.5, 0.5))."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).movedim(-1, -3).float().div(255)
    return (x - 0.5) / 0.5


def prepare_image(image: Union[PathLike, np.ndarray], height: int, width: int) -> torch.Tensor:
    """Image file or [h, w, 3] uint8 → [1, 1, 3, height, width] float32 in [-1, 1] (one-frame clip)."""
    arr = load_image(image) if not isinstance(image, np.ndarray) else image
    return to_model_range(cover_crop(arr, height, width))[None, None]


def load_video(path: PathLike, max_frames: Optional[int] = None) -> tuple[np.ndarray, float]:
    """A video file → ([F, H, W, 3] uint8 RGB, fps); at most ``max_frames`` frames."""
    av = _av()
    p = Path(path)
    if not p.is_file():
        raise InputError(f"video {p} not found; pass an existing mp4 file")
    try:
        with av.open(str(p)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or 0)
            frames = []
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames and len(frames) >= max_frames:
                    break
    except (av.error.FFmpegError, IndexError) as exc:
        raise InputError(f"cannot read video {p} ({exc}); pass an mp4/H.264 file") from exc
    if not frames:
        raise InputError(f"video {p} has no frames")
    return np.stack(frames), fps


def prepare_video(video: Union[PathLike, np.ndarray], height: int, width: int,
                  max_frames: Optional[int] = None) -> torch.Tensor:
    """Video file or [F, h, w, 3] uint8 → [1, 1 + 4n, 3, height, width] in [-1, 1] (trailing frames dropped)."""
    frames = load_video(video, max_frames)[0] if not isinstance(video, np.ndarray) else video
    if max_frames:
        frames = frames[:max_frames]
    keep = 1 + 4 * ((len(frames) - 1) // 4)
    return to_model_range(np.stack([cover_crop(f, height, width) for f in frames[:keep]]))[None]


def frames_to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[..., 3, H, W] in [-1, 1] → [..., H, W, 3] uint8: clamp, ``(x + 1) / 2 * 255``, round to nearest.

    The one rule of every pixel output. The spec (§14, the VAE glue) names none; rounding is the unbiased
    one: truncation moves every value down, half a level on average (a mid-grey 0.0 → 127, not 128)."""
    x = (frames.detach().float().clamp(-1, 1) + 1) / 2 * 255
    return x.round().to(torch.uint8).movedim(-3, -1).cpu().numpy()


class Mp4Writer:
    """H.264 mp4 writer that takes frames as they come; written to a temp file, renamed on close.

    ``with Mp4Writer(path, fps) as w: w.write(frames)`` with frames [T, 3, H, W] in [-1, 1]
    (or [T, H, W, 3] uint8). H and W must be even (yuv420p).

    The one mp4 writer of every output. H.264 in yuv420p is what browsers play (the server's page shows
    the mp4, the OpenAI API hands it to any client); OpenCV's ``mp4v`` (MPEG-4 Part 2) is not. PyAV
    also streams: ``generate`` appends decoded frames as the flow finishes them.
    """

    def __init__(self, path: PathLike, fps: float):
        if not fps or fps <= 0:
            raise InputError(f"video fps must be > 0, got {fps}; images (fps 0) are written as PNG")
        self.path = Path(path)
        self.fps = fps
        self.frames_written = 0
        self._container = None
        self._stream = None
        self._tmp = self.path.with_name(f".{self.path.stem}.partial.mp4")

    def _open(self, height: int, width: int) -> None:
        av = _av()
        if height % 2 or width % 2:
            raise InputError(f"H.264 (yuv420p) needs even frame sizes, got {height}x{width}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self._tmp), mode="w", format="mp4")
        from fractions import Fraction

        self._stream = self._container.add_stream("libx264", rate=Fraction(self.fps).limit_denominator(1001))
        self._stream.width, self._stream.height = width, height
        self._stream.pix_fmt = "yuv420p"
        self._stream.options = dict(H264_OPTIONS)

    def write(self, frames: Union[torch.Tensor, np.ndarray]) -> None:
        """Append frames: [T, 3, H, W] float in [-1, 1] or [T, H, W, 3] uint8."""
        av = _av()
        arr = frames if isinstance(frames, np.ndarray) else frames_to_uint8(frames)
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.dtype != np.uint8:
            raise InputError(f"frames must be [T, 3, H, W] float or [T, H, W, 3] uint8, got {arr.shape} {arr.dtype}")
        if self._container is None:
            self._open(*arr.shape[1:3])
        for frame in arr:
            for packet in self._stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                self._container.mux(packet)
            self.frames_written += 1

    def close(self) -> Path:
        if self._container is None:
            raise InputError(f"no frames were written to {self.path}")
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()
        self._container = None
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self._container is not None:
            self._container.close()
            self._container = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_video(frames: Union[torch.Tensor, np.ndarray], path: PathLike, fps: float) -> Path:
    """[T, 3, H, W] in [-1, 1] (or [T, H, W, 3] uint8) → H.264 mp4 at ``fps``."""
    with Mp4Writer(path, fps) as writer:
        writer.write(frames)
    return Path(path)
