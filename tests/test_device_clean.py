"""Device-clean sampling core and runtime: every tensor they make lives on their inputs' device.

Runs under :class:`~tests.fake_device.FakeDevice`, where mixing a device tensor with a CPU tensor raises as
on CUDA, and checks the results equal the plain CPU run (the mode changes no value).
"""

from __future__ import annotations

import pytest
import torch

from starflow_trt.sampling import BlockInversion, BlockTrace, ChunkedDenoise, JacobiConfig, Solver, denoise_plan

from .fake_device import FakeDevice, on_fake
from .sampling_fakes import C, FakeBlock

B, FRAMES, FS, L = 2, 4, 6, 2

SOLVERS = {
    "ar": Solver(),
    **{f"{s}.th": Solver(JacobiConfig(block_size=4, max_iter=8, threshold=1e-4, schedule=s), s)
       for s in ("upstream", "sliding", "predictive")},
    **{f"{s}.exact": Solver(JacobiConfig(block_size=4, max_iter=17, threshold=0.0, schedule=s), s)
       for s in ("upstream", "sliding", "predictive")},
    **{f"{s}.window": Solver(JacobiConfig(block_size=4, max_iter=8, threshold=1e-4, schedule=s), s, 2, 1)
       for s in ("upstream", "sliding", "predictive")},
}


def _invert(seq, text, solver, prefix, device=None):
    block = FakeBlock(B, L + seq.shape[1], None if text is None else text.to(device), device)
    inv = BlockInversion(block, seq.to(device), BlockTrace(0))
    start = inv.prefill(None if prefix is None else prefix.to(device))
    return inv.run(solver, FRAMES, start)


def test_fake_device_raises_on_mixing_like_cuda():
    with FakeDevice() as fake:
        x = torch.zeros(3, device=fake.device)
        assert x.device == fake.device and (x[1:] + 1).device == fake.device
        with pytest.raises(RuntimeError, match="same device"):
            x * torch.ones(3)
        assert (x * torch.tensor(2.0)).device == fake.device   # CPU 0-dim tensors mix, as on CUDA
        x[:] = torch.ones(3)                                   # cross-device copies are allowed
        assert x.cpu().device == torch.device("cpu") and not on_fake(x.cpu())


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("context", [False, True])
def test_sampling_core_stays_on_the_device(name, context):
    g = torch.Generator().manual_seed(0)
    seq = torch.randn(B, FRAMES * FS, C, generator=g, dtype=torch.float64)
    text = torch.randn(L, B, C, generator=g, dtype=torch.float64)
    prefix = torch.randn(B, FS, C, generator=g, dtype=torch.float64) if context else None
    solver = SOLVERS[name]
    want = _invert(seq, text, solver, prefix)
    with FakeDevice() as fake:
        got = _invert(seq, text, solver, prefix, fake.device)
        assert got.device == fake.device
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_chunked_denoise_stays_on_the_device():
    g = torch.Generator().manual_seed(1)
    raw = torch.randn(B, 5, 2, 3, C, generator=g)
    plan = denoise_plan(5, 3, 1)
    weight = torch.randn(C, C, generator=g)

    def run(device=None):
        w, src = weight.to(device), raw.to(device)
        out = torch.empty_like(src)
        chunked = ChunkedDenoise(plan, 1, src, out, lambda x: x @ w)
        for t in range(1, 6):
            chunked.advance(t)
        return out

    want = run()
    with FakeDevice() as fake:
        got = run(fake.device)
        assert got.device == fake.device
    torch.testing.assert_close(got, want, rtol=0, atol=0)


RUNS = {   # label → generate kwargs (guidance 2 everywhere but the first)
    "ar.denoised": dict(guidance=0.0),
    **{f"{s}.th": dict(jacobi=JacobiConfig(block_size=8, max_iter=16, threshold=1e-3, schedule=s), denoise=False)
       for s in ("upstream", "sliding", "predictive")},
    "long_video": dict(jacobi=JacobiConfig(block_size=8, max_iter=16, threshold=1e-3, window=2, context_length=1),
                       denoise=False),
    "i2v": dict(jacobi=JacobiConfig(block_size=8, max_iter=16, threshold=1e-3), context="cond_frame", denoise=False),
}


@pytest.fixture(scope="module")
def goldens_manifest(goldens_dir):
    """The goldens export's manifest, in memory without ONNX files (the torch backend needs none)."""
    from starflow_trt.export.limits import ExportLimits
    from starflow_trt.export.onnx_export import graphless_manifest

    return graphless_manifest(goldens_dir / "config.yaml", goldens_dir / "model.pth",
                              ExportLimits(height=6, width=4, max_frames=3, max_batch=4))


def _pipe(manifest, device=None):
    from starflow_trt.runtime.backends.torch_backend import TorchBackend
    from starflow_trt.runtime.pipeline import Pipeline

    return Pipeline(manifest, TorchBackend(manifest, device=device, threads=1))


@pytest.fixture(scope="module")
def cpu_results(goldens_manifest, cases):
    with _pipe(goldens_manifest) as pipe:
        return {label: _generate(pipe, cases, kwargs) for label, kwargs in RUNS.items()}


def _generate(pipe, cases, kwargs):
    kwargs = dict(kwargs)
    if kwargs.get("context") is not None:
        kwargs["context"] = cases[kwargs["context"]]
    kwargs.setdefault("guidance", 2.0)
    return pipe.generate(cases["y"], cases["y_uncond"], noise=cases["noise"], **kwargs)


@pytest.mark.parametrize("label", list(RUNS))
def test_pipeline_on_the_torch_backend_stays_on_the_device(goldens_manifest, cases, cpu_results, label):
    """Pipeline → stages → sampling core → torch backend with every buffer on the (fake) device."""
    with FakeDevice() as fake:
        with _pipe(goldens_manifest, fake.device) as pipe:
            result = _generate(pipe, cases, RUNS[label])
            assert all(on_fake(buf) for buf in pipe.workspace._flat.values())
            if label == "ar.denoised":   # scoring: the forward graphs on the device too
                nll, _ = pipe.score(cases["x"], cases["y"])
                assert not on_fake(nll)
        assert fake.calls > 1000 and not on_fake(result.latents)   # the result comes back to the CPU
    want = cpu_results[label]
    torch.testing.assert_close(result.latents, want.latents, rtol=0, atol=0)
    assert result.stats["graph_calls"] == want.stats["graph_calls"]
