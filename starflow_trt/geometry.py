"""Frame geometry and ``Geometry``: the one vocabulary of sizes shared by config, export, manifest and runtime.

Frame sizes (spec §1.3): :func:`frame_geometry` is the pixel and latent frame of an aspect ratio,
:func:`aspect_grid` its token grid, both by upstream's ``aspect_ratio_to_image_size`` (:func:`aspect_size`).

Every fact of an export has one name here; the manifest stores ``Geometry.to_dict()`` and the
runtime reads only this (never ``manifest.config``) for shapes and sampling defaults::

    geo = Geometry.from_config(cfg, grid=(30, 53), max_frames=21, max_batch=4)
    geo.tokens_per_frame        # h · w
    geo.blocks[geo.top_index]   # BlockGeometry(layers, heads, width, permutation, text)

One export may cover several token grids (``export --aspects``): ``geo.aspects`` lists them
(``AspectGrid(aspect, h, w)``), ``geo.h`` / ``geo.w`` is the default one, and
``geo.for_aspect("9:16")`` / ``geo.for_grid(53, 30)`` is the same geometry on another grid
(what one generate call runs on). ``geo.grids`` is every grid (the default alone without aspects).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping, Optional, Sequence

from .config import ModelConfig
from .errors import ConfigError, InputError, ManifestError
from .model_constants import VAE_SPATIAL_FACTOR

#: upstream's sampling aspect ratios (``mix_aspect`` configs; spec §1.3)
UPSTREAM_ASPECTS: tuple[str, ...] = ("1:1", "2:3", "3:2", "16:9", "9:16", "4:5", "5:4", "21:9", "9:21")


def aspect_size(aspect: str, area: float, multiple: int,
                error: type[Exception] = ConfigError) -> tuple[int, int]:
    """Upstream's ``aspect_ratio_to_image_size`` (spec §1.3): (H, W) of about ``area`` at ratio
    ``aspect`` ("rw:rh"), each rounded to a multiple of ``multiple`` and at least one multiple
    (``error`` naming the aspect otherwise)."""
    try:
        rw, rh = (float(v) for v in aspect.split(":"))
    except ValueError:
        raise error(f"aspect ratio must look like '16:9', got {aspect!r}") from None
    if not (rw > 0 and rh > 0 and math.isfinite(rw) and math.isfinite(rh)):
        raise error(f"aspect ratio must be two positive numbers like '16:9', got {aspect!r}")
    ratio = rw / rh
    H = round(math.sqrt(area / ratio) / multiple) * multiple
    W = round(math.sqrt(area * ratio) / multiple) * multiple
    if H < multiple or W < multiple:
        raise error(f"aspect ratio {aspect!r} gives a {H // multiple}x{W // multiple} token grid; "
                    "use a ratio like 16:9")
    return H, W


def frame_geometry(cfg: ModelConfig, aspect: str = "1:1") -> dict[str, int]:
    """Pixel and latent frame size of ``cfg`` at aspect ratio ``"rw:rh"`` (spec §1.3).

    Returns ``{"H", "W", "h", "w", "tokens_per_frame"}``: the pixel frame H x W (area about
    ``(img_size_latent · 16)²``, sides multiples of ``16 · patch``) and its token grid h x w
    (latent / patch). Without a VAE the frame is square ``img_size`` in latent units (aspect is ignored).
    """
    p = cfg.patch_size
    if not cfg.vae:
        side = cfg.latent_img_size
        return {"H": side, "W": side, "h": side // p, "w": side // p, "tokens_per_frame": (side // p) ** 2}
    m = VAE_SPATIAL_FACTOR * p
    H, W = aspect_size(aspect, float((cfg.latent_img_size * VAE_SPATIAL_FACTOR) ** 2), m)
    h, w = H // m, W // m
    return {"H": H, "W": W, "h": h, "w": w, "tokens_per_frame": h * w}


def aspect_grid(cfg: ModelConfig, aspect: str) -> tuple[int, int]:
    """Token grid (h, w) of ``aspect`` ("rw:rh") by the spec's ``aspect_ratio_to_image_size`` rule.

    VAE configs: :func:`frame_geometry` (area ``(img_size·16)²`` px, multiple ``16·patch``).
    Without a VAE the same rule in latent units: area ``latent_img_size²``, multiple ``patch_size``
    (identical grids: both sides of the pixel rule are 16× the latent ones).
    """
    if cfg.vae:
        frame = frame_geometry(cfg, aspect)
        return frame["h"], frame["w"]
    p = cfg.patch_size
    H, W = aspect_size(aspect, float(cfg.latent_img_size ** 2), p, error=InputError)
    return H // p, W // p


@dataclass(frozen=True)
class AspectGrid:
    """One exported aspect ratio and its token grid (h, w)."""

    aspect: str
    h: int
    w: int


@dataclass(frozen=True)
class BlockGeometry:
    """One flow block: index, transformer layers, heads, residual width, token permutation, text-conditioned."""

    index: int
    layers: int
    heads: int
    width: int
    permutation: str
    text: bool


@dataclass(frozen=True)
class Geometry:
    """Token grid, sequence lengths, block layout and sampling defaults of one export.

    Latents are [B, T, channel_size, height, width]; tokens are [B, T·h·w, token_channels]
    with ``height = h · patch_size``. ``rope_length`` is the spec's P (``pt_seq_len``).
    """

    channel_size: int
    patch_size: int
    token_channels: int
    h: int
    w: int
    max_frames: int
    max_batch: int
    text_length: int
    text_width: Optional[int]
    head_dim: int
    rope_length: int
    blocks: tuple[BlockGeometry, ...]
    frame_local: bool
    local_attn_window: Optional[int]
    denoiser_window: Optional[int]
    temporal_causal: int
    has_denoiser: bool
    noise_std: float
    #: every exported aspect and its grid (empty: the one grid (h, w), no aspect names)
    aspects: tuple[AspectGrid, ...] = ()

    # ------------------------------------------------------------ derived
    @property
    def height(self) -> int:
        return self.h * self.patch_size

    @property
    def width(self) -> int:
        return self.w * self.patch_size

    @property
    def tokens_per_frame(self) -> int:
        return self.h * self.w

    @property
    def grids(self) -> tuple[tuple[int, int], ...]:
        """Every exported token grid (h, w), default first, no duplicates."""
        out = [(self.h, self.w)]
        for a in self.aspects:
            if (a.h, a.w) not in out:
                out.append((a.h, a.w))
        return tuple(out)

    @property
    def max_tokens_per_frame(self) -> int:
        return max(h * w for h, w in self.grids)

    @property
    def min_tokens_per_frame(self) -> int:
        return min(h * w for h, w in self.grids)

    @property
    def aspect(self) -> Optional[str]:
        """Name of the current grid's aspect (None when the export names no aspects)."""
        for a in self.aspects:
            if (a.h, a.w) == (self.h, self.w):
                return a.aspect
        return None

    @property
    def aspect_names(self) -> tuple[str, ...]:
        return tuple(a.aspect for a in self.aspects)

    def for_grid(self, h: int, w: int) -> "Geometry":
        """This geometry on token grid (h, w), which must be one of :attr:`grids` (InputError otherwise)."""
        if (h, w) == (self.h, self.w):
            return self
        if (h, w) not in self.grids:
            raise InputError(f"this export has no {h}x{w} token grid (latent {h * self.patch_size}x"
                             f"{w * self.patch_size}); exported grids: {self._grid_listing()}; "
                             "re-export with --aspects for more")
        return replace(self, h=h, w=w)

    def for_aspect(self, aspect: str) -> "Geometry":
        """This geometry on the grid of ``aspect`` (InputError listing the exported aspects otherwise)."""
        for a in self.aspects:
            if a.aspect == aspect:
                return self.for_grid(a.h, a.w)
        if not self.aspects:
            raise InputError(f"this export has one {self.h}x{self.w} token grid and no aspect ratios; "
                             "re-export with --aspects to generate at other aspects")
        raise InputError(f"aspect {aspect!r} is not in this export; exported aspects: "
                         f"{', '.join(self.aspect_names)} (re-export with --aspects {aspect} to add it)")

    def grid_for_size(self, height: int, width: int) -> Optional["Geometry"]:
        """The geometry whose latent frame is height x width (None when no exported grid has it)."""
        p = self.patch_size
        if height % p or width % p or (height // p, width // p) not in self.grids:
            return None
        return self.for_grid(height // p, width // p)

    def _grid_listing(self) -> str:
        names = {}
        for a in self.aspects:
            names.setdefault((a.h, a.w), []).append(a.aspect)
        return ", ".join(f"{h}x{w}" + (f" ({'/'.join(names[(h, w)])})" if (h, w) in names else "")
                         for h, w in self.grids)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def top_index(self) -> int:
        return len(self.blocks) - 1

    @property
    def top(self) -> BlockGeometry:
        return self.blocks[-1]

    @property
    def shallow_blocks(self) -> tuple[int, ...]:
        """Indices of the non-identity blocks below the top (they run as ``shallow_step_k``)."""
        return tuple(b.index for b in self.blocks[:-1] if b.layers > 0)

    @property
    def identity_blocks(self) -> tuple[int, ...]:
        return tuple(b.index for b in self.blocks[:-1] if b.layers == 0)

    # ------------------------------------------------------------ build / persist
    @classmethod
    def from_config(cls, cfg: ModelConfig, grid: tuple[int, int], max_frames: int, max_batch: int,
                    aspects: Sequence[str] = ()) -> "Geometry":
        """Geometry of ``cfg`` on token grid ``grid = (h, w)`` (the default), also covering the grids of
        ``aspects`` (:func:`aspect_grid`)."""
        h, w = grid
        blocks = tuple(BlockGeometry(k, cfg.layers[k], cfg.block_heads(k), cfg.block_width(k),
                                     cfg.block_permutation(k), cfg.block_has_text(k))
                       for k in range(cfg.num_blocks))
        return cls(channel_size=cfg.channel_size, patch_size=cfg.patch_size, token_channels=cfg.token_channels,
                   h=h, w=w, max_frames=max_frames, max_batch=max_batch, text_length=cfg.txt_size,
                   text_width=cfg.text_width, head_dim=cfg.head_dim, rope_length=cfg.rope_seq_len, blocks=blocks,
                   frame_local=bool(cfg.shallow_block_local), local_attn_window=cfg.local_attn_window,
                   denoiser_window=cfg.denoiser_window, temporal_causal=cfg.temporal_causal,
                   has_denoiser=bool(cfg.learnable_self_denoiser), noise_std=cfg.noise_std,
                   aspects=tuple(AspectGrid(a, *aspect_grid(cfg, a)) for a in dict.fromkeys(aspects)))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["blocks"] = [asdict(b) for b in self.blocks]
        d["aspects"] = [asdict(a) for a in self.aspects]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Geometry":
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(data) - {"aspects"})   # manifests before aspects: one grid
        if missing:
            raise ManifestError(f"manifest geometry lacks {', '.join(missing)}; re-export with this starflow-trt")
        try:
            blocks = tuple(BlockGeometry(**b) for b in data["blocks"])
            aspects = tuple(AspectGrid(**a) for a in data.get("aspects", ()))
        except TypeError as exc:
            raise ManifestError(f"manifest geometry has malformed blocks or aspects ({exc}); re-export") from exc
        return cls(**{**{k: data[k] for k in names if k in data}, "blocks": blocks, "aspects": aspects})
