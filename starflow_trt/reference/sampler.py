"""Reference inverse of a flow block: autoregressive (spec §9.2) and block-wise Jacobi (§10).

Both drive :meth:`FlowBlock.step` over a :class:`KVCache`. The block input is
channels-last: [B, T, h, w, c] for the top block, [B·T, 1, h, w, c] for a
shallow-local block. Guidance doubles the batch inside (``[z ; z]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .cache import KVCache
from .flow import FlowBlock, acc_dtype, guide, permute_tokens, unpermute_tokens, video_grid


@dataclass(frozen=True)
class JacobiConfig:
    """Block-wise Jacobi sampling options (spec §10).

    ``schedule="upstream"`` reproduces upstream exactly (the reference sampler implements only
    this one; ``None`` means "the runner's default": upstream here, the runtime's fastest
    schedule in :class:`starflow_trt.runtime.Pipeline`): chunks of ``block_size``
    tokens while the chunk starts in frame 0 (``s <= F``), ``4·block_size`` after,
    previous-frame initialisation of a chunk's first sweep, stop at
    ``delta < threshold`` or ``max_iter``. ``window`` / ``context_length`` (frames)
    set the long-video local attention window of the top block (None: the
    config's ``local_attn_window``; context None: ``window − 1``).
    """

    block_size: int = 64
    max_iter: int = 32
    threshold: float = 1e-3
    schedule: Optional[str] = None
    window: Optional[int] = None
    context_length: Optional[int] = None

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.max_iter < 1 or self.threshold < 0:
            raise ValueError("JacobiConfig needs block_size >= 1, max_iter >= 1, threshold >= 0")


@dataclass
class ChunkLog:
    """One Jacobi chunk: start token, length, sweeps run, last delta."""

    start: int
    length: int
    iterations: int
    delta: float


@dataclass
class BlockTrace:
    """What a block inversion did (graph-call counts, Jacobi chunks)."""

    block: int
    steps: int = 0
    chunks: list[ChunkLog] = field(default_factory=list)


def _new_cache(block: FlowBlock, batch: int, capacity: int, dtype: torch.dtype, device) -> KVCache:
    return KVCache(block.num_layers, batch, block.heads, capacity, block.head_dim, dtype, device)


def _setup(block: FlowBlock, z: torch.Tensor, y: Optional[torch.Tensor], w: float,
           cache: Optional[KVCache], capacity: Optional[int]):
    """Common set-up: doubled float32 input, RoPE table, sequence, cache (§9.2 steps 1-5)."""
    wdtype = block.proj_in.weight.dtype
    acc = acc_dtype(wdtype)
    z32 = z.to(acc)
    text_len = y.shape[1] if block.has_text else 0
    cos, sin = block.rope(z32, text_len)
    if w > 0:
        z32 = torch.cat([z32, z32])
    seq = permute_tokens(z32, block.permutation)
    reuse = cache is not None and cache.prefix is not None and cache.idx > 0
    if cache is None:
        cap = capacity if capacity is not None else text_len + seq.shape[1]
        cache = _new_cache(block, seq.shape[0], cap, wdtype, z.device)
    if block.has_text and not reuse:
        cache.append(block.prefill_text(y.to(wdtype), cos[:text_len], sin[:text_len]))
    return seq, cos, sin, cache, reuse, text_len


def reverse_ar(block: FlowBlock, z: torch.Tensor, y: Optional[torch.Tensor], w: float = 0.0,
               cache: Optional[KVCache] = None, temperature: float = 1.0,
               trace: Optional[BlockTrace] = None) -> torch.Tensor:
    """Autoregressive inversion, one token per step (spec §9.2)."""
    batch = z.shape[0]
    seq, cos, sin, cache, reuse, text_len = _setup(block, z, y, w, cache, None)
    if text_len and temperature != 1.0 and not reuse:
        # text prefill uses the temperature too (§9.3 note): redo it with it
        cache.reset()
        cache.append(block.prefill_text(y.to(block.proj_in.weight.dtype), cos[:text_len], sin[:text_len],
                                        temperature=temperature))
    x = seq.clone()
    if reuse:
        x[:, : cache.prefix.shape[1]] = cache.prefix.to(x.dtype)
    sos = block.sos_embed.to(x.dtype).expand(x.shape[0], 1, -1)
    for t in range(seq.shape[1]):
        if reuse and cache.idx > t + text_len:
            continue
        token = sos if t == 0 else x[:, t - 1 : t]
        rows = slice(cache.idx, cache.idx + 1)
        a, b, kv = block.step(token, cos[rows], sin[rows], cache.past(), temperature=temperature)
        cache.append(kv)
        if trace is not None:
            trace.steps += 1
        if w > 0:
            a, b = guide(a, b, w)
        x[:, t] = (seq[:, t : t + 1] * a + b)[:, 0]
    if w > 0:
        x = x[:batch]
    return unpermute_tokens(x, block.permutation, z.shape).to(z.dtype)


def reverse_jacobi(block: FlowBlock, z: torch.Tensor, y: Optional[torch.Tensor], w: float,
                   jacobi: JacobiConfig, cache: Optional[KVCache] = None,
                   window: Optional[int] = None, context_length: Optional[int] = None,
                   frames: Optional[int] = None, trace: Optional[BlockTrace] = None) -> torch.Tensor:
    """Block-wise Jacobi inversion with the upstream video-aware schedule (spec §10).

    ``frames`` is T_v (1 for shallow-local sequences and images); ``window`` (frames)
    turns on the long-video local window with context re-encoding (§10.4).
    """
    if jacobi.schedule not in (None, "upstream"):
        raise ValueError(f"the reference sampler implements schedule='upstream' only, got {jacobi.schedule!r}")
    batch = z.shape[0]
    if frames is None:
        frames = video_grid(z)[0] if z.dim() == 5 else 1
    text_len_cfg = y.shape[1] if block.has_text else 0
    n_tokens = z[0].numel() // z.shape[-1]
    fs = n_tokens // frames
    capacity = None if window is None else window * fs + text_len_cfg
    seq, cos, sin, cache, reuse, text_len = _setup(block, z, y, w, cache, capacity)
    acc = seq.dtype
    x = torch.empty(seq.shape[0], n_tokens + 1, seq.shape[2], dtype=acc, device=seq.device)
    x[:, 0] = block.sos_embed.to(acc)[0, 0]
    x[:, 1:] = seq
    if reuse:
        x[:, 1 : 1 + cache.prefix.shape[1]] = cache.prefix.to(acc)
    s = cache.idx - text_len if reuse else 0
    if window is not None:
        if context_length is None or not 1 <= context_length < window:
            raise ValueError(f"long-video Jacobi needs 1 <= context_length < window ({window}), got {context_length}")
        wtok, ctx = window * fs, context_length * fs
        target = min(n_tokens, wtok)
    else:
        target = n_tokens
    def step(inp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = slice(cache.idx, cache.idx + inp.shape[1])
        a, b, kv = block.step(inp, cos[rows], sin[rows], cache.past())
        cache.write(kv)
        if trace is not None:
            trace.steps += 1
        return guide(a, b, w) if w > 0 else (a, b)

    chunks = trace.chunks if trace is not None else []
    while True:
        s = upstream_jacobi_phase(step, cache.advance, x, seq, s, target, fs, jacobi, chunks)
        if target >= n_tokens:
            break
        target = min(n_tokens, target + wtok - ctx)
        _reencode(block, x, s, ctx, y, cos, sin, cache, text_len)
        if trace is not None:
            trace.steps += 1
    out = x[:, 1:]
    if w > 0:
        out = out[:batch]
    return unpermute_tokens(out, block.permutation, z.shape).to(z.dtype)


def upstream_jacobi_phase(step: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                          commit: Callable[[int], None], x: torch.Tensor, seq: torch.Tensor, s: int, target: int,
                          fs: int, jacobi: JacobiConfig, chunks: list, progress: Optional[Callable[[int], None]] = None
                          ) -> int:
    """Upstream's block-wise Jacobi over tokens [s, target) (spec §10.2); returns the new ``s``.

    Shared by the reference sampler (torch modules) and the runtime (exported graphs).
    x [B', N+1, c] (row 0 = SOS, row n+1 = token n) is updated in place; seq [B', N, c] is the noise.
    ``step(inp [B', k, c])`` runs the network at the cache's write index, writing but not committing
    the chunk's K/V, and returns the guided (a, b); ``commit(k)`` keeps the K/V of the last call.
    """
    while s < target:
        k = jacobi.block_size if s <= fs else 4 * jacobi.block_size
        if s + k >= target:
            k = target - s
        for i in range(jacobi.max_iter):
            inp = x[:, s - fs : s - fs + k] if (i == 0 and s > fs) else x[:, s : s + k]
            a, b = step(inp)
            new = b + a * seq[:, s : s + k]
            delta = ((new - x[:, s + 1 : s + 1 + k]) ** 2).mean() / (new ** 2).mean()
            x[:, s + 1 : s + 1 + k] = new
            if delta < jacobi.threshold or i == jacobi.max_iter - 1:
                commit(k)  # keep the K/V of this last sweep (no rewind)
                chunks.append(ChunkLog(s, k, i + 1, float(delta)))
                break
        s += k
        if progress is not None:
            progress(s)
    return s


def _reencode(block: FlowBlock, x: torch.Tensor, s: int, ctx: int, y: Optional[torch.Tensor],
              cos: torch.Tensor, sin: torch.Tensor, cache: KVCache, text_len: int) -> None:
    """Long-video context re-encoding (spec §10.4 step 2): cache ← [text ; sos ; last ctx−1 tokens]."""
    cache.reset()
    if text_len:
        cache.append(block.prefill_text(y.to(block.proj_in.weight.dtype), cos[:text_len], sin[:text_len]))
    inp = torch.cat([x[:, :1], x[:, s + 1 - ctx : s]], dim=1)  # sos, tokens s−ctx … s−2
    rows = slice(cache.idx, cache.idx + ctx)
    _, _, kv = block.step(inp, cos[rows], sin[rows], cache.past())
    cache.append(kv)
