"""Benchmark peers: the upstream-checkout adapter (against a FAKE checkout written by the test: the real
apple/ml-starflow is neither vendored nor downloaded; the adapter was also run against a real checkout, see
benchmarks/README.md) and the torch.compile reference row plumbing."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from starflow_trt.bench.peers import load_upstream, upstream_kwargs
from starflow_trt.bench.workloads import end_to_end
from starflow_trt.errors import StarflowError
from starflow_trt.sampling import JacobiConfig

# A stand-in for upstream's transformer_flow: Model(**spec §1.2 kwargs) wrapping our reference, answering
# the spec §7.1 reverse call and recording what it was given.
FAKE = textwrap.dedent('''
    import torch
    from starflow_trt.config import ModelConfig
    from starflow_trt.reference.model import StarflowV
    from starflow_trt.sampling import JacobiConfig

    CALLS = []

    class Model(StarflowV):
        def __init__(self, in_channels, num_blocks, layers_per_block, **kwargs):
            super().__init__(ModelConfig(channel_size=in_channels, blocks=num_blocks,
                                         layers_per_block=tuple(layers_per_block), **kwargs))

        def forward(self, x, y, reverse=False, guidance=0.0, jacobi=False, jacobi_block_size=32,
                    jacobi_max_iter=32, jacobi_th=0.001, **ignored):
            assert reverse
            done = torch.ones((), dtype=torch.bool)   # upstream all-reduces this after every Jacobi sweep
            torch.distributed.all_reduce(done, op=torch.distributed.ReduceOp.MIN)
            CALLS.append(dict(guidance=guidance, jacobi=jacobi, block=jacobi_block_size, max_iter=jacobi_max_iter,
                              th=jacobi_th, y_rows=y.shape[0]))
            b = x.shape[0]
            jac = JacobiConfig(block_size=jacobi_block_size, max_iter=jacobi_max_iter, threshold=jacobi_th,
                               schedule="upstream") if jacobi else None
            return self.sample(x, y[:b], y[b:] if guidance > 0 else None, guidance=guidance, jacobi=jac)
''')


@pytest.fixture
def fake_checkout(tmp_path, monkeypatch):
    (tmp_path / "transformer_flow.py").write_text(FAKE)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "transformer_flow", raising=False)
    yield tmp_path
    sys.modules.pop("transformer_flow", None)


def test_upstream_adapter_runs_the_checkout_on_the_same_checkpoint_and_noise(fake_checkout, goldens_dir, ref32, cases):
    up = load_upstream(fake_checkout, ref32.cfg, goldens_dir / "model.pth")
    noise, y, u = cases["noise"][:1], cases["y"][:1], cases["y_uncond"][:1]
    out = up.sample(noise, y, u, guidance=2.0, block=4, threshold=1e-3)
    jac = JacobiConfig(block_size=4, max_iter=32, threshold=1e-3, schedule="upstream")
    torch.testing.assert_close(out, ref32.sample(noise, y, u, guidance=2.0, jacobi=jac), rtol=0, atol=0)
    calls = sys.modules["transformer_flow"].CALLS
    assert calls == [dict(guidance=2.0, jacobi=True, block=4, max_iter=32, th=1e-3, y_rows=2)]
    assert str(fake_checkout) in sys.modules["transformer_flow"].__file__


def test_upstream_kwargs_follow_the_spec_mapping(ref32):
    kw = upstream_kwargs(ref32.cfg)
    assert kw["in_channels"] == ref32.cfg.channel_size and kw["num_blocks"] == ref32.cfg.num_blocks
    assert kw["layers_per_block"] == list(ref32.cfg.layers) and kw["txt_dim"] == ref32.cfg.text_width
    assert "channel_size" not in kw and "vid_size" not in kw   # not constructor parameters (spec §1.2)


def test_upstream_rows_in_end_to_end(fake_checkout, goldens_dir, ref32, cases):
    up = load_upstream(fake_checkout, ref32.cfg, goldens_dir / "model.pth")

    def broken(noise, y, u, guidance, block, threshold):
        raise RuntimeError("inductor failed\nlong trace")

    noise, y, u = cases["noise"][:1], cases["y"][:1], cases["y_uncond"][:1]
    peers = {"upstream (fake checkout)": lambda noise, y, u, guidance, block, threshold:
             up.sample(noise, y, u, guidance, block, threshold), "broken peer": broken}
    rows = _rows_without_ort(ref32, y, u, noise, peers)
    by = {r["backend"]: r for r in rows}
    assert by["upstream (fake checkout)"]["dist_to_ar"] == pytest.approx(by["torch reference"]["dist_to_ar"], abs=0)
    assert by["upstream (fake checkout)"]["deep_calls"] is None   # an opaque peer: calls are not observable
    assert by["broken peer"]["error"] == "RuntimeError: inductor failed" and by["broken peer"]["s_median"] is None


def _rows_without_ort(ref, y, u, noise, peers):
    """end_to_end with an empty pipeline dict: ORT rows need an export, which these tests do not build."""
    import starflow_trt.bench.workloads as w

    real = w._schedules
    try:
        w._schedules = lambda block, threshold: []
        return end_to_end(ref, _NullPipe(), y, u, noise, 1, block=4, peers=peers)
    finally:
        w._schedules = real


class _NullPipe:
    class manifest:
        precision = "fp32"


@pytest.mark.parametrize("content,match", [
    (None, "no transformer_flow module there"),
    ("x = 1\n", "transformer_flow has no Model class"),
    ("import not_a_module_anywhere\n", "importing transformer_flow failed .*ModuleNotFoundError"),
    ("class Model:\n    def __init__(self, in_channels):\n        pass\n", "rejected the spec §1.2 constructor"),
])
def test_bad_checkouts_fail_with_one_line(fake_checkout, goldens_dir, ref32, content, match):
    (fake_checkout / "transformer_flow.py").unlink()
    if content is not None:
        (fake_checkout / "transformer_flow.py").write_text(content)
    with pytest.raises(StarflowError, match=match) as err:
        load_upstream(fake_checkout, ref32.cfg, goldens_dir / "model.pth")
    assert "\n" not in str(err.value) and str(fake_checkout) in str(err.value)


def test_missing_checkout_directory(tmp_path, ref32, goldens_dir):
    with pytest.raises(StarflowError, match="no such directory.*apple/ml-starflow"):
        load_upstream(tmp_path / "nope", ref32.cfg, goldens_dir / "model.pth")
