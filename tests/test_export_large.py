"""A deep block over 2 GB (fp32) exports with external data, loads in ORT, within the RSS bound."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

CONFIG = """arguments:
- channel_size: 4
- img_size: 4
- patch_size: 1
- channels: 64
- top_block_channels: 2048
- layers_per_block: 0 11
- head_dim: 64
- txt_size: 4
- txt_dim: 16
- rope: 1
- sos: 1
- seq_order: L2R
- use_softplus: 1
- cond_top_only: 1
- use_final_norm: 1
- temporal_causal: 2
- shallow_block_local: 1
- soft_clip: 4
- vid_size: '5:16'
"""

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    from starflow_trt.export.onnx_export import export_graphs, ExportLimits
    t = time.perf_counter()
    manifest, rows = export_graphs(sys.argv[1], sys.argv[2], sys.argv[3], graphs=["deep_step"],
                                   limits=ExportLimits(max_batch=1))
    print(json.dumps({"seconds": time.perf_counter() - t,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "rows": rows, "external": manifest.graph("deep_step").external_data}))
""")


@pytest.mark.slow
def test_export_deep_block_over_2gb(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    from starflow_trt.checkpoint import save_state_dict
    from starflow_trt.config import parse_config
    from starflow_trt.reference import build_model

    cfg = parse_config(CONFIG)
    (tmp_path / "config.yaml").write_text(CONFIG)
    torch.manual_seed(0)
    model = build_model(cfg)
    top_bytes = sum(p.numel() * 4 for p in model.blocks[-1].parameters())
    assert top_bytes > 2 * 1024 ** 3
    save_state_dict(model.state_dict(), tmp_path / "model.pth")
    del model
    out = tmp_path / "graphs"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "config.yaml"), str(tmp_path / "model.pth"),
                           str(out)], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    bound = 1.6 * top_bytes + 2 * 1024 ** 3
    print(f"\nlarge export: deep block {top_bytes / 1e9:.2f} GB, {report['seconds']:.1f} s, "
          f"peak RSS {report['peak_rss'] / 1e9:.2f} GB (bound {bound / 1e9:.2f} GB)")
    (tmp_path.parent / "large_export_report.json").write_text(json.dumps({**report, "top_bytes": top_bytes}))
    assert report["external"], "a graph over 2 GB must use ONNX external data"
    assert report["peak_rss"] < bound
    sess = ort.InferenceSession(str(out / "deep_step.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"tokens": torch.randn(1, 3, 4).numpy(), "rope_cos": torch.ones(3, 64).numpy(),
             "rope_sin": torch.zeros(3, 64).numpy(),
             **{f"past_{kind}_{l}": torch.randn(5, 1, 32, 64).numpy() for l in range(11) for kind in "kv"}}
    scale, shift, *new_kv = sess.run(None, feeds)
    assert scale.shape == (1, 3, 4) and len(new_kv) == 22 and new_kv[0].shape == (3, 1, 32, 64)
    assert (scale > 0).all()
