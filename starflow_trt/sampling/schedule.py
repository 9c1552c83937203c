"""The contract between a block inversion and a Jacobi schedule (spec §10).

:class:`~.block.BlockInversion` drives a :class:`Schedule` one phase at a time (one phase per
long-video window, §10.4); the schedule sees the inversion only through :class:`Inversion`.
Any state a schedule carries across phases lives on the schedule object, which is created
afresh for every block inversion (:func:`~.jacobi.new_schedule`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

import torch

from .options import BlockTrace, JacobiConfig


class Inversion(Protocol):
    """What a schedule reads and writes of a block inversion.

    ``work`` [B', N+1, c]: row 0 = SOS, row n+1 = token n (the schedule writes its iterates there);
    ``seq`` [B', N, c]: the block's noise ζ in sequence order; ``trace``: chunks are logged there.
    """

    work: torch.Tensor
    seq: torch.Tensor
    trace: BlockTrace

    def evaluate(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One network evaluation on shifted inputs [B', S, c] at the cache's write index → (a, b) [B', S, c]."""
        ...

    def commit(self, k: int, done: int) -> None:
        """Keep the K/V of the last evaluation's first ``k`` tokens; tokens ``[0, done)`` are final."""
        ...


class Schedule(ABC):
    """A Jacobi schedule: how the tokens of one window are solved (one instance per block inversion)."""

    @abstractmethod
    def solve(self, inv: Inversion, jac: JacobiConfig, s: int, target: int, fs: int) -> int:
        """Solve tokens ``[s, target)`` (tokens < s are final, their K/V committed); returns the new ``s``.

        ``fs``: tokens per frame. Every token the schedule reports done is committed in the cache.
        """
