"""CPU modes: what this CPU runs natively (``starflow_trt.cpu``, ``doctor``), ORT's per-session pools, the dtype
peak probes and the bench's CPU-mode rows, serve's torch options."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from starflow_trt.cli import main
from starflow_trt.cpu import cpu_features, cpu_flags, cpu_modes
from starflow_trt.errors import InputError

# /proc/cpuinfo lines (flags abridged to what the modes read) of the two machines this project met
XEON_AMX = ("processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\n"
            "flags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8\n"
            "processor\t: 1\nflags\t\t: fpu\n")
EPYC_AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"


def test_modes_of_an_amx_xeon_and_an_avx2_epyc():
    xeon, epyc = cpu_flags(XEON_AMX), cpu_flags(EPYC_AVX2)
    assert "amx_int8" in xeon and "fpu" in xeon and "amx_int8" not in epyc   # the first processor's flags
    assert cpu_features(xeon) == ["AVX2", "FMA", "AVX-512F", "AVX-512 VNNI", "AVX-512 BF16", "AVX-512 FP16", "AMX",
                                  "AMX-BF16", "AMX-INT8"]
    assert cpu_features(epyc) == ["AVX2", "FMA"]
    on = {m.name: m for m in cpu_modes(xeon)}
    assert all(m.native for m in on.values())
    assert on["ORT INT8"].kernel == "MLAS int8 GEMM on AMX-INT8" and on["torch bf16"].kernel == "oneDNN AMX-BF16"
    assert on["ORT FP32"].kernel == "MLAS AVX-512F"
    off = {m.name: m for m in cpu_modes(epyc)}
    assert off["ORT FP32"].native and off["ORT FP32"].kernel == "MLAS AVX2"
    assert not off["ORT INT8"].native and "without VNNI" in off["ORT INT8"].kernel
    assert not off["torch bf16"].native and not off["torch fp16"].native
    assert cpu_flags("no flags here") == frozenset()


def test_doctor_names_the_cpu_modes():
    report = json.loads(CliRunner().invoke(main, ["doctor", "--json"]).output)
    assert [m["name"] for m in report["cpu"]["modes"]] == ["ORT FP32", "ORT INT8", "torch bf16", "torch fp16"]
    assert report["cpu"]["features"] == cpu_features(cpu_flags())
    text = CliRunner().invoke(main, ["doctor"]).output
    assert "\ncpu: " in text and "  ORT INT8 " in text


def test_per_session_pools_spin_only_while_their_session_runs():
    pytest.importorskip("onnxruntime")
    from starflow_trt.runtime.backends.ort_backend import OrtBackend

    options = OrtBackend(threads=2).session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    assert options.use_per_session_threads and options.intra_op_num_threads == 2
    quiet = OrtBackend(threads=2, spin=False).session_options()
    assert quiet.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_peak_probes_measure_each_dtype():
    pytest.importorskip("onnxruntime")
    from starflow_trt.bench.machine import peak_int8_gemm_ops, peak_rates

    rates = peak_rates(n_max=256, repeats=1)
    assert set(rates) == {"fp32", "bf16", "int8"} and all(v > 1e7 for v in rates.values())
    assert peak_int8_gemm_ops(64, 1) > 0


def test_cpu_mode_rows_on_the_goldens_export(goldens_export, ref32, cases):
    pytest.importorskip("onnxruntime")
    from starflow_trt.bench.workloads import cpu_modes as mode_rows, deep_step_case
    from starflow_trt.runtime import Pipeline

    ort32 = Pipeline.from_dir(goldens_export)
    modes = {"ORT FP32": (ort32, "fp32", "k32"),
             "torch FP32": (Pipeline.from_dir(goldens_export, backend="torch"), "fp32", "t32"),
             "torch bf16": (Pipeline.from_dir(goldens_export, backend="torch", dtype="bf16"), "bf16", "t16")}
    noise, y, u = cases["noise"][:1], cases["y"][:1], cases["y_uncond"][:1]
    rows = mode_rows(ref32, modes, y, u, noise, 1, {"fp32": 1e10, "bf16": 1e9}, block=4, label="goldens")
    by = {r["mode"]: r for r in rows}
    assert list(by) == ["torch reference", "ORT FP32", "torch FP32", "torch bf16"]
    assert by["torch reference"]["speedup"] == 1.0 and by["ORT FP32"]["base"] == "torch reference"
    assert by["ORT FP32"]["bpd_change"] == 0.0 and abs(by["torch FP32"]["bpd_change"]) < 1e-4
    # the two FP32 modes sample and score alike; bf16 rounds more
    assert by["torch FP32"]["dist_to_ar"] == pytest.approx(by["ORT FP32"]["dist_to_ar"], rel=0.05, abs=1e-5)
    assert abs(by["torch bf16"]["bpd_change"]) > 10 * abs(by["torch FP32"]["bpd_change"])
    assert by["torch bf16"]["kernel"] == "t16" and by["torch bf16"]["peak_gops"] == 1.0
    for row in rows[1:]:
        assert row["deep_calls"] > 0 and row["deep_step_ms"] > 0
        assert row["fraction_of_peak"] == pytest.approx(row["deep_step_gops"] / row["peak_gops"])
    case = deep_step_case(ort32.manifest.geometry)
    assert case["batch"] == 2 and case["P"] > ort32.manifest.geometry.text_length


def test_serve_torch_options_belong_to_the_torch_backend(goldens_export):
    from starflow_trt.serving.config import ServeConfig

    cfg = ServeConfig(backend="torch", device="cpu", dtype="bf16")
    assert ServeConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(InputError, match="options of --backend torch"):
        ServeConfig(device="cpu")
    out = CliRunner().invoke(main, ["serve", str(goldens_export), "--dtype", "bf16"])
    assert out.exit_code == 2 and out.output.startswith("error:") and "options of --backend torch" in out.output
    assert len(out.output.strip().splitlines()) == 1
