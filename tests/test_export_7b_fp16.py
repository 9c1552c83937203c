"""The 7B deep block (4.84 B parameters, random BF16 weights made here) exports with ``--dtype fp16``
within 20 GB of RSS and loads in ONNX Runtime (session created; FP16 numerics are tested on small models).

Slow (minutes, ~10 GB of checkpoint + ~10 GB of graph in a temp dir, ~18 GB of RAM): run alone with
``pytest -m slow tests/test_export_7b_fp16.py -s``. Every heavy step runs in a child process, so each
peak RSS (``resource.getrusage``) is that step's own.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

# the 7B config (starflow_trt/configs/starflow_v_7b.yaml) with its top block exactly, the shallow blocks
# identities and no denoiser: only the deep block's weights are made
CONFIG = """arguments:
- vae: Wan-AI/Wan2.2-TI2V-5B-Diffusers:0.6
- channel_size: 48
- img_size: 640
- vid_size: '81:16'
- patch_size: 1
- channels: 3072
- top_block_channels: 4096
- blocks: 2
- layers_per_block: 0 24
- rope: 1
- pt_seq_len: 32
- head_dim: 64
- use_bias: 1
- norm_type: layer_norm
- txt_size: 256
- txt_dim: 2048
- sos: 1
- seq_order: L2R
- use_softplus: 1
- cond_top_only: 1
- use_final_norm: 1
- soft_clip: 4.0
- temporal_causal: 2
- shallow_block_local: 1
- noise_std: 0.5
- mix_aspect: 1
"""

MAKE = textwrap.dedent("""
    import json, resource, sys, time, torch
    from starflow_trt.checkpoint import save_state_dict
    from starflow_trt.config import load_config
    from starflow_trt.reference import build_model
    t = time.perf_counter()
    cfg = load_config(sys.argv[1])
    shapes = {k: v.shape for k, v in build_model(cfg, "meta").state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(s, generator=g, dtype=torch.bfloat16) * 0.02) for k, s in shapes.items()}
    params = sum(v.numel() for k, v in state.items() if k.startswith("blocks.1.") and "attn_mask" not in k)
    save_state_dict(state, sys.argv[2])
    print(json.dumps({"params": params, "seconds": time.perf_counter() - t,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
""")

EXPORT = textwrap.dedent("""
    import json, resource, sys, time
    from starflow_trt.export.onnx_export import export_graphs, ExportLimits
    t = time.perf_counter()
    manifest, rows = export_graphs(sys.argv[1], sys.argv[2], sys.argv[3], graphs=["deep_step"],
                                   limits=ExportLimits(max_batch=1, aspects="auto", dtype="fp16"))
    spec = manifest.graph("deep_step")
    print(json.dumps({"seconds": time.perf_counter() - t,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "rows": rows, "external": spec.external_data,
                      "dims": {k: v.to_dict() for k, v in spec.dims.items()}}))
""")

LOAD = textwrap.dedent("""
    import json, os, resource, sys, threading, time
    import onnxruntime as ort

    def guard():   # this machine is shared: never let the session grow past 16 GB
        while True:
            if int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") > 16e9:
                os._exit(3)
            time.sleep(0.2)

    threading.Thread(target=guard, daemon=True).start()
    t = time.perf_counter()
    opts = ort.SessionOptions()
    # no graph rewrites: the CPU EP (no FP16 MatMul on x86) would otherwise fold FP32 copies of the weights
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(sys.argv[1], opts, providers=["CPUExecutionProvider"])
    print(json.dumps({"load_seconds": time.perf_counter() - t,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "inputs": {i.name: i.type for i in sess.get_inputs()},
                      "outputs": {o.name: o.type for o in sess.get_outputs()}}))
""")


def _child(code: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_7b_deep_block_exports_in_fp16_within_20gb(tmp_path):
    pytest.importorskip("onnxruntime")
    psutil = pytest.importorskip("psutil")
    if shutil.disk_usage(tmp_path).free < 22e9 or psutil.virtual_memory().available < 14e9:
        pytest.skip("needs ~22 GB of free temp disk and ~14 GB of free RAM (10 GB checkpoint + 10 GB graph)")
    (tmp_path / "config.yaml").write_text(CONFIG)
    made = _child(MAKE, str(tmp_path / "config.yaml"), str(tmp_path / "model.pth"))
    assert 4.83e9 < made["params"] < 4.85e9, made["params"]
    out = tmp_path / "graphs"
    report = _child(EXPORT, str(tmp_path / "config.yaml"), str(tmp_path / "model.pth"), str(out))
    (tmp_path / "model.pth").unlink()   # disk: ~10 GB
    (tmp_path.parent / "export_7b_fp16_export.json").write_text(json.dumps(report, indent=1))
    graph_bytes = sum(p.stat().st_size for p in out.iterdir())
    loaded = _child(LOAD, str(out / "deep_step.onnx"))
    summary = {"params": made["params"], "make_s": round(made["seconds"], 1),
               "export_s": round(report["seconds"], 1), "export_peak_rss_gb": round(report["peak_rss"] / 1e9, 2),
               "graph_gb": round(graph_bytes / 1e9, 2), "ort_load_s": round(loaded["load_seconds"], 1),
               "ort_peak_rss_gb": round(loaded["peak_rss"] / 1e9, 2), "dims": report["dims"]}
    print("\n7B deep block fp16 export:", json.dumps(summary))
    (tmp_path.parent / "export_7b_fp16_report.json").write_text(json.dumps(summary, indent=1))
    assert report["external"], "the 9.7 GB graph must use ONNX external data"
    assert report["peak_rss"] < 20e9
    assert 9.5e9 < graph_bytes < 10.5e9        # FP16: half of the 19.4 GB of FP32 weights
    # the session loads with the graph's contract; a CPU call is not made here: ONNX Runtime's x86 CPU EP
    # has no FP16 MatMul and runs one by casting the weights to FP32 (19.4 GB for this block)
    assert loaded["inputs"]["past_k_0"] == "tensor(float16)" and loaded["outputs"]["new_v_23"] == "tensor(float16)"
    assert loaded["inputs"]["tokens"] == "tensor(float)" and loaded["outputs"]["scale"] == "tensor(float)"
    assert len(loaded["inputs"]) == 3 + 48 and len(loaded["outputs"]) == 2 + 48
