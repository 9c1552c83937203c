"""The fused-attention ``.trt.onnx`` twin through calibration (issue 30, Deliver 2): every FP16 / BF16 / INT8 /
FP8 (FP16 or BF16 body) directory made from an export with ``--trt-variants`` keeps each step / prefill graph's twin,
converted by the same rules from the same calls, recorded in the manifest, parity-checked against its portable
graph on ORT, chosen by ``build --dry-run``, and built under the fake TensorRT."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from .exports import GOLDENS_FLOW

pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
pytest.importorskip("ml_dtypes")

TWIN_KINDS = ("step", "prefill")


@pytest.fixture(scope="module")
def twin_export(exports):
    return exports(**GOLDENS_FLOW, trt_variants=True)


@pytest.fixture(scope="module", params=["fp16", "bf16", "int8-trt", "fp8", "fp8-attention", "fp8-bf16"])
def calibrated(request, twin_export, cases, tmp_path_factory):
    """The goldens export with twins, calibrated (forced: random weights are not a quality target)."""
    from starflow_trt.calibration import calibrate_directory

    precision, _, option = request.param.partition("-")
    out = tmp_path_factory.mktemp(request.param) / "g"
    return calibrate_directory(twin_export, out, precision, text=cases["y"], uncond=cases["y_uncond"],
                               guidance=2.0, force=True, eval_clips=(cases["x"], cases["y"]),
                               placement="trt" if option == "trt" else "ort",
                               quantize_attention=option == "attention",
                               high_precision_dtype="bf16" if option == "bf16" else None, log=lambda m: None)


@pytest.mark.slow
def test_every_twin_is_converted_recorded_and_gated(calibrated, twin_export):
    from starflow_trt.export.manifest import load_manifest
    from starflow_trt.export.trt_variant import FORM, attention_layers, form_problems

    source = load_manifest(twin_export)
    manifest = load_manifest(calibrated.root, verify=True)   # the twins' sha256 checked too
    twins = [n for n, s in source.graphs.items() if s.kind in TWIN_KINDS]
    assert twins and all(source.graph(n).trt_variant for n in twins)
    assert sorted(n for n, s in manifest.graphs.items() if s.trt_variant) == sorted(twins)
    head_dim = manifest.geometry.head_dim
    for name in twins:   # per layer: concat K/V → one Q·Kᵀ (scale on Q) → one softmax → one ·V
        spec = manifest.graph(name)
        model = onnx.load(str(spec.trt_path))
        layers, past = manifest.geometry.blocks[spec.block].layers, spec.kind == "step"
        attended = range(layers) if past else range(layers - 1)   # prefill: the last layer's attention is dead
        assert len(attention_layers(model)) == len(attended), name
        assert form_problems(model, layers, head_dim, past, attended) == [], name
    gate = calibrated.extra["quality"]["gate"]["max_graph_error"]
    for name in twins:
        spec = manifest.graph(name)
        assert spec.trt_path.parent == calibrated.root
        cache = {"trt_calibration_cache"}   # INT8's implicit-calibration cache: the portable graph's only
        assert spec.trt_variant["conversion"].keys() == spec.extra["conversion"].keys() - cache   # same conversion
        parity = calibrated.extra["quality"]["graphs"][name]["trt_variant_rel_l2"]
        assert parity and all(0 <= v <= gate for v in parity.values()), (name, parity)
    from starflow_trt.cli import main

    plan = json.loads(CliRunner().invoke(main, ["build", str(calibrated.root), "--dry-run"]).output)
    for name in twins:
        assert plan["graphs"][name]["onnx"] == str(manifest.graph(name).trt_path)
        assert plan["graphs"][name]["attention"] == FORM


@pytest.mark.slow
def test_calibrated_directories_build_under_the_fake(calibrated, tmp_path, monkeypatch):
    from starflow_trt.cli import main
    from starflow_trt.export.manifest import load_manifest

    from . import fake_tensorrt

    rec = fake_tensorrt.install(monkeypatch)
    out = CliRunner().invoke(main, ["build", str(calibrated.root), "-o", str(tmp_path / "eng")])
    assert out.exit_code == 0, out.output
    parsed = {c[1] for c in rec.named("parse_from_file")}
    for spec in load_manifest(calibrated.root).graphs.values():
        assert str(spec.trt_path or spec.path) in parsed   # the twin, where there is one
    assert rec.errors == []


@pytest.mark.slow
@pytest.mark.parametrize("calibrated", ["fp8-attention"], indirect=True)
def test_fp8_attention_in_both_forms(calibrated):
    """``--quantize-attention``: in every step / prefill graph and its twin each attention BMM reads both
    inputs through an FP8 DQ, the probabilities at scale 1/448 (FP16, the body's type); the twin's query DQ
    follows the attention-scale Mul (the scale on the Q side, as TensorRT's fused attention wants); the
    manifest and the build plan say so."""
    import numpy as np
    from onnx import TensorProto, numpy_helper

    from starflow_trt.calibration.qdq import attention_bmms, qdq_layout
    from starflow_trt.cli import main

    assert calibrated.extra["quantization"]["attention"] == "fp8"
    twins = [n for n, s in calibrated.graphs.items() if s.kind in TWIN_KINDS]
    for name in twins:
        spec = calibrated.graph(name)
        assert spec.extra["conversion"]["attention"] == "fp8"
        for path in (spec.path, spec.trt_path):
            model = onnx.load(str(path))
            layers, layout = attention_bmms(model), qdq_layout(model)
            producers = {o: n for n in model.graph.node for o in n.output}
            inits = {i.name: i for i in model.graph.initializer}
            nodes = {n.name: n for n in model.graph.node}
            assert layers, (name, path.name)
            for layer in layers:
                assert all(set(layout[b]) == {0, 1} for b in (*layer.scores, *layer.mix)), (name, path.name)
                for b in layer.mix:
                    scale = inits[producers[nodes[b].input[0]].input[1]]
                    assert scale.data_type == TensorProto.FLOAT16
                    assert numpy_helper.to_array(scale) == np.float16(1 / 448)
                if path == spec.trt_path:
                    (bmm1,) = layer.scores
                    quantize = producers[producers[nodes[bmm1].input[0]].input[0]]
                    assert quantize.op_type == "QuantizeLinear" and producers[quantize.input[0]].op_type == "Mul"
    plan = json.loads(CliRunner().invoke(main, ["build", str(calibrated.root), "--dry-run"]).output)
    for name in twins:
        assert plan["graphs"][name]["qdq"]["attention"] == "fp8"
        assert "FP8 fused attention" in plan["graphs"][name]["requires"]


@pytest.mark.slow
@pytest.mark.parametrize("calibrated", ["fp8-bf16", "bf16"], indirect=True)
def test_bf16_body_directory(calibrated):
    """``--precision bf16`` / ``--high-precision-dtype bf16``: every flow graph and twin has a BF16 body (GEMMs
    read BF16, behind their DQs in a Q/DQ graph); the gate ran the FP32 simulation and says so; ORT refuses the
    directory with one line naming the fix."""
    from starflow_trt.calibration.qdq import qdq_layout
    from starflow_trt.errors import BackendUnavailable
    from starflow_trt.export.dtypes import elem_types
    from starflow_trt.runtime import Pipeline

    quantized = calibrated.precision == "fp8"
    assert calibrated.extra["quantization"]["body"] == "bf16" if quantized else "quantization" not in calibrated.extra
    assert "simulated" in calibrated.extra["quality"]["simulated"]
    assert not list(calibrated.root.glob("*.bf16sim.*"))   # the simulation graphs are gone
    for name, spec in calibrated.graphs.items():
        for path in filter(None, (spec.path, spec.trt_path)):
            model = onnx.load(str(path))
            types = elem_types(model)
            layout = qdq_layout(model)
            gemms = [n for n in model.graph.node if n.name in layout or (not quantized and n.op_type == "MatMul")]
            assert gemms and (layout or not quantized), (name, path.name)
            bf16 = [n for n in gemms if types[n.input[0]] == onnx.TensorProto.BFLOAT16]
            assert len(bf16) >= (len(gemms) if quantized else 0.8 * len(gemms)), (name, path.name)   # + FP32 head
    with pytest.raises(BackendUnavailable, match="bf16 body .*--high-precision-dtype fp16" if quantized else
                       "bf16 .*--backend torch"):
        Pipeline.from_dir(calibrated.root, backend="ort")
