"""What an export (or engine) directory serves: sizes, aspects, limits, media graphs. Plain values, picklable.

The request validator (:mod:`starflow_trt.request`) checks requests against this summary without
loading any graph, in the CLI, the Pipeline and the server's ingress alike.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from .costs import CallMemory
from .defaults import DEFAULT_FPS

if TYPE_CHECKING:
    from .export.manifest import Manifest

#: prompt encoders: the export's ``text_encoder`` graph, or the bundled toy's (no graph); ``None``: embeddings only
PROMPT_ENCODERS = ("text_encoder", "toy")


@dataclass(frozen=True, kw_only=True)
class ModelSummary:
    """Latent frames are [C, H, W] = [channels, height, width] on the default aspect; a request asks for up to
    ``max_frames`` (more: Jacobi through the attention window).

    ``aspects``: (name, H, W) latent size of every exported aspect, by the names the export records
    ("16:9" for a 30×53 grid); an export of one unnamed grid has one entry named after its ratio.
    ``vae``: VAE decoder graphs (frames come back as pixels ``pixel_scale`` × the latent size);
    ``vae_encoder``: image / video conditioning graphs; ``pixel_space``: no VAE, 3 channels (latents are RGB).
    """

    directory: str
    precision: str
    channels: int
    height: int
    width: int
    max_frames: int
    max_batch: int
    text_length: int
    text_width: int
    pixel_space: bool
    has_denoiser: bool
    window: Optional[int]         # long-video attention window (frames) of the model, None: none
    denoiser_window: Optional[int] = None   # frames a denoising chunk overlaps the previous one, None: window - 1
    default_guidance: float
    noise_std: float
    prompt_encoder: Optional[str]  # "text_encoder", "toy" (bundled toy checkpoint) or None (embeddings only)
    config_hash: str
    checkpoint_sha256: Optional[str]
    graphs: tuple[str, ...]
    engines: Optional[dict] = None  # engine directories: {"gpu", "compute_capability", "tensorrt"}
    aspects: tuple[tuple[str, int, int], ...] = ()
    vae: bool = False
    vae_encoder: bool = False
    pixel_scale: int = 1
    frame_scale: int = 1          # pixel frames per latent frame after the first (the VAE's temporal factor)
    fps: Optional[int] = None     # the config's video fps (``vid_size = "frames:fps"``), None: image config
    memory: Optional[CallMemory] = None   # what a generate call's working memory depends on (the server's budget)

    # ------------------------------------------------------------ derived
    @property
    def default_fps(self) -> int:
        """The fps of a request that names none: the config's (its training clips'), else ``DEFAULT_FPS``."""
        return self.fps or DEFAULT_FPS

    def latent_frames(self, pixel_frames: int) -> int:
        """Latent frames of a video of ``pixel_frames`` frames (upstream's ``target_length``): 1 + (F - 1) / s."""
        return 1 + (pixel_frames - 1) // self.frame_scale

    @property
    def grid_aspects(self) -> tuple[tuple[str, int, int], ...]:
        """Every (aspect name, latent H, latent W); one entry named by the reduced ratio when none is recorded."""
        if self.aspects:
            return self.aspects
        g = math.gcd(self.width, self.height)
        return ((f"{self.width // g}:{self.height // g}", self.height, self.width),)

    @property
    def aspect(self) -> str:
        """Name of the default aspect ("16:9" for the 7B's 30×53 grid)."""
        for name, h, w in self.grid_aspects:
            if (h, w) == (self.height, self.width):
                return name
        return self.grid_aspects[0][0]

    @property
    def aspect_names(self) -> tuple[str, ...]:
        return tuple(a[0] for a in self.grid_aspects)

    def latent_size(self, aspect: Optional[str] = None) -> tuple[int, int]:
        """Latent (H, W) of ``aspect`` (None: the default); KeyError for a name the export lacks."""
        if aspect is None:
            return self.height, self.width
        for name, h, w in self.grid_aspects:
            if name == aspect:
                return h, w
        raise KeyError(aspect)

    def frame_size(self, aspect: Optional[str] = None) -> tuple[int, int]:
        """(height, width) of the frames a client gets back: pixels with VAE graphs, else the latent size."""
        h, w = self.latent_size(aspect)
        return h * self.pixel_scale, w * self.pixel_scale

    @property
    def aspect_sizes(self) -> tuple[tuple[str, int, int], ...]:
        """(aspect name, frame width, frame height) of every exported aspect, in the frames a client gets."""
        return tuple((name, w * self.pixel_scale, h * self.pixel_scale) for name, h, w in self.grid_aspects)

    @property
    def pixel_frames(self) -> bool:
        """Whether frames can be PNG / mp4: VAE decoder graphs, or a pixel-space model."""
        return self.vae or self.pixel_space

    # ------------------------------------------------------------ persist
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["graphs"] = list(self.graphs)
        d["aspects"] = [list(a) for a in self.aspects]
        d["aspect"] = self.aspect
        d["aspect_names"] = list(self.aspect_names)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSummary":
        d = {k: v for k, v in d.items() if k not in ("aspect", "aspect_names")}
        d["graphs"] = tuple(d["graphs"])
        d["aspects"] = tuple(tuple(a) for a in d.get("aspects", ()))
        if isinstance(d.get("memory"), dict):
            d["memory"] = CallMemory(**{k: tuple(v) if isinstance(v, list) else v for k, v in d["memory"].items()})
        return cls(**d)

    @classmethod
    def from_dir(cls, directory: Union[str, os.PathLike]) -> "ModelSummary":
        """Read ``directory/manifest.json`` (no graph hashing: the replicas verify when they load)."""
        from .export.manifest import load_manifest

        return cls.from_manifest(load_manifest(directory, verify=False))

    @classmethod
    def from_manifest(cls, m: "Manifest") -> "ModelSummary":
        from .export import names as n

        g, cfg = m.geometry, m.config
        sha = (m.checkpoint or {}).get("sha256")
        p = g.patch_size
        vae = n.VAE_DECODE_FIRST in m.graphs
        extra = m.graph(n.VAE_DECODE_FIRST).extra if vae else {}
        scale = int(extra.get("spatial_factor", 16)) if vae else 1
        frame_scale = int(extra.get("temporal_factor", 4)) if vae else 1
        encoder = "text_encoder" if n.TEXT_ENCODER in m.graphs else detect_prompt_encoder(sha)
        aspects = tuple((a.aspect, a.h * p, a.w * p) for a in g.aspects) or _grid_name(cfg, g)
        return cls(directory=str(Path(m.root).resolve()), precision=m.precision, channels=g.channel_size,
                   height=g.height, width=g.width, max_frames=g.max_frames, max_batch=g.max_batch,
                   text_length=g.text_length, text_width=int(g.text_width or 0),
                   pixel_space=not cfg.vae and not vae and g.channel_size == 3, has_denoiser=g.has_denoiser,
                   window=g.local_attn_window, denoiser_window=g.denoiser_window,
                   default_guidance=float(cfg.guidance_values[0]) if cfg.guidance_values else 0.0,
                   noise_std=float(g.noise_std), prompt_encoder=encoder, config_hash=m.config_hash,
                   checkpoint_sha256=sha, graphs=tuple(sorted(m.graphs)), engines=m.extra.get("engines"),
                   aspects=aspects, vae=vae, pixel_scale=scale, frame_scale=frame_scale, fps=cfg.fps,
                   vae_encoder=n.VAE_ENCODE in m.graphs or n.VAE_ENCODE_FIRST in m.graphs,
                   memory=CallMemory.of(cfg, g, _kv_bytes(m), 3 * g.max_tokens_per_frame * (p * scale) ** 2,
                                        frame_scale))


def _kv_bytes(m: "Manifest") -> int:
    """Bytes of one cached K / V element: the deep step graph's ``new_k_0`` dtype (4 where not recorded)."""
    from .export import names as n

    outputs = m.graph(n.DEEP_STEP).outputs if n.DEEP_STEP in m.graphs else []
    dtypes = [t.dtype for t in outputs if t.name.startswith("new_k_")]
    return {"float16": 2, "bfloat16": 2}.get(dtypes[0], 4) if dtypes else 4


def _grid_name(cfg, g) -> tuple[tuple[str, int, int], ...]:
    """An export of one unnamed grid: the upstream aspect whose grid it is (() when none: named by its ratio)."""
    from .errors import StarflowError
    from .geometry import UPSTREAM_ASPECTS, aspect_grid

    for name in UPSTREAM_ASPECTS:
        try:
            if aspect_grid(cfg, name) == (g.h, g.w):
                return ((name, g.height, g.width),)
        except StarflowError:
            return ()
    return ()


def detect_prompt_encoder(checkpoint_sha256: Optional[str]) -> Optional[str]:
    """``"toy"`` when the export came from the bundled toy checkpoint (its text encoder ships with it)."""
    if not checkpoint_sha256:
        return None
    from .staging import sha256_file
    from .toy import ASSETS

    toy = ASSETS / "model.pth"
    if toy.exists() and sha256_file(toy) == checkpoint_sha256:
        return "toy"
    return None
