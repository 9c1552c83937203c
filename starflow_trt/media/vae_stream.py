"""Streaming VAE decode: chain a first and a step graph over latent frames; frame counts.

A video for the VAE has ``1 + 4n`` frames (latent frame 0 decodes to one frame, each later
one to four).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ..errors import InputError


def check_frame_count(frames: int) -> None:
    """InputError unless ``frames`` is ``1 + 4n`` (n ≥ 0)."""
    if frames < 1 or (frames - 1) % 4:
        raise InputError(f"a video for the VAE needs 1 + 4n frames, got {frames}; trim or pad it "
                         f"(e.g. to {1 + 4 * max(0, (frames - 1) // 4)})")


StepFn = Callable[..., Sequence[torch.Tensor]]


def decode_streaming(first: StepFn, step: StepFn, latents: torch.Tensor,
                     chunks: Optional[Sequence[int]] = None,
                     on_frames: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
    """Chain ``first`` (latent frame 0) and ``step`` (the rest, ``chunks`` latent frames at a time).

    ``first(latents) -> (frames, *caches)``, ``step(latents, *caches) -> (frames, *caches)``: torch
    modules or any callables with that contract. latents [B, T, z, h, w] raw VAE space →
    frames [B, 1 + 4(T-1), 3, sh, sw]. ``chunks`` defaults to one latent frame per step.
    """
    t = latents.shape[1]
    chunks = list(chunks) if chunks is not None else [1] * (t - 1)
    if any(c < 1 for c in chunks) or sum(chunks) != t - 1:
        raise InputError(f"chunks {chunks} must be ≥ 1 each and sum to {t - 1} (latent frames after the first)")
    frames, *caches = first(latents[:, :1])
    pieces = [frames]
    if on_frames:
        on_frames(frames)
    start = 1
    for c in chunks:
        frames, *caches = step(latents[:, start:start + c], *caches)
        pieces.append(frames)
        if on_frames:
            on_frames(frames)
        start += c
    return torch.cat(pieces, dim=1)

