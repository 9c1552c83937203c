"""Inverting one flow block over a step function (spec §9-§11), written once for every sampler.

gpt-fast style: the loops below drive a :class:`BlockModel` — the block's network bound to its
KV cache and RoPE rows. The reference binds torch modules (``reference/sampler.py``), the runtime
binds exported graphs (``runtime/stages/blocks.py``); the loops never see which.

    inv = BlockInversion(block, seq, BlockTrace(k), hooks)   # seq [B', N, c]: the block's noise ζ
    start = inv.prefill(prefix)    # text prefill, or [text ; context] (prefix [B', P, c], spec §11)
    inv.run(solver, frames, start) # AR (§9.2), upstream or sliding Jacobi (§10) with long-video windows (§10.4)
    inv.tokens                     # [B', N, c] in sequence order
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..errors import GenerationCancelled
from .jacobi import new_schedule
from .kv import KVCache
from .options import BlockTrace, JacobiConfig


class BlockModel(ABC):
    """One flow block as the samplers see it (what gpt-fast calls "the model").

    ``cache``: the block's :class:`KVCache`; ``sos``: its start-of-sequence vector [c].
    """

    cache: KVCache
    sos: torch.Tensor

    @abstractmethod
    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The network on shifted input tokens [B', S, c] at slots ``[cache.idx, cache.idx + S)``.

        Writes their K/V there without committing and returns ``(a, b)`` [B', S, c] as the
        sampler uses them (guided when the block runs the doubled ``[cond ; uncond]`` batch).
        Valid until the next call.
        """

    @abstractmethod
    def prefill_text(self) -> None:
        """Reset the cache and commit the text K/V (slots ``[0, L)``); an untexted block only resets."""

    def prefill(self, tokens: Optional[torch.Tensor] = None) -> None:
        """cache ← ``[text ; tokens]``, committed; tokens [B', S, c] are shifted inputs (row 0 = SOS)."""
        self.prefill_text()
        if tokens is not None:
            self.step(tokens)
            self.cache.commit(tokens.shape[1])

    def prefill_context(self, tokens: torch.Tensor) -> None:
        """Context prefill (spec §11): like :meth:`prefill`; a model may fuse text and tokens in one pass."""
        self.prefill(tokens)


@dataclass
class Hooks:
    """Caller hooks: ``progress(tokens_done)`` after every commit; ``should_stop()`` before every
    network evaluation (a True answer raises :class:`GenerationCancelled`)."""

    progress: Optional[Callable[[int], None]] = None
    should_stop: Optional[Callable[[], bool]] = None

    def check(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise GenerationCancelled("generation cancelled: should_stop() returned True")


@dataclass(frozen=True)
class Solver:
    """How to invert a block: autoregressive (``jacobi`` None) or Jacobi with ``schedule``;
    ``window`` / ``context_length`` (frames, resolved): long-video windows, top block only."""

    jacobi: Optional[JacobiConfig] = None
    schedule: str = "upstream"
    window: Optional[int] = None
    context_length: Optional[int] = None

    def unwindowed(self) -> "Solver":
        """The same solver without long-video windows (shallow blocks never have one)."""
        return Solver(self.jacobi, self.schedule)


class BlockInversion:
    """One block's inverse, computed in place on ``work`` [B', N+1, c] (row 0 = SOS, row n+1 = token n).

    ``seq`` [B', N, c] is the block's noise in sequence order; ``trace`` counts what ran.
    """

    def __init__(self, block: BlockModel, seq: torch.Tensor, trace: BlockTrace, hooks: Optional[Hooks] = None):
        self.block, self.seq, self.trace = block, seq, trace
        self.hooks = hooks or Hooks()
        self.work = torch.empty(seq.shape[0], seq.shape[1] + 1, seq.shape[2], dtype=seq.dtype, device=seq.device)
        self.work[:, 0] = block.sos
        self.work[:, 1:] = seq

    @property
    def tokens(self) -> torch.Tensor:
        """[B', N, c]: the block's input in sequence order (final after :meth:`run`)."""
        return self.work[:, 1:]

    # ------------------------------------------------------------ prefill
    def prefill(self, prefix: Optional[torch.Tensor] = None) -> int:
        """Text prefill, or ``[text ; context]`` for a prefix [B', P, c] of known tokens; returns P."""
        if prefix is None:
            self.block.prefill_text()
            return 0
        p = prefix.shape[1]
        self.work[:, 1 : 1 + p] = prefix
        self.block.prefill_context(self.work[:, :p])   # [sos ; prefix without its last token]
        return p

    # ------------------------------------------------------------ primitives
    def evaluate(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One network evaluation (a Jacobi sweep or an AR step) at the cache's write index."""
        self.hooks.check()
        a, b = self.block.step(tokens)
        self.trace.steps += 1
        self.trace.tokens += tokens.shape[1]
        return a, b

    def commit(self, k: int, done: int) -> None:
        """Keep the K/V of the last evaluation's first ``k`` tokens; tokens ``[0, done)`` are final."""
        self.block.cache.commit(k)
        if self.hooks.progress is not None:
            self.hooks.progress(done)

    # ------------------------------------------------------------ driver
    def run(self, solver: Solver, frames: int, start: int = 0) -> torch.Tensor:
        """Produce tokens ``[start, N)``; ``frames``: T_v (1 for frame-local sequences). Returns :attr:`tokens`."""
        n = self.seq.shape[1]
        if solver.jacobi is None:
            self._autoregressive(start)
            return self.tokens
        fs = n // frames
        target = n if solver.window is None else min(n, solver.window * fs)
        schedule = new_schedule(solver.schedule)   # its state spans the windows of this inversion
        s = start
        while True:
            s = schedule.solve(self, solver.jacobi, s, target, fs)
            if target >= n:
                break
            wtok, ctx = solver.window * fs, solver.context_length * fs
            target = min(n, target + wtok - ctx)
            self._reencode(s, ctx)
        return self.tokens

    def _autoregressive(self, start: int) -> None:
        """One token per step (spec §9.2)."""
        work, seq = self.work, self.seq
        for t in range(start, seq.shape[1]):
            a, b = self.evaluate(work[:, t : t + 1])
            work[:, t + 1] = (seq[:, t : t + 1] * a + b)[:, 0]
            self.commit(1, t + 1)

    def _reencode(self, s: int, ctx: int) -> None:
        """Long-video context re-encoding (spec §10.4): cache ← [text ; sos ; tokens s−ctx … s−2]."""
        self.block.prefill(torch.cat([self.work[:, :1], self.work[:, s + 1 - ctx : s]], dim=1))
        self.trace.steps += 1
