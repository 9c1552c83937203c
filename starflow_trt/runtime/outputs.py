"""Write a generation result: latents.npy, stats.json, and an mp4 + contact sheet for pixel-space models."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..errors import StarflowError
from ..staging import temp_file_beside, write_json_atomic


def save_npy_atomic(array: np.ndarray, path: Path) -> Path:
    """numpy.save to a temp file beside ``path`` (umask permissions), then rename."""
    tmp = temp_file_beside(path, suffix=".npy")
    try:
        np.save(tmp, array, allow_pickle=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def latent_preview(latents: torch.Tensor) -> torch.Tensor:
    """[B, T, C, H, W] latents → [B, T, 3, H, W] in [-1, 1]: first 3 channels, each min-max scaled."""
    x = latents[:, :, :3] if latents.shape[2] >= 3 else latents[:, :, :1].expand(-1, -1, 3, -1, -1)
    lo = x.amin(dim=(0, 1, 3, 4), keepdim=True)
    hi = x.amax(dim=(0, 1, 3, 4), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-6) * 2 - 1


def write_outputs(result, pipe, out_dir: Path, labels: list[str] | None = None,
                  fps: int | None = None) -> list[Path]:
    """latents.npy + stats.json; pixel-space models (no VAE, 3 channels) also get video.mp4 (at ``fps``,
    None: the export's, ``pipe.summary.default_fps``) and contact_sheet.png, latent models a preview
    contact sheet of their first channels.

    Writes into ``out_dir`` as is: callers stage it (:func:`starflow_trt.staging.staged_directory`).
    Non-finite latents are refused (nothing written); stats.json is strict JSON.
    """
    from ..media.io import write_video
    from .video_io import contact_sheet, grid_video

    latents = result.latents
    if not bool(torch.isfinite(latents).all()):
        bad = int((~torch.isfinite(latents)).sum())
        raise StarflowError(f"generation produced {bad} non-finite latent values (NaN/Inf); nothing written. "
                            "Check the inputs (embeddings, noise, guidance) and the graphs")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [save_npy_atomic(latents.numpy(), out_dir / "latents.npy")]
    files.append(write_json_atomic(out_dir / "stats.json", result.stats, strict=True))  # RFC JSON: no NaN/Inf
    labels = labels or [f"sample {i}" for i in range(latents.shape[0])]
    pixel = not pipe.cfg.vae and latents.shape[2] == 3
    clips = [c.clamp(-1, 1) for c in (latents if pixel else latent_preview(latents))]
    sheet = out_dir / ("contact_sheet.png" if pixel else "latent_preview.png")
    contact_sheet(clips, labels, sheet)
    files.append(sheet)
    if pixel:
        files.append(write_video(grid_video(clips, labels), out_dir / "video.mp4",
                                 pipe.summary.default_fps if fps is None else fps))
    return files


def write_row_video(result, row: int, pipe, path: Path, fps: int) -> Path | None:
    """Row ``row`` of a result as an mp4 at ``path``: its decoded frames (VAE exports) or its RGB latents
    (pixel-space models); None when the export makes no frames."""
    from ..media.io import write_video

    if result.video is not None:
        frames = result.video[row].movedim(-3, -1).numpy()          # [F, H, W, 3] uint8
    elif not pipe.cfg.vae and result.latents.shape[2] == 3:
        frames = result.latents[row]                                  # [T, 3, H, W] in [-1, 1]
    else:
        return None
    return write_video(frames, path, fps=fps)
