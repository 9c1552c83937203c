"""Jacobi schedules (spec §10): each solves tokens ``[s, target)`` of a block inversion
(:class:`~.schedule.Inversion`) and returns the new ``s``.

``upstream`` is upstream's block-wise schedule, exactly; ``sliding`` commits converged prefixes
and slides on (fewer network calls for the same fixed point); ``predictive`` is ``sliding``
whose residual test also covers first evaluations. All read and write ``inv.work``
(row 0 = SOS, row n+1 = token n). :func:`new_schedule` makes one per block inversion.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional

import numpy as np
import torch

from .options import ChunkLog, JacobiConfig
from .schedule import Inversion, Schedule


#: a prefix ending in a once-evaluated position must pass this fraction of the threshold (``predictive``).
#: Measured on the bench config (8 prompts, threshold 1e-3): margin 1 gave a median distance to AR of
#: 1.15x upstream's (3.4e-4 vs 3.0e-4), 0.75 gives 0.93x at 0.66x upstream's deep tokens, 0.5 gives 0.58x at 0.85x.
FIRST_PASS_MARGIN = 0.75


def _chunk(jac: JacobiConfig, s: int, fs: int) -> int:
    """Upstream's chunk size at ``s``: ``block_size`` while the chunk starts in frame 0 (``s <= fs``), 4x after."""
    return jac.block_size if s <= fs else 4 * jac.block_size


class Upstream(Schedule):
    """Upstream's block-wise Jacobi (spec §10.2): a chunk is re-swept until ``delta < threshold``
    or ``max_iter``; its first sweep starts from the co-located tokens one frame earlier. Stateless."""

    def solve(self, inv: Inversion, jac: JacobiConfig, s: int, target: int, fs: int) -> int:
        x, seq = inv.work, inv.seq
        while s < target:
            k = _chunk(jac, s, fs)
            if s + k >= target:
                k = target - s
            for i in range(jac.max_iter):
                inp = x[:, s - fs : s - fs + k] if (i == 0 and s > fs) else x[:, s : s + k]
                a, b = inv.evaluate(inp)
                new = b + a * seq[:, s : s + k]
                delta = ((new - x[:, s + 1 : s + 1 + k]) ** 2).mean() / (new ** 2).mean()
                x[:, s + 1 : s + 1 + k] = new
                if delta < jac.stop or i == jac.max_iter - 1:
                    inv.trace.chunks.append(ChunkLog(s, k, i + 1, float(delta)))
                    inv.commit(k, s + k)  # keep the K/V of this last sweep (no rewind)
                    break
            s += k
        return s


