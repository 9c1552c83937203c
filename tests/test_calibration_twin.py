"""The fused-attention ``.trt.onnx`` twin through calibration (issue 30, Deliver 2): every FP16 / INT8 / FP8
directory made from an export with ``--trt-variants`` keeps each step / prefill graph's twin, converted by the
same rules from the same calls, recorded in the manifest, parity-checked against its portable graph on ORT,
chosen by ``build --dry-run``, and built under the fake TensorRT."""

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


@pytest.fixture(scope="module", params=["fp16", "int8-trt", "fp8"])
def calibrated(request, twin_export, cases, tmp_path_factory):
    """The goldens export with twins, calibrated (forced: random weights are not a quality target)."""
    from starflow_trt.calibration import calibrate_directory

    precision, _, placement = request.param.partition("-")
    out = tmp_path_factory.mktemp(request.param) / "g"
    return calibrate_directory(twin_export, out, precision, text=cases["y"], uncond=cases["y_uncond"],
                               guidance=2.0, force=True, eval_clips=(cases["x"], cases["y"]),
                               placement=placement or "ort", log=lambda m: None)


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
