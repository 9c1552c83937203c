"""Autoregressive affine flow block ("MetaBlock") and its tensor plumbing (spec §3, §6, §9.3).

One function, :meth:`FlowBlock.step`, is the network of the block: shifted input
tokens (+ a KV past) → the affine parameters ``(a, b)`` of those tokens and their
K/V. Likelihood, AR sampling, Jacobi sampling and the exported ONNX graphs all
call it; nothing else re-implements the block.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
import torch.nn.functional as F

from ..config import ModelConfig
from ..model_constants import SOFTPLUS_OFFSET
from .layers import KV, AttentionBlock, Mask, RMSNorm, run_layers
from .rope import rope_table


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the affine maths: float32, or float64 when verifying in float64."""
    return torch.promote_types(dtype, torch.float32)


# ------------------------------------------------------------------ layouts
def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[..., C, H, W] → [..., H/p, W/p, p·p·C]; token channel ``(r·p + s)·C + ch`` (spec §3.1)."""
    if x.dim() < 4:
        return x
    *lead, c, hh, ww = x.shape
    x = x.reshape(*lead, c, hh // p, p, ww // p, p)
    n = len(lead)
    x = x.permute(*range(n), n + 1, n + 3, n + 2, n + 4, n)
    return x.reshape(*lead, hh // p, ww // p, p * p * c)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: [..., h, w, p·p·C] → [..., C, h·p, w·p]."""
    if x.dim() < 4:
        return x
    *lead, h, w, cc = x.shape
    c = cc // (p * p)
    x = x.reshape(*lead, h, w, p, p, c)
    n = len(lead)
    x = x.permute(*range(n), n + 4, n, n + 2, n + 1, n + 3)
    return x.reshape(*lead, c, h * p, w * p)


def permute_tokens(x: torch.Tensor, kind: str) -> torch.Tensor:
    """[B, T, h, w, c] (or [B, h, w, c]) → [B, N, c] in the block's sequence order (spec §3.2)."""
    b, c = x.shape[0], x.shape[-1]
    if kind == "flip_within_frame" and x.dim() == 5:
        return x.flatten(2, 3).flip(2).reshape(b, -1, c)
    seq = x.reshape(b, -1, c)
    return seq if kind == "identity" else seq.flip(1)


