"""What an export (or engine) directory serves: shapes, limits, prompt support. Plain values, picklable.

The ingress validates requests against this summary without loading any graph; the
generation replicas load the graphs themselves.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Union

#: prompt encoders the replica knows; ``None``: requests must carry text embeddings
PROMPT_ENCODERS = ("toy",)


@dataclass(frozen=True)
class ModelSummary:
    """Latent frames are [C, H, W] = [channels, height, width]; a request asks for up to ``max_frames``."""

    directory: str
    precision: str
    channels: int
    height: int
    width: int
    max_frames: int
    max_batch: int
    text_length: int
    text_width: int
    pixel_space: bool             # no VAE and 3 channels: frames are RGB in [-1, 1] (PNG / mp4 output)
    has_denoiser: bool
    window: Optional[int]         # long-video attention window (frames), None: none
    default_guidance: float
    noise_std: float
    prompt_encoder: Optional[str]  # "toy" (bundled toy checkpoint) or None (embeddings only)
    config_hash: str
    checkpoint_sha256: Optional[str]
    graphs: tuple[str, ...]
    engines: Optional[dict] = None  # engine directories: {"gpu", "compute_capability", "tensorrt"}
    fps: Optional[int] = None      # the config's video fps (``vid_size = "frames:fps"``), None: image config
    vae: bool = False              # latent frames decode to 1 + 4(T-1) pixel frames of 16x the latent size
    aspect_sizes: tuple[tuple[str, int, int], ...] = ()  # (aspect, width, height) in pixels per exported aspect

    @property
    def aspect(self) -> str:
        """Width:height of the exported frame, reduced ("1:1", "16:9")."""
        g = math.gcd(self.width, self.height)
        return f"{self.width // g}:{self.height // g}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["graphs"] = list(self.graphs)
        d["aspect_sizes"] = [list(s) for s in self.aspect_sizes]
        d["aspect"] = self.aspect
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSummary":
        d = {k: v for k, v in d.items() if k != "aspect"}
        d["graphs"] = tuple(d["graphs"])
        d["aspect_sizes"] = tuple(tuple(s) for s in d.get("aspect_sizes", ()))
        return cls(**d)

    @classmethod
    def from_dir(cls, directory: Union[str, os.PathLike]) -> "ModelSummary":
        """Read ``directory/manifest.json`` (no graph hashing: the replicas verify when they load)."""
        from ..export.manifest import load_manifest

        m = load_manifest(directory, verify=False)
        g = m.geometry
        cfg = m.config
        sha = (m.checkpoint or {}).get("sha256")
        return cls(directory=str(Path(directory).resolve()), precision=m.precision, channels=g.channel_size,
                   height=g.height, width=g.width, max_frames=g.max_frames, max_batch=g.max_batch,
                   text_length=g.text_length, text_width=int(g.text_width or 0),
                   pixel_space=not cfg.vae and g.channel_size == 3, has_denoiser=g.has_denoiser,
                   window=g.local_attn_window, default_guidance=float(cfg.cfg[0]) if cfg.cfg else 0.0,
                   noise_std=float(g.noise_std), prompt_encoder=detect_prompt_encoder(sha),
                   config_hash=m.config_hash, checkpoint_sha256=sha, graphs=tuple(sorted(m.graphs)),
                   engines=m.extra.get("engines"), fps=cfg.fps, vae=bool(cfg.vae),
                   aspect_sizes=_aspect_sizes(g, bool(cfg.vae)))


def _aspect_sizes(geometry, vae: bool) -> tuple[tuple[str, int, int], ...]:
    """(aspect, width, height) in pixels of each aspect the export names (``export --aspects``)."""
    scale = 16 if vae else 1   # the VAE's spatial factor
    out = []
    for a in geometry.aspects:
        g = geometry.for_grid(a.h, a.w)
        out.append((a.aspect, g.width * scale, g.height * scale))
    return tuple(out)


def detect_prompt_encoder(checkpoint_sha256: Optional[str]) -> Optional[str]:
    """``"toy"`` when the export came from the bundled toy checkpoint (its text encoder ships with it)."""
    if not checkpoint_sha256:
        return None
    from ..export.manifest import sha256_path
    from ..toy import ASSETS

    toy = ASSETS / "model.pth"
    if toy.exists() and sha256_path(toy) == checkpoint_sha256:
        return "toy"
    return None
