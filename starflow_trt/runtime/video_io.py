"""Video output: clips [T, 3, H, W] in [-1, 1] → uint8 frames, mp4 (OpenCV), PNG contact sheets."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import StarflowError
from ..staging import temp_file_beside

LABEL_HEIGHT = 14


def to_uint8(clip: torch.Tensor) -> np.ndarray:
    """[T, 3, H, W] in [-1, 1] → [T, H, W, 3] uint8 RGB."""
    x = clip.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    return frames.repeat(scale, axis=-3).repeat(scale, axis=-2) if scale > 1 else frames


def _label(width: int, text: str) -> np.ndarray:
    import cv2

    strip = np.zeros((LABEL_HEIGHT, width, 3), dtype=np.uint8)
    cv2.putText(strip, text, (2, LABEL_HEIGHT - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.33, (255, 255, 255), 1, cv2.LINE_AA)
    return strip


def _atomic(path: Path, suffix: str) -> str:
    """A temp file beside ``path`` with umask permissions (renamed over ``path`` when complete)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return temp_file_beside(path, suffix=suffix)


def grid_video(clips: Sequence[torch.Tensor], labels: Sequence[str], scale: int = 6, columns: int = 4) -> np.ndarray:
    """Tile clips (each [T, 3, H, W]) into one labelled video [T, H', W', 3] uint8."""
    frames = [_upscale(to_uint8(c), scale) for c in clips]
    t = max(f.shape[0] for f in frames)
    frames = [np.concatenate([f, np.repeat(f[-1:], t - f.shape[0], 0)]) if f.shape[0] < t else f for f in frames]
    h, w = frames[0].shape[1:3]
    tiles = [np.concatenate([np.repeat(_label(w, lab)[None], t, 0), f], axis=1) for f, lab in zip(frames, labels)]
    blank = np.zeros_like(tiles[0])
    rows = []
    for i in range(0, len(tiles), columns):
        row = tiles[i : i + columns]
        row += [blank] * (columns - len(row)) if len(tiles) > columns else []
        rows.append(np.concatenate(row, axis=2))
    return np.concatenate(rows, axis=1)


def write_mp4(frames: np.ndarray, path: str | os.PathLike, fps: int = 4) -> Path:
    """[T, H, W, 3] uint8 RGB → mp4 (``mp4v``), written to a temp file then renamed."""
    import cv2

    path = Path(path)
    tmp = _atomic(path, ".mp4")
    h, w = frames.shape[1:3]
    writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (w, h))
    if not writer.isOpened():
        os.unlink(tmp)
        raise StarflowError(f"OpenCV cannot write mp4 to {path}; install opencv-python-headless with FFmpeg support")
    try:
        for frame in frames:
            writer.write(np.ascontiguousarray(frame[..., ::-1]))
    finally:
        writer.release()
    os.replace(tmp, path)
    return path


def contact_sheet(clips: Sequence[torch.Tensor], labels: Sequence[str], path: str | os.PathLike,
                  scale: int = 6) -> Path:
    """One row per clip (all its frames side by side) under its label, saved as PNG."""
    import cv2

    rows = []
    for clip, lab in zip(clips, labels):
        strip = np.concatenate(list(_upscale(to_uint8(clip), scale)), axis=1)
        rows.append(np.concatenate([_label(strip.shape[1], lab), strip], axis=0))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0))) for r in rows]
    sheet = np.concatenate(rows, axis=0)
    path = Path(path)
    tmp = _atomic(path, ".png")
    if not cv2.imwrite(tmp, sheet[..., ::-1]):
        os.unlink(tmp)
        raise StarflowError(f"cannot write PNG {path}")
    os.replace(tmp, path)
    return path
