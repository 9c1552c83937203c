"""Transformer layer of STARFlow-V (spec §2.3): pre-norm attention + GELU MLP, RMSNorm.

Module and parameter names follow the upstream state_dict
(``attention.{norm,qkv,proj}``, ``mlp.{norm,main.0,main.2}``).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rope

KV = tuple[torch.Tensor, torch.Tensor]

#: half-precision dtypes: the layers keep FP32 islands (norms, softmax, RoPE) around them
HALF = (torch.float16, torch.bfloat16)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the precision-critical maths: float32 for half inputs (float64 stays float64)."""
    return torch.promote_types(dtype, torch.float32)


class TwoPartMask:
    """Causal attention over an uncopied past: scores against the past and the new keys apart.

    ``new_bias`` [S, S] is added to the scores of the new keys (0 where key j <= query i, −inf
    elsewhere); every past key is visible. The softmax runs over both parts together, so this is
    the same attention as concatenating the K/V, without copying the cache (exported step graphs).

    ``concat``: the same attention spelled the way TensorRT fuses it into one flash kernel
    (its fused-attention guide; NVIDIA/TensorRT#2981): K/V = concat(past, new) along the
    sequence, Q pre-scaled, one Q·Kᵀ, the bias padded with zeros over the past and added,
    softmax, one product with V (:func:`_concat_attention`; the TensorRT graph variants).
    """

    def __init__(self, new_bias: torch.Tensor, concat: bool = False):
        self.new_bias = new_bias
        self.concat = concat


class InCache:
    """Causal attention over a cache that already holds room for the new K/V right after the past.

    ``past`` is (k, v) [B, H, P + S, hd] per layer, views of the cache whose last S slots this
    call writes (its rotated k, v) before one ``scaled_dot_product_attention`` over all P + S
    slots, query i seeing slots ``j <= P + i``. The same attention as concatenating the past
    and the new K/V, without the copy; on CUDA the mask is a lower-right causal bias, which the
    fused kernels apply without a [B, H, S, P] score tensor. Their softmax runs in float32,
    so half inputs need no separate FP32 island here (the torch backend's step).
    """


#: the one :class:`InCache` instance (it carries no state)
IN_CACHE = InCache()

