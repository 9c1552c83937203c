"""One KV-cache abstraction for every sampler (spec §8): graphs and torch modules share it.

A block's cache is one buffer ``[layers, 2 (k, v), capacity, B', heads, hd]`` and a write
index. Slot ranges are contiguous, sequence-major views (what the exported step graphs take
and give, bound with no copy); torch modules read the same slots as ``[B', heads, P, hd]``
views. ``step`` calls write at ``[idx, idx + S)`` without moving ``idx``; ``commit`` keeps them,
so a Jacobi sweep that must be redone simply does not commit (upstream's append + rewind).

Keys are stored already rotated: a slot's RoPE row never changes between the call that writes
it and the calls that read it (positions are slot-indexed and long-video re-encoding rewrites
the cache from slot 0), so rotating once at write time gives exactly upstream's values.
"""

from __future__ import annotations

from typing import Optional

import torch

KV = tuple[torch.Tensor, torch.Tensor]


class KVCache:
    """K/V of one block: ``buffer`` [layers, 2, capacity, B', heads, hd] and the write index ``idx``."""

    def __init__(self, buffer: torch.Tensor):
        self.buffer = buffer
        self.layers = buffer.shape[0]
        self.capacity = buffer.shape[2]
        self.idx = 0

    @classmethod
    def allocate(cls, layers: int, batch: int, heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: Optional[torch.device] = None) -> "KVCache":
        return cls(torch.zeros((layers, 2, capacity, batch, heads, head_dim), dtype=dtype, device=device))

    # ---------------------------------------------------- sequence-major views
    def views(self, lo: int, hi: int) -> list[torch.Tensor]:
        """Slots ``[lo, hi)`` as ``k_0, v_0, k_1, …`` each [hi − lo, B', heads, hd] (contiguous views)."""
        # one slice + unbind: 2·layers separate index ops cost ~5x more per graph call (two calls per step)
        return list(self.buffer[:, :, lo:hi].flatten(0, 1).unbind(0))

    def past(self) -> list[torch.Tensor]:
        """Committed slots ``[0, idx)``."""
        return self.views(0, self.idx)

    def slots(self, n: int) -> list[torch.Tensor]:
        """The next ``n`` slots ``[idx, idx + n)``, to be written by a step."""
        if self.idx + n > self.capacity:
            raise RuntimeError(f"KV cache overflow: {self.idx} + {n} > capacity {self.capacity}")
        return self.views(self.idx, self.idx + n)

    # ---------------------------------------------------- torch-module views
    def past_layers(self) -> list[KV]:
        """Committed slots per layer as (k, v) [B', heads, idx, hd] (views, no copy)."""
        perm = lambda t: t.permute(1, 2, 0, 3)
        return [(perm(self.buffer[l, 0, : self.idx]), perm(self.buffer[l, 1, : self.idx])) for l in range(self.layers)]

    def write_layers(self, kv: list[KV]) -> None:
        """Store per-layer (k, v) [B', heads, S, hd] at ``[idx, idx + S)`` (not committed)."""
        views = self.slots(kv[0][0].shape[2])
        for l, (k, v) in enumerate(kv):
            views[2 * l].copy_(k.permute(2, 0, 1, 3))
            views[2 * l + 1].copy_(v.permute(2, 0, 1, 3))

    # ---------------------------------------------------- index
    def commit(self, n: int) -> None:
        """Keep the ``n`` slots written by the last step."""
        self.idx += n

    def reset(self) -> None:
        self.idx = 0
