"""The sampling core's loops against a fake step function: AR, upstream and sliding Jacobi,
context prefill, long-video windows with re-encoding, hooks (no model, no export: milliseconds)."""

from __future__ import annotations

import pytest
import torch

from starflow_trt.errors import GenerationCancelled
from starflow_trt.sampling import BlockInversion, BlockTrace, Hooks, JacobiConfig, Solver
from starflow_trt.sampling import jacobi as jacobi_module

from . import sampling_fakes
from .sampling_fakes import C, FakeBlock, reference_ar

B, FRAMES, FS, L = 2, 4, 6, 2      # batch, frames, tokens per frame, text tokens
N = FRAMES * FS


def problem(seed: int = 0, frames: int = FRAMES):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randn(B, frames * FS, C, generator=g, dtype=torch.float64)
    text = torch.randn(L, B, C, generator=g, dtype=torch.float64)
    return seq, text


def invert(seq, text, solver, frames=FRAMES, prefix=None, hooks=None, capacity=None):
    block = FakeBlock(B, capacity or L + seq.shape[1], text)
    trace = BlockTrace(0)
    inv = BlockInversion(block, seq, trace, hooks)
    out = inv.run(solver, frames, inv.prefill(prefix)).clone()
    return out, trace, block


def test_autoregressive_matches_the_token_loop():
    seq, text = problem()
    done = []
    out, trace, block = invert(seq, text, Solver(), hooks=Hooks(progress=done.append))
    torch.testing.assert_close(out, reference_ar(seq, FakeBlock(B, 1).sos, text), rtol=1e-12, atol=1e-12)
    assert trace.steps == trace.tokens == N and block.evaluations == N
    assert done == list(range(1, N + 1)) and block.prefills == ["text"]


@pytest.mark.parametrize("schedule", ["upstream", "sliding", "predictive"])
def test_jacobi_threshold_zero_is_autoregressive(schedule):
    seq, text = problem(1)
    ar = reference_ar(seq, FakeBlock(B, 1).sos, text)
    jac = JacobiConfig(block_size=4, max_iter=4 * 4 + 1, threshold=0.0, schedule=schedule)
    out, trace, _ = invert(seq, text, Solver(jac, schedule))
    torch.testing.assert_close(out, ar, rtol=1e-12, atol=1e-12)
    assert sum(c.length for c in trace.chunks) == N   # every token committed once


def test_upstream_chunk_schedule():
    # chunks of block_size while the chunk starts in frame 0 (s <= F), 4·block_size after, clipped
    seq, text = problem(2)
    jac = JacobiConfig(block_size=2, max_iter=9, threshold=0.0, schedule="upstream")
    _, trace, block = invert(seq, text, Solver(jac, "upstream"))
    assert [(c.start, c.length) for c in trace.chunks] == [(0, 2), (2, 2), (4, 2), (6, 2), (8, 8), (16, 8)]
    assert all(c.iterations == 9 for c in trace.chunks) and block.evaluations == trace.steps == 6 * 9


def test_upstream_stops_at_threshold():
    seq, text = problem(3)
    jac = JacobiConfig(block_size=4, max_iter=30, threshold=1e-8, schedule="upstream")
    out, trace, _ = invert(seq, text, Solver(jac, "upstream"))
    assert all(c.iterations < 30 and c.delta < 1e-8 for c in trace.chunks)
    assert (out - reference_ar(seq, FakeBlock(B, 1).sos, text)).abs().max() < 1e-4   # delta is squared


def test_sliding_needs_fewer_evaluations_for_the_same_tolerance():
    seq, text = problem(4)
    ar = reference_ar(seq, FakeBlock(B, 1).sos, text)
    runs = {}
    for schedule in ("upstream", "sliding"):
        jac = JacobiConfig(block_size=4, max_iter=30, threshold=1e-10, schedule=schedule)
        out, trace, _ = invert(seq, text, Solver(jac, schedule))
        runs[schedule] = trace.steps
        assert (out - ar).abs().max() < 1e-5
    assert runs["sliding"] < runs["upstream"], runs


