"""3-D rotary position tables of STARFlow-V (spec §4).

A table has one row per sequence slot; a slot's row depends only on the slot,
so a cache entry rotated once at write time stays valid for every later read.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

ROPE_THETA = 10000.0
LATENT_BAND = 8  # frequencies of the time/text band


def rope_frequencies(head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial ``f`` [K] and time/text ``g`` [8] frequencies, float32 (spec §4.1)."""
    half = head_dim // 2
    ds = half - LATENT_BAND
    if head_dim % 4 or ds <= 0 or ds % 2:
        raise ValueError(f"RoPE needs head_dim divisible by 4 and >= 16, got {head_dim}")
    k = ds // 2
    f = 1.0 / (ROPE_THETA ** (torch.arange(0, ds, 2, dtype=torch.float32)[:k] / ds))
    g = 1.0 / (ROPE_THETA ** (torch.arange(0, LATENT_BAND, dtype=torch.float32) / LATENT_BAND))
    return f, g


def rope_positions(frames: int, h: int, w: int, text_len: int, pt_seq_len: int) -> torch.Tensor:
    """Slot positions ``(px, py, pt)`` [L + frames·h·w, 3] float32: text rows first (spec §4.2)."""
    scale = math.sqrt(h * w)
    i = torch.arange(h, dtype=torch.float32) / scale * pt_seq_len
    j = torch.arange(w, dtype=torch.float32) / scale * pt_seq_len
    t = torch.arange(frames, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(t, i, j, indexing="ij"), dim=-1)  # [T, h, w, (t, px, py)]
    video = grid.reshape(-1, 3)[:, [1, 2, 0]]
    if text_len == 0:
        return video
    text = torch.zeros(text_len, 3, dtype=torch.float32)
    text[:, 2] = torch.arange(text_len, dtype=torch.float32) / text_len * pt_seq_len
    return torch.cat([text, video], dim=0)


def rope_table(
    head_dim: int,
    frames: int,
    h: int,
    w: int,
    text_len: int,
    pt_seq_len: int,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` tables [L + frames·h·w, head_dim], angles duplicated in place (spec §4.3).

    Built in float32 like upstream; returned in ``dtype`` (float64 only for verification).
    """
    f, g = rope_frequencies(head_dim)
    pos = rope_positions(frames, h, w, text_len, pt_seq_len)
    angles = torch.cat([pos[:, :1] * f, pos[:, 1:2] * f, pos[:, 2:3] * g], dim=-1)
    angles = angles.repeat_interleave(2, dim=-1)
    cos, sin = angles.cos(), angles.sin()
    return cos.to(device=device, dtype=dtype), sin.to(device=device, dtype=dtype)


def pair_rotation(head_dim: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """R [hd, hd] with ``(u @ R)_{2m} = −u_{2m+1}``, ``(u @ R)_{2m+1} = u_{2m}`` (one ±1 per column)."""
    r = torch.zeros(head_dim, head_dim, dtype=dtype, device=device)
    even = torch.arange(0, head_dim, 2, device=device)
    r[even + 1, even] = -1.0
    r[even, even + 1] = 1.0
    return r


def apply_rope(u: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of ``u`` [..., S, hd] by the angles of ``cos``/``sin`` [S, hd].

    ``u'_{2m} = u_{2m} cos − u_{2m+1} sin``, ``u'_{2m+1} = u_{2m+1} cos + u_{2m} sin``.
    The pair swap is a product with a signed permutation matrix: exact (each output is one
    ±u plus zeros) and one MatMul in an exported graph instead of split/negate/stack/reshape.
    """
    rotated = torch.matmul(u, pair_rotation(u.shape[-1], u.dtype, u.device))
    return (u * cos + rotated * sin).to(u.dtype)
