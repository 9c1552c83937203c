"""Export cost of the media graphs at full size, random weights: wall time and peak RSS.

Cases (each in its own child process, so ``ru_maxrss`` is that export's peak):

* ``t5``: a flan-t5-xl-sized encoder (d_model 2048, 24 layers (``--t5-layers``), 32 heads, d_ff 5120,
  vocab 32128, ~1.22 B parameters, fp32) → ``text_encoder.onnx`` (batch and tokens dynamic, external
  data), then ORT vs PyTorch at batch 2 × ``--tokens`` tokens.
* ``vae``: the full-width Wan2.2 VAE (base 160 / decoder 256, z 48) → ``vae_decode_first`` and
  ``vae_decode_step`` (k = 1) with example inputs on the 480p latent grid 30 × 53 (batch, h, w
  dynamic), then chained first + step on ORT vs the diffusers whole-clip decode on a small grid
  (a 480p decode step is ~29 TFLOP: hours on 2 CPU cores).

    python benchmarks/media_export.py [--cases t5 vae] [--out benchmarks/results/media_export.json]

Random weights say nothing about output quality; parity figures compare two runtimes on the same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD_T5 = textwrap.dedent("""
    import json, resource, sys, time, torch
    from pathlib import Path
    from transformers import T5Config, T5EncoderModel
    from starflow_trt.media.text import TextEncoderGraph
    from starflow_trt.media.tiny import FLAN_T5_XL
    from tests.onnx_helpers import export_module, ort_run, rel_error
    out, tokens, layers = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.manual_seed(0)
    t = time.perf_counter()
    dims = {**FLAN_T5_XL, "num_layers": layers}
    model = T5EncoderModel(T5Config(**dims, attn_implementation="eager")).eval().requires_grad_(False)
    build_s, params = time.perf_counter() - t, sum(p.numel() for p in model.parameters())
    graph = TextEncoderGraph(model)
    ids = torch.randint(3, FLAN_T5_XL["vocab_size"], (2, tokens))
    mask = torch.ones(2, tokens, dtype=torch.int64)
    mask[1, tokens // 3:] = 0
    rss_model = rss()
    seconds = export_module(graph, (ids, mask), out / "text_encoder.onnx", ["input_ids", "attention_mask"],
                            ["text"], [[0, 1]] * 2)
    rss_export = rss()
    files = sum(f.stat().st_size for f in out.iterdir())
    t = time.perf_counter()
    with torch.no_grad():
        ref = graph(ids, mask)
    torch_s = time.perf_counter() - t
    t = time.perf_counter()
    run = ort_run(out / "text_encoder.onnx")
    (got,) = run(ids, mask)
    ort_s = time.perf_counter() - t
    print(json.dumps({"case": "t5", "layers": layers, "params": params, "build_s": build_s, "export_s": seconds,
                      "peak_rss_after_build": rss_model, "peak_rss_export": rss_export, "onnx_bytes": files,
                      "tokens": tokens, "rel_error_ort_vs_torch": rel_error(got, ref),
                      "padded_rows_zero": bool((got[mask == 0] == 0).all()), "torch_forward_s": torch_s,
                      "ort_load_and_forward_s": ort_s, "peak_rss_total": rss()}))
""")

CHILD_VAE = textwrap.dedent("""
    import json, os, resource, sys, time, torch
    from pathlib import Path
    from diffusers import AutoencoderKLWan
    from starflow_trt.media import vae_graphs as V
    from starflow_trt.media.vae_load import WAN22_VAE_CONFIG
    from starflow_trt.media.vae_stream import decode_streaming
    from tests.media_oracles import decode_whole
    from tests.onnx_helpers import export_module, ort_run, rel_error
    out, h, w = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    torch.manual_seed(0)
    t = time.perf_counter()
    vae = AutoencoderKLWan(**WAN22_VAE_CONFIG).eval().requires_grad_(False)
    with torch.no_grad():  # diffusers' init leaves some layers at zero/identity; perturb all
        for p in vae.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    plan = V.probe_cache_plan(vae, "decoder")
    build_s = time.perf_counter() - t
    dec_params = sum(p.numel() for p in vae.decoder.parameters()) + sum(p.numel() for p in vae.post_quant_conv.parameters())
    z = torch.randn(2, 2, 48, h, w)
    rss_model = rss()
    axes = [0, 3, 4]   # batch, h, w
    first_s = export_module(V.VaeDecodeFirst(vae, plan), (z[:, :1],), out / "vae_decode_first.onnx", ["latents"],
                            ["frames", *plan.output_names()], [axes])
    rss_first = rss()
    caches = plan.zeros(2, h, w)
    step_s = export_module(V.VaeDecodeStep(vae, plan), (z[:, 1:], *caches), out / "vae_decode_step.onnx",
                           ["latents", *plan.input_names()], ["frames", *plan.output_names()],
                           [axes] + [axes] * len(plan))
    rss_step = rss()
    del caches
    files = sum(f.stat().st_size for f in out.iterdir())
    torch.set_num_threads(int(os.environ.get("STARFLOW_TRT_THREADS") or 2))   # the caller's budget (a test suite)
    small = torch.randn(1, 3, 48, 2, 3) * 2
    t = time.perf_counter()
    ref = decode_whole(vae, small)
    torch_s = time.perf_counter() - t
    first, step = (ort_run(out / f"vae_decode_{n}.onnx") for n in ("first", "step"))
    t = time.perf_counter()
    got = decode_streaming(first, step, small)
    ort_s = time.perf_counter() - t
    print(json.dumps({"case": "vae", "decoder_params": dec_params, "build_and_probe_s": build_s,
                      "example_grid": [h, w], "cache_bytes_b1": plan.bytes(1, h, w), "cache_tensors": len(plan),
                      "export_first_s": first_s, "export_step_s": step_s, "peak_rss_after_build": rss_model,
                      "peak_rss_after_first": rss_first, "peak_rss_after_step": rss_step, "onnx_bytes": files,
                      "parity_grid": [2, 3], "parity_latent_frames": 3,
                      "rel_error_ort_chain_vs_whole_clip": rel_error(got, ref),
                      "torch_whole_clip_s": torch_s, "ort_chain_s": ort_s, "peak_rss_total": rss()}))
""")


def run_child(code: str, args: list[str], timeout: int) -> dict:
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["child_wall_s"] = time.perf_counter() - start
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["t5", "vae"], choices=["t5", "vae"])
    ap.add_argument("--tokens", type=int, default=256, help="T5 parity check length (export is dynamic)")
    ap.add_argument("--t5-layers", type=int, default=24, help="T5 encoder layers (flan-t5-xl: 24)")
    ap.add_argument("--grid", type=int, nargs=2, default=[30, 53], help="VAE example latent grid h w")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "media_export.json")
    ap.add_argument("--timeout", type=int, default=3600)
    opts = ap.parse_args()
    results = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "cases": {}}
    for case in opts.cases:
        with tempfile.TemporaryDirectory(prefix=f"media_{case}_") as tmp:
            if case == "t5":
                report = run_child(CHILD_T5, [tmp, str(opts.tokens), str(opts.t5_layers)], opts.timeout)
            else:
                report = run_child(CHILD_VAE, [tmp, *map(str, opts.grid)], opts.timeout)
        results["cases"][case] = report
        print(json.dumps(report, indent=1), flush=True)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
