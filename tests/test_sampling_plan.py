"""The sampling core's plans and checks without a model: denoising chunks and lookahead, window
resolution, request validation, the likelihood formula."""

from __future__ import annotations

import json
import math

import pytest
import torch

from starflow_trt.errors import InputError
from starflow_trt.sampling import (ChunkedDenoise, JacobiConfig, SamplerSpec, bits_per_dim, check_request,
                                   denoise_lookahead, denoise_plan, denoise_steps, nll, resolve_window)

SPEC = SamplerSpec(channels=4, patch_size=2, text_length=3, text_width=5, denoiser_window=1,
                   size=(4, 6), max_frames=5, max_batch=2, default_schedule="sliding")


# ------------------------------------------------------------------ denoising plan
def test_denoise_plan_worked_examples():
    # spec §12.4: T = 7, steps 3, window 1 → [0,3) [2,5) writing [3,5) [4,7) writing [5,7)
    assert denoise_plan(7, 3, 1) == [(0, 3, 0), (2, 5, 3), (4, 7, 5)]
    # the 7B: T = 61, steps 21, window 10 (trailing no-op chunks are not planned)
    assert denoise_plan(61, 21, 10) == [(0, 21, 0), (11, 32, 21), (22, 43, 32), (33, 54, 43), (44, 61, 54)]
    assert denoise_plan(3, 3, 10) == [(0, 3, 0)] and denoise_plan(2, 8, None) == [(0, 2, 0)]
    assert denoise_plan(5, 3, None) == [(0, 3, 0), (1, 4, 3), (2, 5, 4)]   # overlap None: steps − 1


def test_denoise_plan_that_cannot_advance_names_both_values():
    with pytest.raises(InputError, match=r"window=2 .*denoiser_window=10 .*larger than 10 frames or denoise=False"):
        denoise_plan(3, 2, 10)


def test_denoise_steps_default():
    assert denoise_steps(None, None, 9) == 9 and denoise_steps(None, 4, 9) == 4 and denoise_steps(3, 4, 9) == 3
    assert denoise_lookahead(2, 30) == 8 and denoise_lookahead(0, 30) == 30


