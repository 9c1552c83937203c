"""Preallocated per-block KV cache (spec §8) for the reference sampler.

Keys are stored already rotated: a slot's RoPE row never changes between the
call that writes it and the calls that read it (positions are slot-indexed and
long-video re-encoding rewrites the cache from slot 0), so rotating once at
write time gives exactly the values upstream gets by re-rotating at every read.
"""

from __future__ import annotations

from typing import Optional

import torch

from .layers import KV


class KVCache:
    """K/V buffers [layers][B', H, cap, hd] with one shared write index.

    ``write`` stores a call's K/V at ``[idx, idx + S)`` without advancing;
    ``advance`` commits them. A Jacobi iteration that must be redone simply
    does not advance (upstream's append + rewind), so nothing is reallocated.
    """

    def __init__(self, layers: int, batch: int, heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, device: Optional[torch.device] = None):
        shape = (layers, batch, heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.idx = 0
        self.prefix: Optional[torch.Tensor] = None

    def past(self) -> list[KV]:
        """Committed entries ``[0, idx)`` of every layer (views, no copy)."""
        return [(self.k[l, :, :, : self.idx], self.v[l, :, :, : self.idx]) for l in range(self.k.shape[0])]

    def write(self, kv: list[KV]) -> None:
        """Store new entries (each [B', H, S, hd]) at ``[idx, idx + S)``; error past capacity."""
        n = kv[0][0].shape[2]
        if self.idx + n > self.capacity:
            raise RuntimeError(f"KV cache overflow: {self.idx} + {n} > capacity {self.capacity}")
        for l, (k, v) in enumerate(kv):
            self.k[l, :, :, self.idx : self.idx + n] = k
            self.v[l, :, :, self.idx : self.idx + n] = v

    def append(self, kv: list[KV]) -> None:
        """Write and commit."""
        self.write(kv)
        self.advance(kv[0][0].shape[2])

    def advance(self, n: int) -> None:
        self.idx += n

    def reset(self) -> None:
        self.idx = 0
