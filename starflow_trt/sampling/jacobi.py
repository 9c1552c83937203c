"""Jacobi schedules (spec §10): one phase solves tokens ``[s, target)`` of a :class:`~.block.BlockInversion`.

``upstream`` is upstream's block-wise schedule, exactly; ``sliding`` commits converged prefixes
and slides on (fewer network calls for the same fixed point). Both read and write ``inv.work``
(row 0 = SOS, row n+1 = token n) and return the new ``s``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from .options import ChunkLog, JacobiConfig

if TYPE_CHECKING:
    from .block import BlockInversion


#: a prefix ending in a once-evaluated position must pass this fraction of the threshold (``predictive``).
#: Measured on the bench config (8 prompts, threshold 1e-3): margin 1 gave a median distance to AR of
#: 1.15x upstream's (3.4e-4 vs 3.0e-4), 0.75 gives 0.93x at 0.66x upstream's deep tokens, 0.5 gives 0.58x at 0.85x.
FIRST_PASS_MARGIN = 0.75


def upstream_phase(inv: "BlockInversion", jac: JacobiConfig, s: int, target: int, fs: int) -> int:
    """Upstream's block-wise Jacobi (spec §10.2): a chunk is re-swept until ``delta < threshold``
    or ``max_iter``; its first sweep starts from the co-located tokens one frame earlier."""
    x, seq = inv.work, inv.seq
    while s < target:
        k = jac.block_size if s <= fs else 4 * jac.block_size
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


def sliding_phase(inv: "BlockInversion", jac: JacobiConfig, s: int, target: int, fs: int,
                  first_pass: bool = False) -> int:
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
    earlier (final by then): the same fixed point, a closer start than upstream's noise (kept
    where that token is a given context token, whose (a, b) this phase never computed).
    ``threshold = 0`` commits exact tokens only: the autoregressive result. A window whose
    first position has been evaluated ``max_iter`` times is committed as it is (upstream's cap).

    ``first_pass`` (the ``predictive`` schedule): the test also covers positions evaluated once.
    It is the same test upstream applies to every chunk it commits — the relative update between
    the inputs whose K/V are kept and the outputs computed from them — applied to the first
    evaluation, whose inputs here are the previous-frame prediction instead of upstream's noise.
    A prefix that passes is committed after one evaluation; one that fails (noise starts in
    frame 0, poor predictions) is re-evaluated as in ``sliding``. ``threshold = 0`` still commits
    exact tokens only.
    """
    work, seq = inv.work, inv.seq
    exact = s           # tokens < exact are exact
    frontier = s        # tokens < frontier have an initial guess
    evals = torch.zeros(target, dtype=torch.int32, device=seq.device)   # network evaluations of each position
    if inv.scale is None:
        inv.scale, inv.shift = torch.empty_like(seq), torch.empty_like(seq)
        inv.known_from = inv.known = s   # positions before the first phase (a context) have no (a, b)
    verified = False    # the last sweep committed every position it evaluated for the second time
    while s < target:
        k = jac.block_size if s <= fs else 4 * jac.block_size
        e = min(s + k, target)
        if verified and frontier > s:
            e = min(target, max(e, frontier + k), s + 2 * k)
        exact = max(exact, s)
        if e > frontier:
            lo = max(frontier, inv.known_from + fs, s + 1)   # position s's input is final already
            if e > lo and lo - fs < inv.known:
                hi = min(e, inv.known + fs)
                prev = slice(lo - fs, hi - fs)
                work[:, lo + 1 : hi + 1] = inv.shift[:, prev] + inv.scale[:, prev] * seq[:, lo:hi]
            frontier = e
        a, b = inv.evaluate(work[:, s:e])
        inv.scale[:, s:e], inv.shift[:, s:e] = a, b
        inv.known = max(inv.known, e)
        evals[s:e] += 1
        new = b + a * seq[:, s:e]
        sq = ((new - work[:, s + 1 : e + 1]) ** 2).mean(dim=(0, 2))   # per token
        mag = (new ** 2).mean(dim=(0, 2))
        prefix_delta = torch.cumsum(sq, 0) / torch.cumsum(mag, 0).clamp_min(1e-30)
        work[:, s + 1 : e + 1] = new
        exact = min(e, exact + 1)
        twice = int(torch.cumprod(evals[s:e] >= 2, 0).sum())   # leading positions evaluated twice
        if first_pass:   # the longest prefix that passes upstream's chunk test (stricter on first evaluations)
            once = evals[s:e] < 2
            bound = torch.where(once, FIRST_PASS_MARGIN * jac.stop, jac.stop)
            good = (torch.cumsum(sq, 0) < bound * torch.cumsum(mag, 0).clamp_min(1e-30)).nonzero()
            m = max(exact - s, int(good[-1]) + 1 if len(good) else 0)
        else:            # every prefix of the committed one passes
            bad = (prefix_delta[:twice] >= jac.stop).nonzero()
            m = max(exact - s, int(bad[0]) if len(bad) else twice)
        if int(evals[s]) >= jac.max_iter:
            m = e - s
        verified = 0 < twice <= m
        inv.trace.chunks.append(ChunkLog(s, m, int(evals[s]), float(prefix_delta[m - 1])))
        s += m
        inv.commit(m, s)
    return s


def predictive_phase(inv: "BlockInversion", jac: JacobiConfig, s: int, target: int, fs: int) -> int:
    """``sliding`` whose residual test also covers first evaluations (see :func:`sliding_phase`)."""
    return sliding_phase(inv, jac, s, target, fs, first_pass=True)


PHASES: dict[str, Callable[["BlockInversion", JacobiConfig, int, int, int], int]] = {
    "upstream": upstream_phase, "sliding": sliding_phase, "predictive": predictive_phase}
