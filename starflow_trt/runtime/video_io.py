"""Viewing small clips [T, 3, H, W] in [-1, 1]: a labelled, upscaled grid video and a PNG contact sheet.

Pixels convert by the one rule of every output (:func:`starflow_trt.media.io.frames_to_uint8`); the grid
video is written by the one mp4 writer (:func:`starflow_trt.media.io.write_video`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import StarflowError
from ..media.io import frames_to_uint8
from ..staging import temp_file_beside

LABEL_HEIGHT = 14


def _upscale(frames: np.ndarray, scale: int) -> np.ndarray:
    return frames.repeat(scale, axis=-3).repeat(scale, axis=-2) if scale > 1 else frames


def _label(width: int, text: str) -> np.ndarray:
    import cv2

    strip = np.zeros((LABEL_HEIGHT, width, 3), dtype=np.uint8)
    cv2.putText(strip, text, (2, LABEL_HEIGHT - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.33, (255, 255, 255), 1, cv2.LINE_AA)
    return strip


def grid_video(clips: Sequence[torch.Tensor], labels: Sequence[str], scale: int = 6, columns: int = 4) -> np.ndarray:
    """Tile clips (each [T, 3, H, W]) into one labelled video [T, H', W', 3] uint8 (even H', W' for the
    default ``scale``: H' = rows · (14 + scale · H))."""
    frames = [_upscale(frames_to_uint8(c), scale) for c in clips]
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


def contact_sheet(clips: Sequence[torch.Tensor], labels: Sequence[str], path: str | os.PathLike,
                  scale: int = 6) -> Path:
    """One row per clip (all its frames side by side) under its label, saved as PNG."""
    import cv2

    rows = []
    for clip, lab in zip(clips, labels):
        strip = np.concatenate(list(_upscale(frames_to_uint8(clip), scale)), axis=1)
        rows.append(np.concatenate([_label(strip.shape[1], lab), strip], axis=0))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0))) for r in rows]
    sheet = np.concatenate(rows, axis=0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file_beside(path, suffix=".png")
    if not cv2.imwrite(tmp, sheet[..., ::-1]):
        os.unlink(tmp)
        raise StarflowError(f"cannot write PNG {path}")
    os.replace(tmp, path)
    return path
