"""Sampling options and what a block inversion reports: ``JacobiConfig``, ``BlockTrace``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..defaults import DEFAULT_JACOBI_BLOCK, DEFAULT_JACOBI_ITERS, DEFAULT_JACOBI_THRESHOLD, SCHEDULES


@dataclass(frozen=True)
class JacobiConfig:
    """Block-wise Jacobi sampling options (spec §10).

    ``schedule="upstream"`` reproduces upstream exactly (the reference sampler accepts only
    this one; ``None`` means "the runner's default": upstream in the reference, the runtime's
    fastest schedule in :class:`starflow_trt.runtime.Pipeline`): chunks of ``block_size``
    tokens while the chunk starts in frame 0 (``s <= F``), ``4·block_size`` after,
    previous-frame initialisation of a chunk's first sweep, stop at
    ``delta < threshold`` or ``max_iter``. ``window`` / ``context_length`` (frames)
    set the long-video local attention window of the top block (None: the
    config's ``local_attn_window``; context None: ``window − 1``).
    ``floor``: the relative update below which sweeps stop improving the result (the residual
    floor of a quantised export, measured at calibration; 0 for float graphs). A chunk stops at
    ``delta < max(threshold, floor)`` (:attr:`stop`); ``threshold = 0`` stays exact-only.
    """

    block_size: int = DEFAULT_JACOBI_BLOCK
    max_iter: int = DEFAULT_JACOBI_ITERS
    threshold: float = DEFAULT_JACOBI_THRESHOLD
    schedule: Optional[str] = None
    window: Optional[int] = None
    context_length: Optional[int] = None
    floor: float = 0.0

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.max_iter < 1 or self.threshold < 0 or not self.floor >= 0:
            raise ValueError("JacobiConfig needs block_size >= 1, max_iter >= 1, threshold >= 0, floor >= 0")

    @property
    def stop(self) -> float:
        """The stopping bound on the relative update: ``max(threshold, floor)``, 0 when ``threshold`` is 0."""
        return max(self.threshold, self.floor) if self.threshold > 0 else 0.0


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
