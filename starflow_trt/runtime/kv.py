"""Scratch and KV-cache buffers: allocated once per pipeline, grown only when a call needs more.

A block's cache (:class:`~starflow_trt.sampling.KVCache`) is a view ``[layers, 2 (k, v), slots,
batch, heads, hd]`` of one flat buffer: the graphs take and give K/V per layer, sequence-major
(``past_k_l`` [P, batch, heads, hd]), so every layer's prefix ``buf[l, i, :P]`` is a contiguous
input and a step's ``new_k_l`` / ``new_v_l`` outputs are bound straight to ``buf[l, i, idx:idx + S]``.
Nothing is copied per call. Jacobi roll-back and prefix reuse only move ``idx``. Frame groups of
different sizes share one flat workspace viewed with the shape each call needs, so nothing is
reallocated inside the loop.
"""

from __future__ import annotations

from math import prod

import torch

from ..sampling import KVCache

__all__ = ["KVCache", "Workspace"]


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
