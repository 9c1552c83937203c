"""Reference model properties that need no goldens: invertibility, Jacobi = AR, masks, RoPE,
chunked denoising, long-video windows, meta-device 7B, bad input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from starflow_trt.config import load_config, parse_config
from starflow_trt.errors import InputError
from starflow_trt.reference import JacobiConfig, build_model
from starflow_trt.reference.denoiser import denoiser_mask
from starflow_trt.reference.rope import rope_table

CONFIG_7B = Path(__file__).resolve().parents[1] / "starflow_trt" / "configs" / "starflow_v_7b.yaml"

SMALL = """arguments:
- channel_size: 4
- img_size: 4
- patch_size: 1
- channels: 64
- top_block_channels: 64
- layers_per_block: 1 1 2
- head_dim: 32
- txt_size: 3
- txt_dim: 8
- rope: 1
- sos: 1
- seq_order: L2R
- use_softplus: 1
- cond_top_only: 1
- use_final_norm: 1
- learnable_self_denoiser: 1
- conditional_denoiser: 1
- denoiser_window: 1
- temporal_causal: 2
- shallow_block_local: 1
- soft_clip: 4
"""


def small_model(dtype=torch.float64, seed=0, **overrides):
    """A random, well-conditioned model (small weights) for exactness properties."""
    cfg = parse_config(SMALL).replace(**overrides)
    torch.manual_seed(seed)
    model = build_model(cfg, dtype=dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 or "sos" in name:
                p.normal_(0, 0.3 / math.sqrt(p.shape[-1]))
            elif "bias" in name:
                p.normal_(0, 0.05)
    return model


def inputs(model, batch=2, frames=3, h=4, w=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    noise = torch.randn(batch, frames, cfg.channel_size, h, w, generator=g, dtype=model.dtype)
    y = torch.randn(batch, cfg.txt_size, cfg.text_width, generator=g, dtype=model.dtype)
    yu = torch.zeros_like(y)
    return noise, y, yu


def test_invertibility_goldens_model(ref64, cases):
    # encode(sample(noise, y)) == noise with guidance 0 (float64: the random goldens model is
    # strongly expansive, float32 round trips lose ~1e-3 through its 6 blocks)
    video = ref64.sample(cases["noise"].double(), cases["y"].double())
    z, _ = ref64.encode(video, cases["y"].double())
    torch.testing.assert_close(z, cases["noise"].double(), rtol=1e-4, atol=1e-6)


def test_invertibility_float32_small():
    model = small_model(torch.float32)
    noise, y, _ = inputs(model)
    z, _ = model.encode(model.sample(noise, y), y)
    torch.testing.assert_close(z, noise, rtol=1e-4, atol=1e-4)


def test_jacobi_threshold0_equals_ar(ref32, cases):
    noise, y, yu = cases["noise"], cases["y"], cases["y_uncond"]
    ar = ref32.sample(noise, y, yu, guidance=2.0)
    jac = ref32.sample(noise, y, yu, guidance=2.0, jacobi=JacobiConfig(block_size=4, max_iter=17, threshold=0.0))
    err = (jac - ar).abs().max().item()
    assert err <= 1e-4 * ar.abs().max().item() + 1e-4


def test_jacobi_schedule_trace(ref32, cases):
    ref32.sample(cases["noise"], cases["y"], cases["y_uncond"], guidance=2.0,
                 jacobi=JacobiConfig(block_size=8, max_iter=40, threshold=0.0))
    top = ref32.last_trace[0]
    # F = 24 tokens per frame, N = 72: chunks of 8 while s <= 24, then 4*8 = 32 clipped to the end
    assert [(c.start, c.length) for c in top.chunks] == [(0, 8), (8, 8), (16, 8), (24, 8), (32, 32), (64, 8)]
    assert all(c.iterations == 40 for c in top.chunks)
    shallow = ref32.last_trace[1]
    assert [(c.start, c.length) for c in shallow.chunks] == [(0, 8), (8, 8), (16, 8)]


def test_guidance_keeps_halves_identical():
    from starflow_trt.reference import guide

    a = torch.rand(4, 5, 3) + 0.5
    b = torch.randn(4, 5, 3)
    ag, bg = guide(a, b, 2.0)
    assert torch.equal(ag[:2], ag[2:]) and torch.equal(bg[:2], bg[2:])
    # w = 0 is the conditional prediction
    a0, b0 = guide(a, b, 0.0)
    torch.testing.assert_close(a0[:2], a[:2]) and torch.testing.assert_close(b0[:2], b[:2])
    # precision ratio clipped: a_c <= a_u gives den = 1 and b_g = (1+w) b_c - w b_u
    a_eq = torch.ones(2, 1, 1)
    _, bg = guide(a_eq, torch.tensor([[[1.0]], [[3.0]]]), 2.0)
    assert bg[0].item() == pytest.approx(3 * 1.0 - 2 * 3.0)


def test_denoiser_mask_worked_example():
    # spec §12.2: L=2, F=2, T=5, A=2, G=2
    expected_rows = {
        "text": "11" "1111000000",
        0: "11" "1111000000",
        1: "11" "1111110000",
        2: "11" "0011111100",
        3: "11" "0000111111",
        4: "11" "0000001111",
    }
    mask = denoiser_mask(2, 5, 2, 2, 2).int()
    as_str = lambda r: "".join(str(v) for v in r.tolist())
    assert as_str(mask[0]) == as_str(mask[1]) == expected_rows["text"]
    for frame in range(5):
        for q in (2 + 2 * frame, 3 + 2 * frame):
            assert as_str(mask[q]) == expected_rows[frame], (frame, q)
    wide = denoiser_mask(2, 5, 2, 2, 10)
    assert wide[10:, 2:6].all()  # with G = 10 the lower-left zeros become ones


def test_rope_table_layout():
    # spec §16.2: non-square grid h=6, w=8, T=3, L=3, P=5, hd=32 (K = 4 spatial freqs)
    cos, sin = rope_table(32, 3, 6, 8, 3, 5)
    assert cos.shape == (3 + 3 * 48, 32)
    def angle_is(row, dims, value):
        want = torch.tensor(value, dtype=torch.float64)
        assert torch.allclose(cos[row, dims].double(), want.cos().expand(2), atol=1e-5), (row, dims)
        assert torch.allclose(sin[row, dims].double(), want.sin().expand(2), atol=1e-5), (row, dims)

    assert torch.all(sin[:3, :16] == 0)  # text rows: only the time/text band rotates
    angle_is(1, slice(16, 18), 1 / 3 * 5)  # text k=1: (k/L)·P · g_0
    angle_is(1, slice(18, 20), 1 / 3 * 5 * 10000 ** (-1 / 8))  # g_1 = θ^(-1/8)
    row = 3 + 48 * 2 + 8 * 5 + 7  # frame 2, i=5, j=7
    px, py = 5 / math.sqrt(48) * 5, 7 / math.sqrt(48) * 5
    angle_is(row, slice(0, 2), px)
    angle_is(row, slice(2, 4), px * 10000 ** (-2 / 8))  # f_1 = θ^(-2/ds), ds = 8
    angle_is(row, slice(8, 10), py)
    angle_is(row, slice(16, 18), 2.0)
    assert torch.allclose(cos[:, 0::2], cos[:, 1::2])  # duplicated in place


def test_denoise_chunk_schedule():
    # spec §12.4 worked example: T = 7, steps 3, window 1 → chunks [0,3) [2,5) [4,7) (+ a no-op [6,7))
    model = small_model(torch.float64)
    seen = []
    original = model.denoiser

    def spy(x, y):
        seen.append(x.shape[1])
        return original(x, y)

    model.denoiser = spy
    x, y, _ = inputs(model, frames=7)
    out = model.denoise(x, y, steps=3)
    assert seen == [3, 3, 3]
    # independent computation of the same schedule
    ref = x.clone()
    ref[:, 0:3] = ref[:, 0:3] - 0.3 * original(ref[:, 0:3], y)
    c = ref[:, 2:5] - 0.3 * original(ref[:, 2:5], y)
    ref[:, 3:5] = c[:, 1:]
    c = ref[:, 4:7] - 0.3 * original(ref[:, 4:7], y)
    ref[:, 5:7] = c[:, 1:]
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_long_video_window():
    model = small_model(torch.float64)
    noise, y, yu = inputs(model, frames=7, batch=1)
    full = model.sample(noise, y, yu, guidance=1.5, jacobi=JacobiConfig(block_size=4, max_iter=40, threshold=0.0))
    win = JacobiConfig(block_size=4, max_iter=40, threshold=0.0, window=3, context_length=2)
    long = model.sample(noise, y, yu, guidance=1.5, jacobi=win)
    # the first window is generated exactly as without a window
    torch.testing.assert_close(long[:, :3], full[:, :3], rtol=1e-9, atol=1e-9)
    # later frames see only the re-encoded context, so they differ
    assert (long[:, 3:] - full[:, 3:]).abs().max() > 1e-6
    top = model.last_trace[0]
    assert top.chunks[-1].start + top.chunks[-1].length == 7 * 16
    # a window covering the video is the non-window path
    same = model.sample(noise, y, yu, guidance=1.5,
                        jacobi=JacobiConfig(block_size=4, max_iter=40, threshold=0.0, window=7))
    torch.testing.assert_close(same, full, rtol=0, atol=0)


def test_context_prefill_multi_frame():
    model = small_model(torch.float64)
    noise, y, yu = inputs(model, frames=4)
    ctx = noise[:, :2] * 0.5
    jac = JacobiConfig(block_size=4, max_iter=40, threshold=0.0)
    out_j = model.sample(noise, y, yu, guidance=2.0, jacobi=jac, context=ctx)
    out_ar = model.sample(noise, y, yu, guidance=2.0, context=ctx)
    torch.testing.assert_close(out_j[:, :2], ctx, rtol=0, atol=0)
    torch.testing.assert_close(out_j, out_ar, rtol=1e-8, atol=1e-8)
    # the generated frames are the continuation: encoding the whole video recovers the noise
    z, _ = model.encode(out_ar, y)
    assert (z[:, 2:] - noise[:, 2:]).abs().max() > 1e-3  # guided, so not the plain inverse


def test_7b_meta_parameter_count():
    model = build_model(load_config(CONFIG_7B), "meta")
    assert sum(p.numel() for p in model.parameters()) == 6_890_096_528
    counts = [sum(p.numel() for p in b.parameters()) for b in model.blocks]
    assert counts == [227_020_944] * 5 + [4_842_107_024]
    sd = model.state_dict()
    assert sd["var"].shape == (1024, 48) and sd["blocks.3.attn_mask"].shape == (1280, 1280)
    assert sd["feat_rope.freqs_cos"].shape == (1280, 64)


@pytest.mark.parametrize("bad,needle", [
    (lambda n, y: (n[0], y), "B, T, C, H, W"),
    (lambda n, y: (n[:, :, :3], y), "channels"),
    (lambda n, y: (n, y[:, :2]), "text embeddings"),
    (lambda n, y: (n, y[..., :5]), "text embeddings"),
    (lambda n, y: (n, y[:1]), "text embeddings"),
    (lambda n, y: (n, y * float("nan")), "NaN"),
])
def test_bad_inputs(bad, needle):
    model = small_model(torch.float32)
    noise, y, _ = inputs(model)
    n2, y2 = bad(noise, y)
    with pytest.raises(InputError, match=needle):
        model.sample(n2, y2)
    with pytest.raises(InputError, match=needle):
        model.encode(n2, y2)


def test_guidance_needs_uncond():
    model = small_model(torch.float32)
    noise, y, _ = inputs(model)
    with pytest.raises(InputError, match="y_uncond"):
        model.sample(noise, y, guidance=2.0)


def test_ar_refuses_video_longer_than_window():
    model = small_model(torch.float32, local_attn_window=2)
    noise, y, _ = inputs(model, frames=3)
    with pytest.raises(InputError, match="window"):
        model.sample(noise, y)


def test_sample_request_checks():
    model = small_model(torch.float32)
    noise, y, yu = inputs(model)
    with pytest.raises(InputError, match="guidance must be a finite number"):
        model.sample(noise, y, yu, guidance=float("nan"))
    with pytest.raises(InputError, match="choose upstream"):   # the reference runs upstream's schedule only
        model.sample(noise, y, jacobi=JacobiConfig(schedule="sliding"))
    with pytest.raises(InputError, match=r"context_length must be in \[1, 2\)"):
        model.sample(noise, y, jacobi=JacobiConfig(window=2, context_length=2))
    with pytest.raises(InputError, match="context must be"):
        model.sample(noise, y, context=noise)
