"""Full-size media exports (flan-t5-xl-sized encoder, full-width VAE decoder).

They take 5-10 minutes each on 2 cores and up to ~10 GB RSS: marked slow (CI runs them; the
default suite without slow tests stays short). Figures: ``benchmarks/media_export.py`` (the same children).
"""

from __future__ import annotations

import importlib.util
import tempfile

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow
GB = 1024 ** 3


def _bench():
    spec = importlib.util.spec_from_file_location("media_export", REPO / "benchmarks" / "media_export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flan_t5_xl_sized_encoder_exports_within_memory():
    pytest.importorskip("transformers")
    bench = _bench()
    with tempfile.TemporaryDirectory() as tmp:
        report = bench.run_child(bench.CHILD_T5, [tmp, "32"], timeout=3600)
    print(f"\nflan-t5-xl-sized export: {report['export_s']:.0f} s, peak RSS {report['peak_rss_export'] / GB:.1f} GiB")
    assert report["params"] > 1.2e9
    assert report["onnx_bytes"] > 4.8e9  # fp32 weights in external data
    assert report["peak_rss_export"] < 16 * GB
    assert report["rel_error_ort_vs_torch"] <= 1e-5 and report["padded_rows_zero"]


def test_full_width_vae_decoder_step_exports():
    pytest.importorskip("diffusers")
    bench = _bench()
    with tempfile.TemporaryDirectory() as tmp:
        report = bench.run_child(bench.CHILD_VAE, [tmp, "30", "53"], timeout=3600)
    print(f"\nfull-width VAE decode step export: {report['export_step_s']:.0f} s, "
          f"peak RSS {report['peak_rss_after_step'] / GB:.1f} GiB")
    assert report["cache_tensors"] == 32
    assert report["peak_rss_after_step"] < 16 * GB
    assert report["rel_error_ort_chain_vs_whole_clip"] <= 1e-5
