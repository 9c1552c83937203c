"""Benchmark components: roofline probes, 7B projection maths, report rendering."""

from __future__ import annotations

from pathlib import Path

import pytest

from starflow_trt.bench.machine import machine_info, memory_bandwidth, peak_gemm_flops, timed
from starflow_trt.bench.projection import GPUS, ScheduleWork, project, projection_table
from starflow_trt.bench.report import markdown, write
from starflow_trt.config import load_config
from starflow_trt.costs import block_params, step_cost

CONFIG_7B = Path(__file__).resolve().parents[1] / "starflow_trt" / "configs" / "starflow_v_7b.yaml"


def test_bench_entry_points_import():
    from starflow_trt.bench import run
    from starflow_trt.commands import bench_cmd

    assert callable(run.run_benchmarks) and bench_cmd.bench_command.name == "bench"


def test_probes_are_positive():
    assert peak_gemm_flops(256, 2) > 1e8 and memory_bandwidth(16, 2) > 1e8
    info = machine_info()
    assert info["cores"] >= 1 and "torch" in info
    t = timed(lambda: None, runs=3)
    assert t["min"] <= t["median"] <= t["max"]


def test_weight_streaming_bound_of_ar_decoding():
    cfg = load_config(CONFIG_7B)
    h100 = GPUS["H100 80GB SXM"]
    one = step_cost(cfg, cfg.top_index, 2, 1, 256, dtype_bytes=2)
    # S = 1 streams all 4.84 G deep parameters in fp16 per token: ~9.7 GB
    assert one.weight_bytes == pytest.approx(block_params(cfg, 5) * 2)
    assert one.bytes / (h100["bandwidth_gbs"] * 1e9) > one.flops / (h100["fp16_tflops"] * 1e12)  # memory bound
    chunk = step_cost(cfg, cfg.top_index, 2, 64, 256, dtype_bytes=2)
    assert chunk.intensity > 30 * one.intensity  # 64 tokens share one weight read
    ar = project(cfg, 1590, 21, h100, "fp16", chunk=1)
    jac = project(cfg, 1590, 21, h100, "fp16", sweeps_per_token=4.0, chunk=64)
    # per token the AR deep step cannot beat weight streaming: 9.7 GB / 3.35 TB/s ≈ 2.9 ms
    assert ar["deep_s"] >= 33390 * block_params(cfg, 5) * 2 / 3.35e12 * 0.99
    assert jac["seconds_per_video"] < ar["seconds_per_video"]
    assert ar["calls_memory_bound"] > ar["calls_compute_bound"]
    assert not project(cfg, 1590, 21, GPUS["L4"], "fp16")["fits_in_memory"]


def test_projection_table_and_report(tmp_path):
    cfg = load_config(CONFIG_7B)
    work = [ScheduleWork.from_counts("upstream", deep_tokens=6144, deep_calls=160, generated_tokens=3072),
            ScheduleWork.from_counts("predictive", deep_tokens=4041, deep_calls=113, generated_tokens=3072)]
    assert work[0].sweeps == 2.0 and work[0].tokens_per_call == 6144 / 160
    rows = projection_table(cfg, work)
    assert len(rows) == 5 * len(GPUS) and all(r["seconds_per_frame"] > 0 for r in rows)
    h100 = [r for r in rows if r["gpu"].startswith("H100") and r["precision"] == "fp16"]
    # deep calls per video follow the measured calls per token: 33390 tokens × 160 / 3072 (upstream)
    assert h100[1]["deep_calls"] == pytest.approx(33390 * 160 / 3072, rel=0.03)
    assert h100[2]["deep_calls"] == pytest.approx(33390 * 113 / 3072, rel=0.03)
    result = {"machine": machine_info(), "runs": 1, "roofline": {"peak_gemm_gflops": 100.0, "bandwidth_gbs": 10.0},
              "end_to_end": {"x": [{"backend": "ORT", "precision": "fp32", "schedule": "upstream", "s_median": 1.0,
                                    "s_min": 0.9, "s_max": 1.1, "speedup_vs_reference_upstream": 1.0,
                                    "deep_calls": 3, "deep_tokens": 9, "calls": 5, "dist_to_ar": 0.01}]},
              "per_graph": {"x": [{"graph": "deep_step", "shape": "S=1", "ms": 1.0, "gflops": 0.1, "mbytes": 1.0,
                                   "achieved_gflops": 10.0, "fraction_of_peak_gemm": 0.1}]},
              "schedule_quality": {"x": {"pipeline": "ORT FP32", "guidance": 2.0, "block": 16, "threshold": 1e-3,
                                         "rows": [
                  {"schedule": "upstream", "samples": 8, "dist_median": 0.031, "dist_mean": 0.05, "dist_max": 0.2,
                   "deep_calls": 10, "deep_tokens": 100, "calls": 20}]}},
              "quality": {}, "projection": rows,
              "stage_projection": [{"gpu": "H100", "flow_precision": "fp16", "text_s": 0.001, "flow_s": 7.0,
                                    "vae_decode_s": 0.6, "total_s": 7.6, "vae_tflop": 608.0}]}
    text = markdown(result)
    assert "PROJECTIONS, not measurements" in text and "H100" in text and "| ORT | fp32 | upstream |" in text
    assert "| H100 | fp16 | 0.001 | 7.0 | 0.60 | 7.6 | 608 |" in text
    assert "Schedules over 8 samples: x (ORT FP32, guidance 2," in text
    assert "| upstream | 3.10e-02 | 5.00e-02 | 2.00e-01 | 10 |" in text
    files = write(result, tmp_path)
    assert all(f.exists() and f.stat().st_size > 0 for f in files)


def test_op_profile_of_deep_step(goldens_export):
    pytest.importorskip("onnxruntime")
    from starflow_trt.bench.workloads import op_profile
    from starflow_trt.runtime import Pipeline

    prof = op_profile(Pipeline.from_dir(goldens_export), s=8, p=10, runs=2)
    ops = {r["op"]: r for r in prof["ops"]}
    assert prof["shape"] == "B=2 S=8 P=10" and prof["wall_ms"] > 0
    assert sum(r["share"] for r in prof["ops"]) == pytest.approx(1.0)
    assert "MatMul (weights)" in ops and "Softmax" in ops and prof["weight_gemm_gflops"] > 0
