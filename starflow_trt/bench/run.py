"""Run every benchmark workload and write ``benchmarks/results/latest.{json,md}`` + PNG charts."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import load_config
from .machine import machine_info, memory_bandwidth, peak_gemm_flops
from .projection import projection_table
from .report import write
from .workloads import (BENCH_CONFIG, end_to_end, make_bench_checkpoint, op_profile, per_graph,
                        schedule_quality)

REPO = Path(__file__).resolve().parents[2]
#: ORT CPU threading of every pipeline benchmarked (what ``starflow-trt generate`` uses by default)
POOL = "shared"


def run_benchmarks(out_dir: Path = REPO / "benchmarks" / "results", cache: Path = REPO / "benchmarks" / ".cache",
                   runs: int = 5, int8: bool = True, log=print) -> dict:
    from ..export.manifest import load_manifest
    from ..export.onnx_export import ExportLimits, export_graphs
    from ..reference import load_reference
    from ..runtime import Pipeline

    start = time.perf_counter()
    cache.mkdir(parents=True, exist_ok=True)
    log("probing peak GEMM and bandwidth")
    peak, bw = peak_gemm_flops(), memory_bandwidth()
    result = {"machine": machine_info(), "runs": runs, "roofline": {"peak_gemm_gflops": peak / 1e9,
                                                                   "bandwidth_gbs": bw / 1e9},
              "end_to_end": {}, "schedule_quality": {}, "per_graph": {}, "quality": {}}
    # --- bench config: random weights sized like a scaled-down 7B
    ckpt = make_bench_checkpoint(BENCH_CONFIG, cache / "bench_model.pth")
    graphs = cache / "bench_graphs"
    if not (graphs / "manifest.json").exists():
        log("exporting the bench config")
        export_graphs(BENCH_CONFIG, ckpt, graphs, limits=ExportLimits(max_batch=1), force=True)
    from ..toy import PROMPTS, load_bundled

    toy = load_bundled()
    toy_graphs = cache / "toy_graphs"
    if not (toy_graphs / "manifest.json").exists():
        log("exporting the toy model")
        export_graphs(toy.config_path, toy.checkpoint_path, toy_graphs, limits=ExportLimits(max_batch=8), force=True)
    geo = load_manifest(graphs).geometry
    bench8, int8_dir = cache / "bench_int8", cache / "toy_int8"
    if int8:   # before any shared-pool session: ORT's quantization tools cannot join that pool
        from ..calibration import calibrate_directory

        if not (bench8 / "manifest.json").exists():
            log("calibrating the bench config to INT8 (random prompts; random weights are no quality target)")
            gc = torch.Generator().manual_seed(7)
            calib_y = torch.randn(4, geo.text_length, geo.text_width, generator=gc)
            calibrate_directory(graphs, bench8, "int8", text=calib_y, uncond=torch.zeros_like(calib_y),
                                guidance=2.0, force=True, overwrite=True, log=lambda m: None)
        if not (int8_dir / "manifest.json").exists():
            log("calibrating the toy model to INT8")
            calibrate_directory(toy_graphs, int8_dir, "int8", overwrite=True, log=lambda m: None)
    ref, pipe = load_reference(BENCH_CONFIG, ckpt), Pipeline.from_dir(graphs, thread_pool=POOL)
    result["machine"]["ort_thread_pool"] = POOL
    g = torch.Generator().manual_seed(1)
    y = torch.randn(1, geo.text_length, geo.text_width, generator=g)
    u = torch.zeros_like(y)
    noise = torch.randn(1, geo.max_frames, geo.channel_size, geo.height, geo.width, generator=g)
    log("bench config: end to end (guidance 2, block 16, threshold 1e-3)")
    rows = end_to_end(ref, pipe, y, u, noise, runs, label="bench")
    result["end_to_end"]["bench config"] = rows
    log("bench config: schedules over 8 samples")
    gq = torch.Generator().manual_seed(3)
    texts = torch.randn(8, geo.text_length, geo.text_width, generator=gq)
    result["schedule_quality"]["bench config"] = schedule_quality(pipe, texts, torch.zeros_like(texts),
                                                                  tuple(noise.shape), 2.0, "bench")
    log("bench config: per graph")
    result["per_graph"]["bench config"] = per_graph(pipe, runs, peak, bw, "bench")
    result["op_profile"] = op_profile(pipe)
    if int8:
        log("bench config: per graph INT8")
        result["per_graph"]["bench int8"] = per_graph(Pipeline.from_dir(bench8, precision="int8", thread_pool=POOL),
                                                      runs, peak, bw, "bench int8")
    sliding = next(r for r in rows if r["backend"] == "ORT" and r["schedule"].startswith("sliding"))
    sweeps = sliding["deep_tokens"] / (geo.max_frames * geo.tokens_per_frame)
    # --- toy model (+ INT8)
    toy_pipe, toy_ref = Pipeline.from_dir(toy_graphs, thread_pool=POOL), load_reference(toy.config_path, toy.checkpoint_path)
    extra = {}
    if int8:
        pipe8 = Pipeline.from_dir(int8_dir, precision="int8", thread_pool=POOL)
        extra["ORT INT8"] = pipe8
        q = pipe8.manifest.extra["quality"]
        result["quality"] = {"bpd_fp32": q["bpd_fp32"], "bpd_int8": q["bpd"], "bpd_increase": q["bpd_increase"],
                             "latent_psnr_db": q["latent_psnr_db"],
                             "graph_rel_l2_worst": {k: max(v["rel_l2"].values()) for k, v in q["graphs"].items()}}
    ty, tu = toy.encode(["a red square moving right"]), toy.encode([""])
    tg = toy_pipe.geo
    tnoise = torch.randn(1, tg.max_frames, 3, tg.height, tg.width, generator=torch.Generator().manual_seed(2))
    log("toy: end to end")
    result["end_to_end"]["toy"] = end_to_end(toy_ref, toy_pipe, ty, tu, tnoise, runs, guidance=3.0, label="toy",
                                             extra_pipes=extra)
    log("toy: schedules over 16 prompts")
    prompts = PROMPTS[:: max(1, len(PROMPTS) // 16)][:16]
    result["schedule_quality"]["toy"] = schedule_quality(toy_pipe, toy.encode(prompts), toy.encode([""] * len(prompts)),
                                                         tuple(tnoise.shape), 3.0, "toy")
    log("toy: per graph (FP32" + (", INT8)" if int8 else ")"))
    result["per_graph"]["toy fp32"] = per_graph(toy_pipe, runs, peak, bw, "toy fp32")
    if int8:
        result["per_graph"]["toy int8"] = per_graph(extra["ORT INT8"], runs, peak, bw, "toy int8")
    # --- projections for the real 7B
    cfg7 = load_config(REPO / "starflow_trt" / "configs" / "starflow_v_7b.yaml")
    result["projection_sweeps"] = sweeps
    result["projection"] = projection_table(cfg7, sweeps)
    result["seconds"] = time.perf_counter() - start
    write(result, out_dir)
    return result
