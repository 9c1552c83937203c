"""Export limits (the graphs' max dims), the aspects and precision, and the geometry they give a config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

from ..config import ModelConfig
from ..errors import StarflowError
from ..geometry import UPSTREAM_ASPECTS, Geometry, aspect_grid, frame_geometry

#: export precisions: graph weights / activations / K/V (``fp32`` is the verification default)
EXPORT_DTYPES: tuple[str, ...] = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class ExportLimits:
    """Shape limits recorded as the graphs' max dims (TensorRT profiles come from them)."""

    max_batch: int = 4          # prompts per call (guidance doubles the deep batch)
    max_frames: Optional[int] = None  # latent frames (None: config's vid_size, or the window)
    opt_chunk: int = 64         # opt S of step graphs (a Jacobi chunk)
    height: Optional[int] = None  # token grid (None: config geometry)
    width: Optional[int] = None
    aspect: Optional[str] = None  # frame aspect of the default grid (None: 16:9, or the first of ``aspects``)
    #: every aspect the graphs cover (``()``: the one default grid; ``"auto"``: all nine upstream
    #: ratios for VAE / ``mix_aspect`` configs, else the one grid)
    aspects: Union[str, Sequence[str]] = ()
    dtype: str = "fp32"         # graph precision: fp32, fp16 or bf16 (FP32 islands, K/V in this dtype)


def resolve_aspects(cfg: ModelConfig, aspects: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """``"all"`` → the nine upstream ratios; ``"auto"`` → those for VAE / mix_aspect configs, else none."""
    if aspects == "all":
        return UPSTREAM_ASPECTS
    if aspects == "auto":
        return UPSTREAM_ASPECTS if (cfg.vae or cfg.mix_aspect) else ()
    if isinstance(aspects, str):
        return tuple(a.strip() for a in aspects.split(",") if a.strip())
    return tuple(aspects)


def geometry_for(cfg: ModelConfig, limits: ExportLimits) -> Geometry:
    """Token grid(s), sequence lengths and block layout recorded in the manifest."""
    if limits.dtype not in EXPORT_DTYPES:
        raise StarflowError(f"export dtype must be one of {', '.join(EXPORT_DTYPES)}, got {limits.dtype!r}")
    aspects = resolve_aspects(cfg, limits.aspects)
    if aspects and (limits.height or limits.width):
        raise StarflowError("give either --grid (one token grid) or --aspects (grids by aspect ratio), not both")
    frames = limits.max_frames or max(cfg.latent_frames, cfg.local_attn_window or 0)
    if aspects:
        for a in aspects:
            aspect_grid(cfg, a)   # a bad ratio fails here, naming it
        default = limits.aspect or ("16:9" if "16:9" in aspects else aspects[0])
        if default not in aspects:
            raise StarflowError(f"--aspect {default} is not among --aspects {','.join(aspects)}; "
                                "add it or drop --aspect")
        return Geometry.from_config(cfg, aspect_grid(cfg, default), frames, limits.max_batch, aspects)
    frame = frame_geometry(cfg, limits.aspect or "16:9")
    grid = (limits.height or frame["h"], limits.width or frame["w"])
    return Geometry.from_config(cfg, grid, frames, limits.max_batch)
