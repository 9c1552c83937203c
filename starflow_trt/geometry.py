"""``Geometry``: the one vocabulary of sizes shared by config, export, manifest and runtime.

Every fact has one name here; the manifest stores ``Geometry.to_dict()`` and the
runtime reads only this (never ``manifest.config``) for shapes and sampling defaults::

    geo = Geometry.from_config(cfg, grid=(30, 53), max_frames=21, max_batch=4)
    geo.tokens_per_frame        # h · w
    geo.blocks[geo.top_index]   # BlockGeometry(layers, heads, width, permutation, text)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional

from .config import ModelConfig
from .errors import ManifestError


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
    def from_config(cls, cfg: ModelConfig, grid: tuple[int, int], max_frames: int, max_batch: int) -> "Geometry":
        """Geometry of ``cfg`` on token grid ``grid = (h, w)``."""
        h, w = grid
        blocks = tuple(BlockGeometry(k, cfg.layers[k], cfg.block_heads(k), cfg.block_width(k),
                                     cfg.block_permutation(k), cfg.block_has_text(k))
                       for k in range(cfg.num_blocks))
        return cls(channel_size=cfg.channel_size, patch_size=cfg.patch_size, token_channels=cfg.token_channels,
                   h=h, w=w, max_frames=max_frames, max_batch=max_batch, text_length=cfg.txt_size,
                   text_width=cfg.text_width, head_dim=cfg.head_dim, rope_length=cfg.rope_seq_len, blocks=blocks,
                   frame_local=bool(cfg.shallow_block_local), local_attn_window=cfg.local_attn_window,
                   denoiser_window=cfg.denoiser_window, temporal_causal=cfg.temporal_causal,
                   has_denoiser=bool(cfg.learnable_self_denoiser), noise_std=cfg.noise_std)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["blocks"] = [asdict(b) for b in self.blocks]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Geometry":
        names = {f.name for f in fields(cls)}
        missing = sorted(names - set(data))
        if missing:
            raise ManifestError(f"manifest geometry lacks {', '.join(missing)}; re-export with this starflow-trt")
        try:
            blocks = tuple(BlockGeometry(**b) for b in data["blocks"])
        except TypeError as exc:
            raise ManifestError(f"manifest geometry has malformed blocks ({exc}); re-export") from exc
        return cls(**{**{k: data[k] for k in names}, "blocks": blocks})