def weak_affine(history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A block whose tokens barely depend on their past (the previous-frame prediction is close)."""
    mean = history.mean(0)
    return 1.0 + 0.1 * torch.tanh(0.05 * mean), 0.05 * torch.sin(mean)


def test_predictive_commits_first_evaluations_that_pass_the_test(monkeypatch):
    # frames after the first are committed after one evaluation when the previous-frame prediction
    # passes the test; every committed chunk passes upstream's test, and threshold 0 stays exact (above)
    monkeypatch.setattr(sampling_fakes, "affine", weak_affine)
    seq, text = problem(11)
    ar = reference_ar(seq, FakeBlock(B, 1).sos, text)
    tokens, err = {}, {}
    for schedule in ("upstream", "sliding", "predictive"):
        jac = JacobiConfig(block_size=FS, max_iter=30, threshold=3e-4, schedule=schedule)
        out, trace, _ = invert(seq, text, Solver(jac, schedule))
        tokens[schedule], err[schedule] = trace.tokens, float((out - ar).abs().max())
        assert sum(c.length for c in trace.chunks) == N
        assert all(c.delta < 3e-4 for c in trace.chunks if c.length > 1), trace.chunks
    assert tokens["predictive"] < 0.8 * tokens["sliding"] and tokens["predictive"] <= tokens["upstream"], tokens
    assert err["predictive"] <= err["upstream"], err


def test_predictive_first_pass_margin_is_stricter(monkeypatch):
    # with a margin of 0 no first evaluation can pass: predictive evaluates every token at least twice
    # (exact tokens aside), like sliding
    monkeypatch.setattr(sampling_fakes, "affine", weak_affine)
    seq, text = problem(12)
    jac = JacobiConfig(block_size=FS, max_iter=30, threshold=3e-4, schedule="predictive")
    monkeypatch.setattr(jacobi_module, "FIRST_PASS_MARGIN", 0.0)
    _, strict, _ = invert(seq, text, Solver(jac, "predictive"))
    monkeypatch.setattr(jacobi_module, "FIRST_PASS_MARGIN", 1.0)
    _, loose, _ = invert(seq, text, Solver(jac, "predictive"))
    assert loose.tokens < strict.tokens
    assert all(c.iterations >= 2 or c.length == 1 for c in strict.chunks), strict.chunks


def test_sliding_max_iter_caps_a_window():
    seq, text = problem(5)
    jac = JacobiConfig(block_size=4, max_iter=1, threshold=0.0, schedule="sliding")
    out, trace, _ = invert(seq, text, Solver(jac, "sliding"))
    assert torch.isfinite(out).all() and sum(c.length for c in trace.chunks) == N
    assert all(c.iterations == 1 for c in trace.chunks)


@pytest.mark.parametrize("schedule", [None, "upstream", "sliding", "predictive"])
def test_context_prefix(monkeypatch, schedule):
    # a known first frame (image-to-video): copied, prefilled as [text ; sos ; prefix[:-1]], never solved;
    # scratch memory starts as NaN so that reading (a, b) of a never-evaluated position would show
    real = torch.empty_like
    monkeypatch.setattr(jacobi_module.torch, "empty_like", lambda t: real(t).fill_(float("nan")))
    seq, text = problem(6)
    prefix = torch.randn(B, FS, C, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    jac = None if schedule is None else JacobiConfig(block_size=1, max_iter=5, threshold=0.0, schedule=schedule)
    out, trace, block = invert(seq, text, Solver(jac, schedule or "upstream"), prefix=prefix)
    torch.testing.assert_close(out, reference_ar(seq, block.sos, text, prefix=prefix), rtol=1e-12, atol=1e-12)
    assert torch.equal(out[:, :FS], prefix) and block.prefills == ["context", "text"]
    assert (trace.chunks[0].start if trace.chunks else FS) == FS


@pytest.mark.parametrize("schedule", ["upstream", "sliding", "predictive"])
@pytest.mark.parametrize("window,context", [(2, 1), (3, 1), (3, 2)])
def test_long_video_windows_reencode(schedule, window, context):
    frames = 7
    seq, text = problem(8, frames)
    jac = JacobiConfig(block_size=3, max_iter=13, threshold=0.0, schedule=schedule)
    solver = Solver(jac, schedule, window, context)
    capacity = L + window * FS   # the window's slots only: overflowing would raise
    out, trace, block = invert(seq, text, solver, frames=frames, capacity=capacity)
    ref = reference_ar(seq, block.sos, text, fs=FS, window=window, context=context)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    phases = 1 + -(-(frames - window) // (window - context))
    assert block.prefills == ["text"] * phases        # one text prefill per re-encoding
    assert trace.steps == block.evaluations           # re-encodings are counted as steps
    # the first window is the unwindowed result
    full, _, _ = invert(seq, text, Solver(jac, schedule), frames=frames)
    torch.testing.assert_close(out[:, : window * FS], full[:, : window * FS], rtol=0, atol=0)


def test_should_stop_cancels_between_evaluations():
    seq, text = problem(9)
    asked = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 5

    with pytest.raises(GenerationCancelled, match="should_stop"):
        invert(seq, text, Solver(JacobiConfig(block_size=4, max_iter=8, threshold=0.0), "sliding"),
               hooks=Hooks(should_stop=stop))
    assert len(asked) == 6


def test_progress_is_monotone_and_complete():
    seq, text = problem(10)
    for schedule in ("upstream", "sliding", "predictive"):
        done = []
        invert(seq, text, Solver(JacobiConfig(block_size=4, max_iter=8, threshold=1e-6), schedule),
               hooks=Hooks(progress=done.append))
        assert done == sorted(done) and done[-1] == N and len(set(done)) == len(done), (schedule, done)


def test_floor_stops_at_max_of_threshold_and_floor_and_never_in_exact_mode():
    assert JacobiConfig(threshold=1e-3, floor=4e-3).stop == 4e-3
    assert JacobiConfig(threshold=1e-3, floor=1e-4).stop == 1e-3
    assert JacobiConfig(threshold=0.0, floor=4e-3).stop == 0.0     # exact mode stays exact
    with pytest.raises(ValueError, match="floor"):
        JacobiConfig(floor=-1.0)
    seq, text = problem(13)
    ar = reference_ar(seq, FakeBlock(B, 1).sos, text)
    exact, _, _ = invert(seq, text, Solver(JacobiConfig(block_size=4, max_iter=40, threshold=0.0, floor=1.0),
                                           "upstream"))
    torch.testing.assert_close(exact, ar, rtol=1e-12, atol=1e-12)
    for schedule in ("upstream", "sliding", "predictive"):
        plain = invert(seq, text, Solver(JacobiConfig(block_size=4, threshold=1e-8, schedule=schedule), schedule))[1]
        floored = invert(seq, text, Solver(JacobiConfig(block_size=4, threshold=1e-8, floor=1e-3, schedule=schedule),
                                           schedule))[1]
        assert floored.steps < plain.steps, schedule
        assert all(c.delta < 1e-3 for c in floored.chunks if c.length > 1 and c.iterations < 32), floored.chunks


def test_every_schedule_name_has_a_schedule_with_fresh_state():
    from starflow_trt.sampling.jacobi import SCHEDULE_TYPES, new_schedule
    from starflow_trt.sampling.options import SCHEDULES
    from starflow_trt.sampling.schedule import Schedule

    assert tuple(SCHEDULE_TYPES) == SCHEDULES
    for name in SCHEDULES:
        a, b = new_schedule(name), new_schedule(name)
        assert isinstance(a, Schedule) and a is not b and vars(a) == vars(b)
    sliding = new_schedule("sliding")
    seq, text = problem()
    block = FakeBlock(B, L + N, text)
    inv = BlockInversion(block, seq, BlockTrace(0))
    inv.prefill()
    sliding.solve(inv, JacobiConfig(block_size=3), 0, N, FS)
    assert (sliding.memory.known_from, sliding.memory.known) == (0, N)   # the state stays on the schedule
    assert new_schedule("sliding").memory is None
