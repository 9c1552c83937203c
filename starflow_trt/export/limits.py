"""Export limits (the graphs' max dims) and the geometry they give a config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..config import ModelConfig
from ..geometry import Geometry


@dataclass(frozen=True)
class ExportLimits:
    """Shape limits recorded as the graphs' max dims (TensorRT profiles come from them)."""

    max_batch: int = 4          # prompts per call (guidance doubles the deep batch)
    max_frames: Optional[int] = None  # latent frames (None: config's vid_size, or the window)
    opt_chunk: int = 64         # opt S of step graphs (a Jacobi chunk)
    height: Optional[int] = None  # token grid (None: config geometry)
    width: Optional[int] = None
    aspect: str = "16:9"        # VAE configs: frame aspect for the default grid


def geometry_for(cfg: ModelConfig, limits: ExportLimits) -> Geometry:
    """Token grid, sequence lengths and block layout recorded in the manifest."""
    frame = cfg.frame_geometry(limits.aspect)
    grid = (limits.height or frame["h"], limits.width or frame["w"])
    frames = limits.max_frames or max(cfg.latent_frames, cfg.local_attn_window or 0)
    return Geometry.from_config(cfg, grid, frames, limits.max_batch)