def _fake_denoiser(lookahead: int):
    """d_t = 0.1·(x_t + Σ_{j ≤ lookahead} x_{t+j} within the chunk) + 0.01·Σ_{i < t} x_i: every frame's
    output depends on the chunk's earlier frames and on exactly ``lookahead`` future frames."""
    def d(chunk: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(chunk)
        for t in range(chunk.shape[1]):
            out[:, t] = 0.1 * chunk[:, t : t + lookahead + 1].sum(1) + 0.01 * chunk[:, :t].sum(1)
        return out
    return d


@pytest.mark.parametrize("frames,steps,window,lookahead", [(7, 3, 1, 1), (12, 5, 2, 2), (9, 9, 3, 0), (10, 4, 1, 2)])
def test_chunked_denoise_streaming_equals_batch(frames, steps, window, lookahead):
    raw = torch.randn(2, frames, 3, dtype=torch.float64)
    plan = denoise_plan(frames, steps, window)
    batch = raw.clone()
    ChunkedDenoise(plan, lookahead, raw, batch, _fake_denoiser(lookahead)).advance(frames)
    # independent: the spec's loop over the partially denoised buffer
    ref, s, overlap = raw.clone(), 0, 0
    d = _fake_denoiser(lookahead)
    while s < frames:
        chunk = ref[:, s : s + steps]
        ref[:, s + overlap : s + steps] = (chunk - 0.3 * d(chunk))[:, overlap:]
        if s + steps >= frames:
            break
        overlap = window
        s += steps - overlap
    torch.testing.assert_close(batch, ref, rtol=0, atol=0)
    # frames arrive one by one: every frame is emitted once, in order, with its final value
    out = torch.full_like(raw, float("nan"))
    ready = []
    den = ChunkedDenoise(plan, lookahead, raw, out, _fake_denoiser(lookahead), on_ready=ready.append)
    emitted = 0
    for available in range(1, frames + 1):
        done = den.advance(available)
        assert done <= available
        torch.testing.assert_close(out[:, emitted:done], ref[:, emitted:done], rtol=1e-12, atol=1e-12)
        emitted = max(emitted, done)
    assert emitted == frames and ready == sorted(ready) and ready[-1] == frames
    if 0 < lookahead < steps - 1:
        assert ready[0] < plan[0].end   # a chunk's first frames came out before the chunk was complete


# ------------------------------------------------------------------ windows
def test_resolve_window():
    jac = JacobiConfig(window=3)
    assert resolve_window(None, 4, None, 5) == (None, None)                  # no window anywhere
    assert resolve_window(jac, 3, None, 5) == (None, None)                   # the window covers the video
    assert resolve_window(jac, 7, None, 5) == (3, 2)                         # context default: window − 1
    assert resolve_window(JacobiConfig(window=3, context_length=1), 7, None, 5) == (3, 1)
    assert resolve_window(JacobiConfig(), 7, 4, None) == (4, 3)              # the model's local_attn_window
    assert resolve_window(JacobiConfig(window=2), 7, 4, None) == (2, 1)      # the request's window wins
    with pytest.raises(InputError, match="exceed the 5 this export supports"):
        resolve_window(JacobiConfig(), 6, None, 5)
    with pytest.raises(InputError, match="autoregressive sampling has no window"):
        resolve_window(None, 7, 3, None)
    with pytest.raises(InputError, match="exceeds the export's max_frames 5"):
        resolve_window(JacobiConfig(window=6), 9, None, 5)
    for bad in (0, 3, 4):
        with pytest.raises(InputError, match=r"context_length must be in \[1, 3\)"):
            resolve_window(JacobiConfig(window=3, context_length=bad), 7, None, None)


# ------------------------------------------------------------------ requests
def _inputs(batch=2, frames=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, 3, 5, generator=g), torch.randn(batch, frames, 4, 4, 6, generator=g)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(num_frames=0), "num_frames must be a whole number >= 1"),
    (dict(num_frames=-2), "num_frames"),
    (dict(num_frames=2.5), "num_frames"),
    (dict(guidance=float("nan")), "guidance must be a finite number >= 0"),
    (dict(guidance=float("inf")), "guidance"),
    (dict(guidance=-1.0), "guidance"),
    (dict(guidance="x"), "guidance"),
    (dict(guidance=1.0), "needs y_uncond"),
    (dict(num_frames=6), "exceed the 5"),
    (dict(jacobi=JacobiConfig(schedule="magic")), "unknown Jacobi schedule 'magic'"),
    (dict(context=torch.zeros(2, 3, 4, 4, 6), num_frames=3), "context must be"),
    (dict(context=torch.zeros(2, 1, 4, 4, 5)), "context must be"),
])
def test_bad_requests(kwargs, needle):
    y, _ = _inputs()
    with pytest.raises(InputError, match=needle):
        check_request(SPEC, y, **kwargs)


@pytest.mark.parametrize("mutate,needle", [
    (lambda y, n: (y, n[0]), r"noise must be a \[B, T, C, H, W\] tensor"),
    (lambda y, n: (y, n[:, :, :3]), "C=4 channels"),
    (lambda y, n: (y, n[..., :4]), "the exported geometry"),
    (lambda y, n: (y, n[:, :0]), "empty"),
    (lambda y, n: (y, n * float("nan")), "noise contains NaN"),
    (lambda y, n: (y[:1], n), r"y must be text embeddings \[B, L, D\] = \[2, 3, 5\] \(length 3, width 5\)"),
    (lambda y, n: (y[..., :4], n), "width 5"),
    (lambda y, n: (y * float("inf"), n), "y contains NaN or Inf"),
    (lambda y, n: (torch.cat([y] * 2), torch.cat([n] * 2)), "max_batch 2"),
])
def test_bad_tensors(mutate, needle):
    y, noise = mutate(*_inputs())
    with pytest.raises(InputError, match=needle):
        check_request(SPEC, y, noise)


