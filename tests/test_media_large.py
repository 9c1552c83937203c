"""Full-width media exports (a flan-t5-xl-wide encoder past 2 GB, the full-width VAE decoder).

About a minute and a half each on 2 cores and up to ~10 GB RSS: marked slow. The T5 encoder has
flan-t5-xl's widths with 11 of its 24 layers, the fewest whose graph passes ONNX's 2 GB protobuf limit
(every layer is the same graph), against the 24-layer budget per layer. Figures at full size:
``benchmarks/media_export.py`` (the same children).
"""

from __future__ import annotations

import importlib.util
import tempfile

import pytest

from .conftest import REPO

pytestmark = pytest.mark.slow
GB = 1024 ** 3
#: flan-t5-xl's 24 layers: 1.22 B parameters, 4.9 GB of FP32 graph, exported within 16 GiB
T5_LAYERS, T5_XL_LAYERS, T5_XL_BUDGET = 11, 24, 16 * GB


def _bench():
    spec = importlib.util.spec_from_file_location("media_export", REPO / "benchmarks" / "media_export.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flan_t5_xl_wide_encoder_exports_past_2gb_within_memory():
    pytest.importorskip("transformers")
    bench = _bench()
    with tempfile.TemporaryDirectory() as tmp:
        report = bench.run_child(bench.CHILD_T5, [tmp, "32", str(T5_LAYERS)], timeout=3600)
    print(f"\nflan-t5-xl-wide export ({T5_LAYERS} layers): {report['export_s']:.0f} s, "
          f"peak RSS {report['peak_rss_export'] / GB:.1f} GiB")
    assert 0.59e9 < report["params"] < 0.61e9   # 65.8 M embedding + 11 x 48.2 M (24 layers: 1.22 B)
    assert report["onnx_bytes"] > max(2 * GB, 0.98 * 4 * report["params"])   # fp32 weights, external data
    assert report["peak_rss_export"] < T5_XL_BUDGET * T5_LAYERS / T5_XL_LAYERS
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
