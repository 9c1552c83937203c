"""Stream events: frame payloads (PNG or latents), the optional mp4, NDJSON / SSE lines.

Events are JSON objects: ``{"type": "frame", "index": i, "png" | "latents": base64}``,
``{"type": "done", "stats": {...}, ["mp4": base64]}``, ``{"type": "error", "message": "..."}``.
Pixels convert as everywhere else (:mod:`starflow_trt.media.io`: clamp, round, H.264).
"""

from __future__ import annotations

import base64
import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .limits import encode_npy

if TYPE_CHECKING:   # torch stays out of the ingress process (its replicas only relay events)
    import torch

MEDIA_TYPES = {"ndjson": "application/x-ndjson", "sse": "text/event-stream"}


def frame_event(index: int, frame: "torch.Tensor", output: str) -> dict:
    """frame [C, H, W] (RGB in [-1, 1] for ``png``) → a frame event."""
    if output == "png":
        return png_event(index, png_bytes(frame))
    return {"type": "frame", "index": index, "latents": encode_npy(frame.detach().cpu().float().numpy())}


def png_event(index: int, png: bytes) -> dict:
    return {"type": "frame", "index": index, "png": base64.b64encode(png).decode("ascii")}


def png_bytes(frame: "torch.Tensor") -> bytes:
    """[3, H, W] in [-1, 1] → PNG bytes (the uint8 of :func:`~starflow_trt.media.io.frames_to_uint8`)."""
    from ..media.io import encode_png, frames_to_uint8

    return encode_png(frames_to_uint8(frame))


def mp4_bytes(frames: Sequence[np.ndarray], fps: int) -> bytes:
    """Frames [H, W, 3] uint8 → H.264 mp4 bytes (:func:`~starflow_trt.media.io.write_video`, as ``generate``)."""
    from ..media.io import write_video

    with tempfile.TemporaryDirectory(prefix="starflow-serve-") as tmp:
        return write_video(np.stack(list(frames)), Path(tmp) / "video.mp4", fps).read_bytes()


def error_event(message: str) -> dict:
    return {"type": "error", "message": " ".join(str(message).split())}


def format_event(event: dict, stream: str = "ndjson") -> bytes:
    """One event → one NDJSON line, or one server-sent event (``data: ...`` + blank line)."""
    line = json.dumps(event, separators=(",", ":"))
    return (f"data: {line}\n\n" if stream == "sse" else line + "\n").encode("utf-8")