#: Attention masks: ``"causal"`` (query i sees keys ``j <= P + i``), ``None`` (full), a bool tensor,
#: a :class:`TwoPartMask`, or :data:`IN_CACHE`.
Mask = Union[str, torch.Tensor, TwoPartMask, InCache, None]


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` computed in (at least) float32, returned in the input dtype (an FP32 island
    in FP16/BF16 graphs; unchanged maths in float32 / float64)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = _acc(x.dtype)
        if acc == x.dtype and self.weight.dtype == x.dtype:
            return super().forward(x)
        return F.layer_norm(x.to(acc), self.normalized_shape, self.weight.to(acc), self.bias.to(acc),
                            self.eps).to(x.dtype)


class RMSNorm(nn.Module):
    """``x · rsqrt(mean(x²) + 1e-6) · (1 + weight)`` computed in (at least) float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(acc)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1 + self.weight.to(acc))).to(x.dtype)


def causal_mask(queries: int, keys: int, device: torch.device) -> Optional[torch.Tensor]:
    """Bool mask [S, P+S]: query i may attend key j iff ``j <= (keys − queries) + i`` (spec §5)."""
    past = keys - queries
    i = torch.arange(queries, device=device).unsqueeze(1)
    j = torch.arange(keys, device=device).unsqueeze(0)
    return j <= i + past


class Attention(nn.Module):
    """Multi-head self-attention with RoPE on q, k and an optional KV past."""

    def __init__(self, width: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.norm = LayerNorm(width, eps=1e-5)
        self.qkv = nn.Linear(width, 3 * heads * head_dim)
        self.proj = nn.Linear(heads * head_dim, width)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past: Optional[KV] = None,
        mask: Mask = "causal",
        temperature: float = 1.0,
    ) -> tuple[torch.Tensor, KV]:
        """x [B, S, E], cos/sin [S, hd] rows of the new slots, past k/v [B, H, P, hd] (rotated).

        Returns the attention branch output [B, S, E] and this call's rotated k, v [B, H, S, hd].
        """
        b, s, _ = x.shape
        qkv = self.qkv(self.norm(x)).view(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(qkv[:2], cos, sin).unbind(0)   # q and k rotated together
        v = qkv[2]
        scale = (self.head_dim ** -0.25) ** 2 / temperature
        if isinstance(mask, (TwoPartMask, InCache)):
            if isinstance(mask, InCache):
                out = _in_cache_attention(q, k, v, past, scale)
            else:
                attend = _concat_attention if mask.concat else _two_part_attention
                out = attend(q, k, v, past, mask.new_bias, scale)
            return self.proj(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)), (k, v)
        keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        attn_mask, is_causal = None, False
        if isinstance(mask, str):
            if keys.shape[2] == s:
                is_causal = True
            elif s > 1:
                attn_mask = causal_mask(s, keys.shape[2], x.device)
        else:
            attn_mask = mask
        if q.dtype in HALF:   # FP32 softmax island (scores in the half dtype, probabilities cast back)
            out = _half_attention(q, keys, values, attn_mask, is_causal, scale)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, is_causal=is_causal,
                                                 scale=scale)
        out = out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
        return self.proj(out), (k, v)


def _half_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                    is_causal: bool, scale: float) -> torch.Tensor:
    """``scaled_dot_product_attention`` for FP16/BF16 q, k, v [B, H, S, hd]: QKᵀ in the half dtype,
    mask + softmax in float32, probabilities cast back for the product with V."""
    scores = (torch.matmul(q, k.transpose(-1, -2)) * scale).float()
    if is_causal:
        mask = causal_mask(q.shape[2], k.shape[2], q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    return torch.matmul(torch.softmax(scores, -1).to(v.dtype), v)


def _two_part_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: Optional[KV],
                        new_bias: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax([q·Kpastᵀ, q·kᵀ + bias])·[Vpast; v] without concatenating K/V. q, k, v [B, H, S, hd].

    Half q/k/v: the scores are cast to float32 for the bias and the softmax (an FP32 island)."""
    acc = _acc(q.dtype)
    new_scores = (torch.matmul(q, k.transpose(-1, -2)) * scale).to(acc) + new_bias
    if past is None:
        return torch.matmul(torch.softmax(new_scores, -1).to(v.dtype), v)
    p = past[0].shape[2]
    past_scores = (torch.matmul(q, past[0].transpose(-1, -2)) * scale).to(acc)
    probs = torch.softmax(torch.cat([past_scores, new_scores], -1), -1).to(v.dtype)
    return torch.matmul(probs[..., :p], past[1]) + torch.matmul(probs[..., p:], v)


def _concat_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: Optional[KV],
                      new_bias: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax((q·scale)·[Kpast; k]ᵀ + [0 | bias])·[Vpast; v]: :func:`_two_part_attention` in
    TensorRT's fusable form. q, k, v [B, H, S, hd], past k/v [B, H, P, hd], bias [S, S].

    Equal in exact arithmetic; the scale moves onto Q because TensorRT requires it before the first
    MatMul. Same FP32 island for half q/k/v (scores cast to float32 for the bias and the softmax)."""
    acc = _acc(q.dtype)
    keys, values = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
    bias = F.pad(new_bias, (keys.shape[2] - k.shape[2], 0))   # [S, P + S]: every past key visible
    scores = torch.matmul(q * scale, keys.transpose(-1, -2)).to(acc) + bias
    return torch.matmul(torch.softmax(scores, -1).to(v.dtype), values)


def _in_cache_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KV, scale: float) -> torch.Tensor:
    """Write k, v [B, H, S, hd] into the last S slots of ``cache`` (k, v) [B, H, P + S, hd], then
    softmax(q·Kᵀ·scale + causal)·V over every slot (:class:`InCache`)."""
    keys, values = cache
    s, total = q.shape[2], keys.shape[2]
    keys[:, :, total - s:].copy_(k)
    values[:, :, total - s:].copy_(v)
    attn_mask, is_causal = None, False
    if s == total:
        is_causal = s > 1
    elif s > 1:   # a single query sees every slot
        if q.is_cuda:
            from torch.nn.attention.bias import causal_lower_right

            attn_mask = causal_lower_right(s, total)
        else:
            attn_mask = causal_mask(s, total, q.device)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, is_causal=is_causal, scale=scale)


class ExactGELU(nn.GELU):
    """Exact (erf) GELU. Eager: torch's fused kernel. While exporting: spelled
    ``(erf(x / √2) + 1) · x · 0.5``, the order ONNX Runtime fuses (with the preceding bias
    add) into one kernel; torch's own decomposition multiplies in another order that no
    fusion matches and leaves five element-wise ops on the widest activation."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            return (torch.erf(x / math.sqrt(2.0)) + 1.0) * x * 0.5
        return super().forward(x)


class MLP(nn.Module):
    """LayerNorm → Linear(E, 4E) → exact GELU → Linear(4E, E)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = LayerNorm(width, eps=1e-5)
        self.main = nn.Sequential(nn.Linear(width, 4 * width), ExactGELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(self.norm(x))


class AttentionBlock(nn.Module):
    """Pre-norm residual layer: ``z += attn(LN(z))``; ``z += MLP(LN(z))``."""

    def __init__(self, width: int, heads: int, head_dim: int):
        super().__init__()
        self.attention = Attention(width, heads, head_dim)
        self.mlp = MLP(width)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past: Optional[KV] = None,
        mask: Mask = "causal",
        temperature: float = 1.0,
    ) -> tuple[torch.Tensor, KV]:
        a, kv = self.attention(x, cos, sin, past, mask, temperature)
        x = x + a
        return x + self.mlp(x), kv


def run_layers(
    layers: nn.ModuleList,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    past: Optional[list[KV]] = None,
    mask: Mask = "causal",
    temperature: float = 1.0,
) -> tuple[torch.Tensor, list[KV]]:
    """Run every layer; returns the hidden state and each layer's new (k, v)."""
    new_kv = []
    for idx, layer in enumerate(layers):
        h, kv = layer(h, cos, sin, None if past is None else past[idx], mask, temperature)
        new_kv.append(kv)
    return h, new_kv
