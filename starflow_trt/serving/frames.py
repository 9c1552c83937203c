"""Stream events: frame payloads (PNG or latents), the optional mp4, NDJSON / SSE lines.

Events are JSON objects: ``{"type": "frame", "index": i, "png" | "latents": base64}``,
``{"type": "done", "stats": {...}, ["mp4": base64]}``, ``{"type": "error", "message": "..."}``.
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


def frame_event(index: int, frame: torch.Tensor, output: str) -> dict:
    """frame [C, H, W] (RGB in [-1, 1] for ``png``) → a frame event."""
    if output == "png":
        return {"type": "frame", "index": index, "png": base64.b64encode(png_bytes(frame)).decode("ascii")}
    return {"type": "frame", "index": index, "latents": encode_npy(frame.detach().cpu().float().numpy())}


def png_bytes(frame: torch.Tensor) -> bytes:
    """[3, H, W] in [-1, 1] → PNG bytes."""
    from ..runtime.video_io import to_uint8

    return rgb_png_bytes(to_uint8(frame[None])[0])


def rgb_png_bytes(rgb: np.ndarray) -> bytes:
    """[H, W, 3] uint8 RGB → PNG bytes."""
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise RuntimeError("OpenCV could not encode a PNG frame")
    return buf.tobytes()


def mp4_bytes(frames: Sequence[torch.Tensor], fps: int) -> bytes:
    """Frames [3, H, W] in [-1, 1] → H.264 mp4 bytes (what browsers play; ``media.io``'s writer)."""
    import torch

    from ..media.io import write_video
    from ..runtime.video_io import to_uint8

    video = to_uint8(torch.stack(list(frames)))
    with tempfile.TemporaryDirectory(prefix="starflow-serve-") as tmp:
        return write_video(video, Path(tmp) / "video.mp4", fps=fps).read_bytes()


def error_event(message: str) -> dict:
    return {"type": "error", "message": " ".join(str(message).split())}


def format_event(event: dict, stream: str = "ndjson") -> bytes:
    """One event → one NDJSON line, or one server-sent event (``data: ...`` + blank line)."""
    line = json.dumps(event, separators=(",", ":"))
    return (f"data: {line}\n\n" if stream == "sse" else line + "\n").encode("utf-8")
