"""KV-cache and scratch buffers: allocated once per pipeline, grown only when a call needs more.

A block's cache is one buffer ``[layers, 2 (k, v), slots, batch, heads, hd]``: the
graphs take and give K/V per layer, sequence-major (``past_k_l`` [P, batch, heads, hd]),
so every layer's prefix ``buf[l, i, :P]`` is a contiguous input and a step's
``new_k_l`` / ``new_v_l`` outputs are bound straight to ``buf[l, i, idx:idx + S]``.
Nothing is copied per call. Jacobi roll-back and prefix reuse only move ``idx``.
Frame groups of different sizes share one flat workspace viewed with the shape
each call needs, so nothing is reallocated inside the loop.
"""

from __future__ import annotations

from math import prod
from typing import Optional

import torch

from ..export.graphs import kv_names


class Workspace:
    """Flat preallocated buffers handed out as shaped, contiguous views."""

    def __init__(self, device: torch.device):
        self.device = device
        self.allocations = 0
        self._flat: dict[str, torch.Tensor] = {}

    def reserve(self, name: str, numel: int, dtype: torch.dtype) -> None:
        """Allocate (once) a flat buffer of at least ``numel`` elements."""
        cur = self._flat.get(name)
        if cur is not None and cur.numel() >= numel and cur.dtype == dtype:
            return
        self._flat[name] = torch.zeros(max(numel, 1), dtype=dtype, device=self.device)
        self.allocations += 1

    def view(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A contiguous view of ``shape`` on the start of buffer ``name`` (no allocation)."""
        flat = self._flat[name]
        n = prod(shape)
        if n > flat.numel():
            raise RuntimeError(f"workspace {name!r} holds {flat.numel()} elements, {shape} needs {n}")
        return flat[:n].view(shape)


class KVCache:
    """One block's cache: a view ``[layers, 2, capacity, batch, heads, hd]`` and a write index."""

    def __init__(self, buffer: torch.Tensor):
        self.buffer = buffer
        self.layers = buffer.shape[0]
        self.capacity = buffer.shape[2]
        self.idx = 0
        self.prefix: Optional[torch.Tensor] = None

    def _named(self, prefix: str, lo: int, hi: int) -> dict[str, torch.Tensor]:
        views = [self.buffer[l, i, lo:hi] for l in range(self.layers) for i in range(2)]  # k_0, v_0, k_1, …
        return dict(zip(kv_names(self.layers, prefix), views))

    def past(self) -> dict[str, torch.Tensor]:
        """Committed slots ``[0, idx)`` as graph inputs ``past_k_l`` / ``past_v_l`` (contiguous views)."""
        return self._named("past", 0, self.idx)

    def slots(self, n: int) -> dict[str, torch.Tensor]:
        """The next ``n`` slots ``[idx, idx + n)`` as graph outputs ``new_k_l`` / ``new_v_l``."""
        if self.idx + n > self.capacity:
            raise RuntimeError(f"KV cache overflow: {self.idx} + {n} > capacity {self.capacity}")
        return self._named("new", self.idx, self.idx + n)