@dataclass
class AffineMemory:
    """The latest (a, b) the network gave each position, kept across the phases of one inversion.

    ``scale`` / ``shift`` [B', N, c] (like ``seq``). Invariants: positions ``[known_from, known)``
    hold (a, b) of their latest evaluation, nothing else does; ``known_from`` is the first
    phase's start (the positions before it — a given context — were never evaluated) and never
    moves; ``known`` only grows. A committed position's (a, b) are final.
    """

    scale: torch.Tensor
    shift: torch.Tensor
    known_from: int
    known: int

    @classmethod
    def empty(cls, seq: torch.Tensor, start: int) -> "AffineMemory":
        return cls(torch.empty_like(seq), torch.empty_like(seq), start, start)

    def record(self, s: int, e: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """(a, b) [B', e−s, c] of positions ``[s, e)``, just evaluated."""
        self.scale[:, s:e], self.shift[:, s:e] = a, b
        self.known = max(self.known, e)

    def predict(self, work: torch.Tensor, seq: torch.Tensor, lo: int, e: int, fs: int) -> None:
        """Start positions ``[lo, e)`` at ``b + a·ζ_n`` with (a, b) of the co-located token one frame
        earlier, where that one is known (positions whose previous frame was never evaluated keep their start)."""
        lo = max(lo, self.known_from + fs)
        if e > lo and lo - fs < self.known:
            hi = min(e, self.known + fs)
            prev = slice(lo - fs, hi - fs)
            work[:, lo + 1 : hi + 1] = self.shift[:, prev] + self.scale[:, prev] * seq[:, lo:hi]


@dataclass
class SweepCursors:
    """Where one sliding phase stands. Invariant at the top of each sweep: ``s <= frontier``;
    the phase ends when ``s >= target``. A sweep evaluates the window ``[s, e)`` and commits
    at least its first token, the one exact token (its input, token ``s − 1``, was final before
    the sweep), so every sweep advances ``s``.
    """

    #: tokens < s are committed (final, their K/V in the cache)
    s: int
    #: tokens < frontier have an initial guess in ``work`` (later ones still hold their noise)
    frontier: int
    #: [target] int32 on the host: network evaluations of each position during this phase
    evals: np.ndarray
    #: the last sweep committed every position it evaluated for the second time
    verified: bool = False

    @classmethod
    def start(cls, s: int, target: int) -> "SweepCursors":
        return cls(s, s, np.zeros(target, dtype=np.int32))


@dataclass(frozen=True)
class SweepSums:
    """Prefix sums [e − s] of one sweep's window ``[s, e)``, on the host in the tokens' dtype: ``update`` of each
    token's squared change, ``value`` of its squared new value (means over rows and channels).

    The stopping tests are a few small vector ops per sweep: on the host, after one transfer, they cost a
    fraction of the ~15 tensor dispatches they took on the device (the loop reads their result anyway)."""

    update: np.ndarray
    value: np.ndarray

    @classmethod
    def of(cls, new: torch.Tensor, old: torch.Tensor) -> "SweepSums":
        """From the window's new and previous tokens [B', e − s, c]."""
        per_token = torch.stack([new - old, new]).square_().mean(dim=(1, 3)).cumsum_(1)   # [2, e − s]
        if per_token.dtype not in (torch.float32, torch.float64):   # 16-bit: numpy has no bfloat16
            per_token = per_token.float()
        update, value = per_token.cpu().numpy()
        return cls(update, value)

    @cached_property   # the stopping test and the chunk log both read it
    def relative(self) -> np.ndarray:
        """Upstream's test quantity for every prefix: Σ update / Σ value."""
        return self.update / np.maximum(self.value, 1e-30)


class Sliding(Schedule):
    """Sliding-window Jacobi: after every sweep commit the longest converged prefix, refill the window.

    Windows start at upstream's sizes k (``block_size`` in frame 0, ``4·block_size`` after).
    A prefix is committed when it is exact (all its inputs were final before the sweep) or
    when upstream's own test holds on every prefix of it (mean squared update over mean
    squared value below ``threshold``) and each of its tokens has been evaluated at least
    twice, so that, as in upstream, the test compares two network evaluations and never a
    heuristic guess. Its K/V come from the inputs of that sweep, as upstream's last iteration.

    Instead of re-solving a converged chunk head while its tail converges, the window slides
    on; after a sweep that committed everything it evaluated twice, the next window also takes
    k new positions (at most 2k in all), so one call verifies a chunk and starts the next.
    A new position n starts from ``b + a·ζ_n`` with (a, b) of the co-located token one frame
    earlier (final by then; :class:`AffineMemory`): the same fixed point, a closer start than
    upstream's noise (kept where that token is a given context token, whose (a, b) this
    schedule never computed). ``threshold = 0`` commits exact tokens only: the autoregressive
    result. A window whose first position has been evaluated ``max_iter`` times is committed
    as it is (upstream's cap).

    State: :attr:`memory` lives across the phases (long-video windows) of one inversion; the
    :class:`SweepCursors` live for one phase.
    """

    def __init__(self) -> None:
        self.memory: Optional[AffineMemory] = None

    def solve(self, inv: Inversion, jac: JacobiConfig, s: int, target: int, fs: int) -> int:
        work, seq = inv.work, inv.seq
        if self.memory is None:
            self.memory = AffineMemory.empty(seq, s)
        mem = self.memory
        c = SweepCursors.start(s, target)
        while c.s < target:
            s = c.s
            k = _chunk(jac, s, fs)
            e = min(s + k, target)   # the sweep evaluates positions [s, e)
            if c.verified and c.frontier > s:
                e = min(target, max(e, c.frontier + k), s + 2 * k)
            if e > c.frontier:
                mem.predict(work, seq, max(c.frontier, s + 1), e, fs)   # position s's input is final already
                c.frontier = e
            a, b = inv.evaluate(work[:, s:e])
            mem.record(s, e, a, b)
            c.evals[s:e] += 1
            new = b + a * seq[:, s:e]
            sums = SweepSums.of(new, work[:, s + 1 : e + 1])
            work[:, s + 1 : e + 1] = new
            twice = int(np.cumprod(c.evals[s:e] >= 2).sum())   # leading positions evaluated twice
            m = max(1, self._committable(jac, c.evals[s:e], sums, twice))   # 1: the exact token
            if c.evals[s] >= jac.max_iter:
                m = e - s
            c.verified = 0 < twice <= m
            inv.trace.chunks.append(ChunkLog(s, m, int(c.evals[s]), float(sums.relative[m - 1])))
            c.s = s + m
            inv.commit(m, c.s)
        return c.s

    def _committable(self, jac: JacobiConfig, evals: np.ndarray, sums: SweepSums, twice: int) -> int:
        """Tokens of the window that converged: the longest prefix of the positions evaluated twice whose every
        prefix passes upstream's test (``evals`` [e−s]: evaluations per position so far)."""
        bad = np.flatnonzero(sums.relative[:twice] >= jac.stop)
        return int(bad[0]) if len(bad) else twice


class Predictive(Sliding):
    """``sliding`` whose residual test also covers positions evaluated once.

    It is the same test upstream applies to every chunk it commits — the relative update between
    the inputs whose K/V are kept and the outputs computed from them — applied to the first
    evaluation, whose inputs here are the previous-frame prediction instead of upstream's noise.
    A prefix that passes is committed after one evaluation; one that fails (noise starts in
    frame 0, poor predictions) is re-evaluated as in ``sliding``. ``threshold = 0`` still commits
    exact tokens only. Once-evaluated positions must pass ``FIRST_PASS_MARGIN`` of the threshold.
    """

    def _committable(self, jac, evals, sums, twice):
        """The longest prefix that passes upstream's chunk test (stricter on first evaluations)."""
        bound = np.where(evals < 2, np.float32(FIRST_PASS_MARGIN * jac.stop), np.float32(jac.stop))
        good = np.flatnonzero(sums.update < bound * np.maximum(sums.value, 1e-30))
        return int(good[-1]) + 1 if len(good) else 0


#: schedule name → its class (the names of :data:`starflow_trt.defaults.SCHEDULES`)
SCHEDULE_TYPES: dict[str, type[Schedule]] = {"upstream": Upstream, "sliding": Sliding, "predictive": Predictive}


def new_schedule(name: str) -> Schedule:
    """A fresh schedule named ``name`` for one block inversion (its state starts empty)."""
    return SCHEDULE_TYPES[name]()
