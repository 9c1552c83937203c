"""Learnable self-denoiser (spec §12.1-12.2): a non-causal, frame-windowed transformer."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import ModelConfig
from ..model_constants import DENOISER_LAYERS
from .layers import AttentionBlock, RMSNorm, run_layers
from .rope import rope_table


def denoiser_mask(text_len: int, frames: int, tokens_per_frame: int, temporal_causal: int,
                  window: Optional[int], device: Optional[torch.device] = None) -> torch.Tensor:
    """Bool mask [S, S], S = L + T·F; True = may attend (spec §12.2, floor division)."""
    L, F, A = text_len, tokens_per_frame, temporal_causal
    G = 10000 if window is None else window
    slots = torch.arange(L + frames * F, device=device)
    q, k = slots.unsqueeze(1), slots.unsqueeze(0)
    k_frame = torch.div(k - L, F, rounding_mode="floor")
    q_frame = torch.div(q - L, F, rounding_mode="floor")
    # max(q - L, 0), not clamp: ONNX Clip on INT64 is outside TensorRT's parser table (engine/ops.py), Max is in it
    q_frame_upper = torch.div(torch.maximum(q - L, torch.zeros_like(q)), F, rounding_mode="floor")
    inside = (k_frame >= q_frame + A - 1 - G) & (k_frame <= q_frame_upper + A - 1)
    return (k < L) | inside


class Denoiser(nn.Module):
    """``learnable_self_denoiser``: patchified latents (+ text) → score-like output of width c."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c, width, hd = cfg.token_channels, cfg.channels, cfg.head_dim
        self.head_dim = hd
        self.pt_seq_len = cfg.rope_seq_len
        self.temporal_causal = cfg.temporal_causal
        self.window = cfg.denoiser_window
        self.conditional = bool(cfg.conditional_denoiser)
        self.proj_in = nn.Linear(c, width)
        self.proj_out = nn.Linear(width, c)
        if self.conditional:
            self.proj_txt = nn.Linear(cfg.text_width or 1, width)
        self.attn_blocks = nn.ModuleList(
            AttentionBlock(width, cfg.denoiser_heads, hd) for _ in range(DENOISER_LAYERS))
        self.final_norm = RMSNorm(width) if cfg.use_final_norm else nn.Identity()

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None,
                rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """x [B, T, h, w, c] (or [B, h, w, c]); y [B, L, D] → d with the shape of x.

        rope: the (cos, sin) table [L + T·h·w, hd] when the caller has it (exported graph input).
        """
        video = x.dim() == 5
        frames, h, w = (x.shape[1], x.shape[2], x.shape[3]) if video else (1, x.shape[1], x.shape[2])
        text_len = y.shape[1] if self.conditional else 0
        if rope is None:
            rope = rope_table(self.head_dim, frames, h, w, text_len, self.pt_seq_len,
                              dtype=torch.promote_types(x.dtype, torch.float32), device=x.device)
        cos, sin = rope
        mask = None
        if self.temporal_causal > 0 and video:
            mask = denoiser_mask(text_len, frames, h * w, self.temporal_causal, self.window, x.device)
        hidden = self.proj_in(x.reshape(x.shape[0], -1, x.shape[-1]))
        if self.conditional:
            hidden = torch.cat([self.proj_txt(y), hidden], dim=1)
        hidden, _ = run_layers(self.attn_blocks, hidden, cos, sin, None, mask)
        out = self.proj_out(self.final_norm(hidden[:, text_len:]))
        return out.reshape(x.shape)
