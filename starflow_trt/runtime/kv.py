"""KV-cache and scratch buffers for one generate call, allocated once.

Graph KV layout is sequence-major ``[slots, layers, 2, batch, heads, hd]``, so a
cache prefix ``buf[:P]`` is a contiguous input and a step's ``new_kv`` output is
bound straight to ``buf[idx:idx + S]``. Jacobi roll-back and prefix reuse only
move ``idx``. Frame groups of different sizes share one flat workspace viewed
with the shape each call needs, so nothing is reallocated inside the loop.
"""

from __future__ import annotations

from math import prod
from typing import Optional

import torch


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
    """One block's cache: a view ``[capacity, layers, 2, batch, heads, hd]`` and a write index."""

    def __init__(self, buffer: torch.Tensor):
        self.buffer = buffer
        self.capacity = buffer.shape[0]
        self.idx = 0
        self.prefix: Optional[torch.Tensor] = None

    def past(self) -> torch.Tensor:
        """Committed slots ``[0, idx)`` (a contiguous view)."""
        return self.buffer[: self.idx]

    def slots(self, n: int) -> torch.Tensor:
        """The next ``n`` slots ``[idx, idx + n)``, where a step writes its new K/V."""
        if self.idx + n > self.capacity:
            raise RuntimeError(f"KV cache overflow: {self.idx} + {n} > capacity {self.capacity}")
        return self.buffer[self.idx : self.idx + n]