def test_request_resolution():
    y, noise = _inputs()
    req = check_request(SPEC, y)                      # no noise: default frames, drawn by the caller
    assert req.frames == 5 and req.noise is None and req.schedule is None and req.denoise_chunks is None
    req = check_request(SPEC, y, noise, y_uncond=y * 0, guidance=2, jacobi=JacobiConfig(block_size=64), denoise=True,
                        context=noise[:, :1])
    assert req.guidance == 2.0 and req.schedule == "sliding" and req.n_ctx == 1 and req.text().shape[0] == 4
    assert req.denoise_chunks == [(0, 3, 0)] and req.solver.window is None
    info = req.describe()
    assert json.loads(json.dumps(info, allow_nan=False)) == info
    assert info["jacobi"]["block_size"] == 64 and info["context_frames"] == 1 and info["denoise"] is True
    assert check_request(SPEC, y, guidance=0.0, y_uncond=y).y_uncond is None      # unused without guidance
    # long video: the denoising plan exists only when denoising (it cannot advance here)
    long = dict(jacobi=JacobiConfig(window=2), num_frames=4)
    assert check_request(SPEC, y, denoise=True, **long).denoise_chunks == [(0, 2, 0), (1, 3, 2), (2, 4, 3)]
    two = SamplerSpec(**{**SPEC.__dict__, "denoiser_window": 2})
    assert check_request(two, y, denoise=False, **long).window == 2
    with pytest.raises(InputError, match="window=2 frames that overlap by denoiser_window=2"):
        check_request(two, y, denoise=True, **long)
    with pytest.raises(InputError, match="num_frames=2 but noise has 3 frames"):
        check_request(SPEC, y, noise, num_frames=2)
    reference = SamplerSpec(channels=4, patch_size=2, text_length=3, text_width=5, schedules=("upstream",))
    assert check_request(reference, y, torch.zeros(2, 9, 4, 8, 2), jacobi=JacobiConfig()).schedule == "upstream"
    with pytest.raises(InputError, match="choose upstream"):
        check_request(reference, y, noise, jacobi=JacobiConfig(schedule="sliding"))
    with pytest.raises(InputError, match="multiples of patch_size 2"):
        check_request(reference, y, torch.zeros(2, 3, 4, 5, 2))


# ------------------------------------------------------------------ likelihood
def test_nll_and_bits_per_dim_formula():
    f64 = dict(dtype=torch.float64)
    z = torch.tensor([[1.0, -2.0, 0.5, 0.0], [3.0, 1.0, -1.0, 2.0]], **f64)
    logdets = [torch.tensor([[0.1, 0.3], [0.0, -0.2]], **f64), torch.tensor([[[1.0], [2.0]], [[0.5], [0.5]]], **f64)]
    got = nll(z, logdets, torch.float64)
    want = [0.5 * (1 + 4 + 0.25) / 4 - 0.2 - 1.5, 0.5 * (9 + 1 + 1 + 4) / 4 + 0.1 - 0.5]
    assert got.dtype == torch.float64 and got.tolist() == pytest.approx(want, rel=1e-12)
    assert bits_per_dim(got).tolist() == pytest.approx([(v + 0.5 * math.log(2 * math.pi)) / math.log(2)
                                                        for v in want], rel=1e-12)


def test_request_takes_the_samplers_residual_floor():
    import dataclasses

    y, noise = torch.zeros(1, 3, 5), torch.zeros(1, 2, 4, 4, 6)
    spec = dataclasses.replace(SPEC, residual_floor=3e-3)
    assert check_request(spec, y, noise, jacobi=JacobiConfig(threshold=1e-3)).jacobi.floor == 3e-3
    assert check_request(spec, y, noise, jacobi=JacobiConfig(threshold=1e-3, floor=5e-3)).jacobi.floor == 5e-3
    assert check_request(SPEC, y, noise, jacobi=JacobiConfig(threshold=1e-3)).jacobi.floor == 0.0
    assert check_request(spec, y, noise).jacobi is None
