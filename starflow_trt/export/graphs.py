"""Stage graphs: thin torch wrappers around the reference modules, one per ONNX graph.

Every wrapper only moves tensors between the graph contract and the reference
call (KV layout, frame folding); the maths is :meth:`FlowBlock.step`,
:meth:`FlowBlock.prefill_text`, :meth:`FlowBlock.forward` and :class:`Denoiser`.

Contract (documented in the manifest and README):

* KV caches are **sequence-major per layer**: inputs ``past_k_{l}`` / ``past_v_{l}``
  ``[P, B, heads, hd]`` and outputs ``new_k_{l}`` / ``new_v_{l}`` ``[S, B, heads, hd]``, K stored
  **after** RoPE. The runtime keeps one buffer ``[layers, 2, capacity, B, heads, hd]``: every
  ``[:P]`` prefix of a layer is a contiguous view (zero-copy input) and every new slot range
  ``[idx, idx + S)`` is a contiguous view (zero-copy output). Inside the graph the past is
  never concatenated with the new keys (two-part attention, :class:`TwoPartMask`), so a step
  copies nothing of the cache. The TensorRT variants (``concat_attention``, :mod:`.trt_variant`)
  spell the same attention as concat(past, new) → pre-scaled Q·Kᵀ → softmax → ·V, the form
  TensorRT fuses; their IO is the same. Rotating at write time equals upstream's re-rotation at every
  read because a slot's RoPE row never changes while it is cached (spec §4.3, §8.1).
* Positions enter as precomputed RoPE rows ``rope_cos / rope_sin [S, hd]`` (float32)
  of the slots being written, so graphs are shape- and position-agnostic
  (long-video re-encoding just feeds rows from slot 0 again).
* ``scale`` is ``a`` after softplus, ``shift`` is ``b``; both float32.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..reference.denoiser import Denoiser
from ..reference.flow import FlowBlock
from ..reference.layers import IN_CACHE, KV, TwoPartMask, causal_mask


def additive_causal_mask(queries: int, keys: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Float mask [S, P+S]: 0 where query i may attend key j (j <= P + i), −inf elsewhere.

    Same attention as the bool mask, but the exported graph adds it to the scores instead
    of the Where/IsNaN chain the exporter emits for bool masks (~25% of a step on ORT CPU).
    """
    allowed = causal_mask(queries, keys, device)
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))


def kv_to_layers(flat: tuple[torch.Tensor, ...]) -> list[KV]:
    """(k_0, v_0, k_1, …) each [P, B, H, hd] → per layer (k, v) [B, H, P, hd]."""
    return [(flat[i].permute(1, 2, 0, 3), flat[i + 1].permute(1, 2, 0, 3)) for i in range(0, len(flat), 2)]


def layers_to_kv(layers: list[KV]) -> tuple[torch.Tensor, ...]:
    """Per layer (k, v) [B, H, S, hd] → (k_0, v_0, k_1, …) each [S, B, H, hd]."""
    return tuple(t.permute(2, 0, 1, 3).contiguous() for kv in layers for t in kv)