def unpermute_tokens(seq: torch.Tensor, kind: str, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`permute_tokens` back to ``shape`` (its batch dim may differ)."""
    b = seq.shape[0]
    if kind == "flip_within_frame" and len(shape) == 5:
        t, h, w, c = shape[1:]
        return seq.reshape(b, t, h * w, c).flip(2).reshape(b, t, h, w, c)
    if kind != "identity":
        seq = seq.flip(1)
    return seq.reshape(b, *shape[1:])


def guide(a: torch.Tensor, b: torch.Tensor, w: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits-guided CFG on ``(a, b)`` of the doubled batch ``[cond ; uncond]`` (spec §9.3).

    Both halves of the result hold the guided ``(a_g, b_g)``.
    """
    half = a.shape[0] // 2
    a_c, a_u, b_c, b_u = a[:half], a[half:], b[:half], b[half:]
    s = torch.clamp(a_c / a_u, max=1.0) ** 2
    den = 1 + w - w * s
    a_g = a_c / torch.sqrt(den)
    b_g = ((1 + w) * b_c - (w * s) * b_u) / den
    return torch.cat([a_g, a_g]), torch.cat([b_g, b_g])


def video_grid(x: torch.Tensor) -> tuple[int, int, int]:
    """(frames, h, w) of a channels-last block input [B, T, h, w, c] or [B, h, w, c]."""
    if x.dim() == 5:
        return x.shape[1], x.shape[2], x.shape[3]
    return 1, x.shape[1], x.shape[2]


class FlowBlock(nn.Module):
    """Causal transformer predicting a per-token affine map (spec §6)."""

    def __init__(self, cfg: ModelConfig, index: int):
        super().__init__()
        c, width = cfg.token_channels, cfg.block_width(index)
        heads, hd = cfg.block_heads(index), cfg.head_dim
        P, L = cfg.rope_seq_len, cfg.txt_size
        self.index = index
        self.token_channels = c
        self.head_dim, self.heads = hd, heads
        self.pt_seq_len = P
        self.soft_clip = cfg.soft_clip
        self.use_softplus = bool(cfg.use_softplus)
        self.has_text = cfg.block_has_text(index)
        self.permutation = cfg.block_permutation(index)
        self.sos_embed = nn.Parameter(torch.zeros(1, 1, c))
        # deprecated upstream buffer; loaded, never read (spec §2.2)
        self.register_buffer("attn_mask", torch.ones(P * P + L, P * P + L).tril())
        self.proj_in = nn.Linear(c, width)
        self.proj_out = nn.Linear(width, 2 * c)
        if self.has_text:
            self.proj_txt = nn.Linear(cfg.text_width or 1, width)
        self.attn_blocks = nn.ModuleList(AttentionBlock(width, heads, hd) for _ in range(cfg.layers[index]))
        self.final_norm = RMSNorm(width) if cfg.use_final_norm else nn.Identity()

    @property
    def num_layers(self) -> int:
        return len(self.attn_blocks)

    def rope(self, x: torch.Tensor, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE table [Lt + N, hd] for a block input shaped like ``x`` (unpermuted)."""
        t, h, w = video_grid(x)
        return rope_table(self.head_dim, t, h, w, text_len if self.has_text else 0, self.pt_seq_len,
                          dtype=acc_dtype(x.dtype), device=x.device)

    # ------------------------------------------------------------- network
    def prefill_text(self, y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     past: Optional[list[KV]] = None, temperature: float = 1.0, mask: Mask = "causal") -> list[KV]:
        """Text tokens through every layer (causal among themselves) → their K/V per layer.

        y [B, L, D]; cos/sin [L, hd] (rows 0..L−1); returns [(k, v) [B, H, L, hd]] per layer.
        mask: ``"causal"`` or an equivalent explicit one (graph export: the TensorRT form).
        """
        _, kv = run_layers(self.attn_blocks, self.proj_txt(y.to(self.proj_txt.weight.dtype)), cos, sin, past,
                           mask, temperature)
        return kv

    def step(self, tokens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             past: Optional[list[KV]] = None, text: Optional[torch.Tensor] = None,
             temperature: float = 1.0, mask: Mask = "causal") -> tuple[torch.Tensor, torch.Tensor, list[KV]]:
        """The block's network on S input tokens.

        tokens [B, S, c]: already shifted (SOS / previous tokens), sequence order.
        cos/sin [S, hd] (or [L + S, hd] with ``text``): RoPE rows of the new slots.
        past: per layer (k, v) [B, H, P, hd], rotated; queries see it all, causal among themselves.
        text [B, L, D]: run the text tokens in the same pass, first (forward / prefill mode).
        mask: ``"causal"`` or an explicit bool [S, P + S] (graph export: no shape branches).
        Returns ``a`` (scale, after softplus) and ``b`` (shift), [B, S, c] float32 (float64 when
        verifying), and the new (k, v) of every layer [B, H, (L +) S, hd].
        """
        h = self.proj_in(tokens.to(self.proj_in.weight.dtype))
        text_len = 0
        if text is not None:
            h = torch.cat([self.proj_txt(text.to(h.dtype)), h], dim=1)
            text_len = text.shape[1]
        h, kv = run_layers(self.attn_blocks, h, cos, sin, past, mask, temperature)
        # the affine head (proj_out, soft clip, softplus) runs in proj_out's dtype: FP32 in FP16/BF16 exports
        o = self.proj_out(self.final_norm(h[:, text_len:]).to(self.proj_out.weight.dtype))
        if self.soft_clip > 0:
            o = self.soft_clip * torch.tanh(o / self.soft_clip)
        acc = acc_dtype(o.dtype)
        c = self.token_channels
        a_raw, b = o[..., :c].to(acc), o[..., c:].to(acc)
        a = F.softplus(a_raw + SOFTPLUS_OFFSET) if self.use_softplus else torch.exp(a_raw)
        return a, b, kv

    # --------------------------------------------------- data → noise
    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, guidance: float = 0.0,
                rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None, mask: Mask = "causal",
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[KV]]:
        """x [B, T, h, w, c] → (z like x, logdet [B, N, c] slot order, prefix [B, N, c], K/V).

        ``prefix`` is the permuted clean input (what a context prefill stores);
        the K/V cover ``[text ; SOS-shifted tokens]`` of every layer. ``rope``: the
        (cos, sin) table [Lt + N, hd] when the caller has it (exported graphs take it as input).
        """
        text = y if self.has_text else None
        cos, sin = rope if rope is not None else self.rope(x, 0 if text is None else text.shape[1])
        s = permute_tokens(x, self.permutation)
        u = torch.cat([self.sos_embed.to(s.dtype).expand(s.shape[0], 1, -1), s[:, :-1]], dim=1)
        a, b, kv = self.step(u, cos, sin, text=text, mask=mask)
        if guidance > 0:
            a, b = guide(a, b, guidance)
        zs = (s.to(a.dtype) - b) / a
        z = unpermute_tokens(zs, self.permutation, x.shape).to(x.dtype)
        return z, -torch.log(a), s, kv


class IdentityBlock(nn.Module):
    """A non-top block with zero layers: identity map, zero logdet, no parameters (spec §2.1)."""

    has_text = False
    num_layers = 0

    def __init__(self, index: int):
        super().__init__()
        self.index = index

    def forward(self, x: torch.Tensor, y: Optional[torch.Tensor] = None, guidance: float = 0.0):
        n = x.shape[0]
        logdet = torch.zeros(n, x[0].numel() // x.shape[-1], x.shape[-1], dtype=acc_dtype(x.dtype), device=x.device)
        return x, logdet, x.reshape(n, -1, x.shape[-1]), []
