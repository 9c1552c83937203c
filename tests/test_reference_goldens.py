"""Every tensor of tests/data/goldens/tiny_t2v/cases.pt through the public reference API."""

from __future__ import annotations

import pytest
import torch

from starflow_trt.reference import JacobiConfig

from .conftest import assert_golden

INPUTS = {"x", "y", "y_uncond", "noise", "cond_frame"}


def compute_all(model, cases) -> dict[str, torch.Tensor]:
    """Run every golden call of calls.json through the public API."""
    x, y, yu, noise = cases["x"], cases["y"], cases["y_uncond"], cases["noise"]
    out: dict[str, torch.Tensor] = {}
    z, logdets, outputs = model.encode(x, y, return_outputs=True)
    out["forward.z"] = z
    out.update({f"forward.outputs.{i}": o for i, o in enumerate(outputs)})
    out.update({f"forward.logdets.{i}": ld for i, ld in enumerate(logdets)})
    out["forward.loss"] = model.nll(x, y).mean().reshape(1)
    out["reverse.g0"] = model.sample(noise, y)
    seq = model.sample(noise, y, yu, guidance=2.0, return_sequence=True)
    out.update({f"reverse.g2.sequence.{i}": s for i, s in enumerate(seq)})
    out["reverse.g2"] = seq[-1]
    out["jacobi.exact.g2"] = model.sample(noise, y, yu, guidance=2.0,
                                          jacobi=JacobiConfig(block_size=8, max_iter=40, threshold=0.0))
    out["jacobi.th.g2"] = model.sample(noise, y, yu, guidance=2.0,
                                       jacobi=JacobiConfig(block_size=8, max_iter=32, threshold=1e-3))
    out["denoiser.out"] = model.denoiser(cases["reverse.g0"], y)
    out["denoised"] = model.denoise(cases["reverse.g0"], y)
    out["i2v.jacobi.g2"] = model.sample(noise, y, yu, guidance=2.0, context=cases["cond_frame"],
                                        jacobi=JacobiConfig(block_size=8, max_iter=40, threshold=0.0))
    return out


@pytest.fixture(scope="module")
def results32(ref32, cases):
    return compute_all(ref32, {k: v for k, v in cases.items()})


@pytest.fixture(scope="module")
def results64(ref64, cases):
    return compute_all(ref64, {k: v.double() for k, v in cases.items()})


def test_every_golden_is_covered(cases, results32):
    expected = set(cases) - INPUTS
    assert expected == set(results32), f"not compared: {sorted(expected - set(results32))}"


def test_goldens_float32(cases, results32):
    for name, ours in results32.items():
        assert ours.dtype == torch.float32, name
        assert_golden(ours, cases[name], name)


def test_goldens_float64(cases, results64):
    for name, ours in results64.items():
        assert ours.dtype == torch.float64, name
        assert_golden(ours, cases[name], name)


def test_context_frame_is_reconstructed(cases, results32):
    # the first N output frames are the conditioning latents (spec §11)
    torch.testing.assert_close(results32["i2v.jacobi.g2"][:, :1], cases["cond_frame"], rtol=0, atol=0)