class TextPrefillGraph(nn.Module):
    """``deep_prefill``: text [B, L, D] + RoPE rows [L, hd] → new_k_l, new_v_l [L, B, H, hd] per layer.

    ``concat_attention``: the TensorRT form (pre-scaled Q, additive causal mask; no past here).
    """

    def __init__(self, block: FlowBlock, concat_attention: bool = False):
        super().__init__()
        self.block = block
        self.concat_attention = concat_attention

    def forward(self, text: torch.Tensor, rope_cos: torch.Tensor,
                rope_sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        mask = "causal"
        if self.concat_attention:
            n = text.shape[1]
            mask = TwoPartMask(additive_causal_mask(n, n, text.dtype, text.device), concat=True)
        return layers_to_kv(self.block.prefill_text(text, rope_cos, rope_sin, mask=mask))


class StepGraph(nn.Module):
    """``deep_step`` / ``shallow_step_i``: S shifted tokens + past K/V → (scale, shift, new K/V).

    tokens [B, S, c] (sequence order, already shifted: SOS / previous tokens);
    rope_cos/sin [S, hd] (rows of slots P … P+S−1); then past_k_0, past_v_0, … [P, B, H, hd].
    Outputs scale, shift [B, S, c] float32, then new_k_0, new_v_0, … [S, B, H, hd].
    Query i attends to the whole past and to new tokens ≤ i. ``concat_attention``: the TensorRT
    form (K/V concatenated with the past inside the graph), same IO.
    """

    def __init__(self, block: FlowBlock, concat_attention: bool = False):
        super().__init__()
        self.block = block
        self.concat_attention = concat_attention

    def forward(self, tokens: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s = tokens.shape[1]
        mask = TwoPartMask(additive_causal_mask(s, s, tokens.dtype, tokens.device), concat=self.concat_attention)
        a, b, kv = self.block.step(tokens, rope_cos, rope_sin, kv_to_layers(past), mask=mask)
        return (a.float(), b.float(), *layers_to_kv(kv))


class CachedStepGraph(nn.Module):
    """The step of :class:`StepGraph` over a cache that holds its new slots right after the past
    (the torch backend; not exported): one SDPA over the cache prefix, no two-part scores.

    tokens [B, S, c], rope_cos/sin [S, hd]; then per layer k, v [P + S, B, H, hd], views of the
    cache whose last S slots receive this call's rotated K/V (the graph's ``new_k_l`` / ``new_v_l``).
    Returns scale, shift [B, S, c] float32.
    """

    def __init__(self, block: FlowBlock):
        super().__init__()
        self.block = block

    def forward(self, tokens: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor,
                *cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, b, _ = self.block.step(tokens, rope_cos, rope_sin, kv_to_layers(cache), mask=IN_CACHE)
        return a.float(), b.float()


class ForwardGraph(nn.Module):
    """``forward_i``: block input x [B, T, h, w, c] (+ text) → (z [B, T, h, w, c], logdet).

    Shallow-local blocks fold frames into the batch (rope rows [F, hd], logdet
    [B, T, F, c]); the top block sees the whole video (rope rows [L + T·F, hd],
    logdet [B, T·F, c]). logdet is −log(a) in sequence-slot order, float32.
    """

    def __init__(self, block: FlowBlock, frame_local: bool):
        super().__init__()
        self.block = block
        self.frame_local = frame_local

    def forward(self, x: torch.Tensor, rope_cos: torch.Tensor, rope_sin: torch.Tensor,
                text: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        shape = x.shape
        inp = x.reshape(-1, 1, *shape[2:]) if self.frame_local else x
        n = inp.shape[1] * inp.shape[2] * inp.shape[3] + (0 if text is None else text.shape[1])
        mask = additive_causal_mask(n, n, x.dtype, x.device)
        z, logdet, _, _ = self.block(inp, text, rope=(rope_cos, rope_sin), mask=mask)
        if self.frame_local:
            logdet = logdet.reshape(shape[0], shape[1], -1, shape[-1])
        return z.reshape(shape), logdet.float()


class DenoiserGraph(nn.Module):
    """``denoiser``: x [B, T, h, w, c], text [B, L, D], rope rows [L + T·h·w, hd] → d [B, T, h, w, c]."""

    def __init__(self, denoiser: Denoiser):
        super().__init__()
        self.denoiser = denoiser

    def forward(self, x: torch.Tensor, text: torch.Tensor, rope_cos: torch.Tensor,
                rope_sin: torch.Tensor) -> torch.Tensor:
        wdtype = self.denoiser.proj_in.weight.dtype   # FP16/BF16 exports: float32 IO, cast inside
        return self.denoiser(x.to(wdtype), text.to(wdtype), rope=(rope_cos, rope_sin)).to(x.dtype)
