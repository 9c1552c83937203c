"""``calibrate --precision fp8`` and ``--placement trt`` end to end on the goldens export: manifest records,
Q/DQ per graph, the residual floor, the runtime, ``verify`` and ``build --dry-run``."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("ml_dtypes")


@pytest.fixture(scope="module")
def fp8_dir(goldens_export, cases, tmp_path_factory):
    """The goldens export calibrated to FP8 (forced: random weights are not a quality target)."""
    from starflow_trt.calibration import calibrate_directory

    out = tmp_path_factory.mktemp("fp8") / "g"
    return calibrate_directory(goldens_export, out, "fp8", text=cases["y"], uncond=cases["y_uncond"], guidance=2.0,
                               force=True, eval_clips=(cases["x"], cases["y"]), log=lambda m: None)


@pytest.mark.slow
def test_fp8_directory_records_placement_and_holds_e4m3_qdq(fp8_dir):
    from onnx import TensorProto

    from starflow_trt.calibration.qdq import qdq_layout

    assert fp8_dir.precision == "fp8"
    assert fp8_dir.extra["quantization"] == {"placement": "trt", "format": "float8e4m3fn", "opset": 19,
                                             "rules": "starflow_trt/calibration/qdq.py", "body": "fp16",
                                             "weight_scale": "tensor", "attention": "fp16"}   # issue 30's defaults
    cal = fp8_dir.extra["calibration"]
    assert cal["method"] == "minmax" and "trt_cache_versions" not in cal and 0 < cal["residual_floor"]["value"] < 1
    for name, spec in fp8_dir.graphs.items():
        conv = spec.extra["conversion"]
        assert spec.precision == "fp8" and conv["placement"] == "trt" and "trt_calibration_cache" not in conv
        model = onnx.load(str(spec.path))
        assert next(o.version for o in model.opset_import if o.domain == "") == 19
        layout = qdq_layout(model)
        assert len(layout) == conv["quantized_nodes"] == conv["weight_qdq_matmuls"] > 0
        for entry in layout.values():   # activation per tensor, weight FP8 per tensor (the default)
            assert entry[0]["weight"] is False and entry[1]["type"] == TensorProto.FLOAT8E4M3FN
            assert entry[1]["axis"] is None


@pytest.mark.slow
def test_fp8_pipeline_runs_and_gate_numbers_are_recorded(fp8_dir, cases):
    from starflow_trt.runtime import Pipeline

    pipe = Pipeline.from_dir(fp8_dir.root, backend="ort", precision="fp8")
    assert pipe.spec.residual_floor == fp8_dir.extra["calibration"]["residual_floor"]["value"]
    result = pipe.generate(cases["y"], noise=cases["noise"], denoise=False)
    assert torch.isfinite(result.latents).all()
    q = fp8_dir.extra["quality"]
    assert q["gate"]["max_bpd_increase"] == 0.002 and q["gate"]["min_psnr_db"] == 35.0
    assert all(0 < max(g["rel_l2"].values()) < 0.5 for g in q["graphs"].values())


@pytest.mark.slow
def test_fp8_build_dry_run_and_verify(fp8_dir):
    from starflow_trt.cli import main
    from starflow_trt.engine.build import BuildOptions, build_plan
    from starflow_trt.verify import default_tolerance, verify_directory

    plan = build_plan(fp8_dir.root, BuildOptions())
    assert plan["quantization"]["format"] == "float8e4m3fn"
    for item in plan["graphs"].values():
        assert item["network"] == "strongly typed" and item["flags"] == []   # precision from the ONNX
        assert item["qdq"]["format"] == "float8e4m3fn" and item["qdq"]["placement"] == "trt"
        assert "8.9" in item["requires"] and "note" not in item
    out = CliRunner().invoke(main, ["build", str(fp8_dir.root), "--dry-run", "--graphs", "deep_step"])
    assert out.exit_code == 0 and '"float8e4m3fn"' in out.output
    report = verify_directory(fp8_dir.root, graphs=["deep_step"], max_calls=2)
    g = report.graphs[0]
    assert g.precision == "fp8" and g.tolerance == default_tolerance("fp8") and g.passed and g.rel_l2 > 1e-4


@pytest.mark.slow
def test_int8_trt_placement(goldens_export, cases, tmp_path):
    """--placement trt for INT8: same rules as FP8 (no Q on GEMM outputs), a calibration cache, the record."""
    from starflow_trt.calibration import calibrate_directory
    from starflow_trt.engine.build import BuildOptions, build_plan

    m = calibrate_directory(goldens_export, tmp_path / "g", "int8", method="minmax", text=cases["y"],
                            uncond=cases["y_uncond"], guidance=2.0, force=True, placement="trt",
                            eval_clips=(cases["x"], cases["y"]), log=lambda m: None)
    assert m.extra["quantization"]["placement"] == "trt" and m.extra["quantization"]["format"] == "int8"
    spec = m.graphs["deep_step"]
    model = onnx.load(str(spec.path))
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    dqs = [n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dqs and all(set(consumers[t]) <= {"MatMul", "Gemm"} for t in dqs)   # Q/DQ only on GEMM inputs
    assert (spec.root / spec.extra["conversion"]["trt_calibration_cache"]).is_file()
    # the default FP16 body has FP16 scales, which need opset 19 (the FP32 body keeps the export's 18)
    assert next(o.version for o in model.opset_import if o.domain == "") == 19
    assert "note" not in build_plan(m.root, BuildOptions())["graphs"]["deep_step"]


def test_calibrate_cli_refuses_entropy_for_fp8(tmp_path):
    from starflow_trt.cli import main

    out = CliRunner().invoke(main, ["calibrate", str(tmp_path), "--precision", "fp8", "--method", "entropy",
                                    "-o", str(tmp_path / "x")])
    assert out.exit_code == 2 and "minmax" in out.output and "Traceback" not in out.output
    assert len(out.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()


@pytest.mark.parametrize("args,cause", [
    (["--precision", "int8", "--high-precision-dtype", "fp16"], "--placement trt"),   # ORT's quantizer: FP32 only
    (["--precision", "int8", "--high-precision-dtype", "bf16"], "--placement trt"),
    (["--precision", "fp16", "--high-precision-dtype", "fp32"], "drop it"),           # not a Q/DQ directory
    (["--precision", "int8", "--placement", "trt", "--quantize-attention"], "--precision fp8"),   # FP8 MHA only
])
def test_calibrate_cli_refuses_a_body_dtype_it_cannot_write(tmp_path, args, cause):
    from starflow_trt.cli import main

    out = CliRunner().invoke(main, ["calibrate", str(tmp_path), *args, "-o", str(tmp_path / "x")])
    assert out.exit_code == 2 and cause in out.output and "Traceback" not in out.output
    assert len(out.output.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
