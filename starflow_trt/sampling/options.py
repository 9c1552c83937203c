"""What a block inversion reports: ``BlockTrace``, ``ChunkLog``; the options type, :class:`JacobiConfig`, is
:mod:`starflow_trt.jacobi_config`'s."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..defaults import SCHEDULES
from ..jacobi_config import JacobiConfig


@dataclass
class ChunkLog:
    """One Jacobi chunk: start token, length, sweeps run, last delta."""

    start: int
    length: int
    iterations: int
    delta: float


@dataclass
class BlockTrace:
    """What one block inversion did: network evaluations (``steps``, re-encodings included),
    tokens evaluated, and the Jacobi chunks it committed. ``name``: the graph, in the runtime."""

    block: int
    name: str = ""
    steps: int = 0
    tokens: int = 0
    chunks: list[ChunkLog] = field(default_factory=list)

    def to_stats(self) -> dict:
        """JSON form of ``result.stats["jacobi"]`` entries."""
        return {"block": self.name or self.block, "calls": self.steps, "tokens": self.tokens,
                "chunks": [{"start": c.start, "length": c.length, "iterations": c.iterations, "delta": c.delta}
                           for c in self.chunks]}
