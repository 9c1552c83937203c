"""Calibration: TensorRT cache format round trip, Q/DQ structure, capture shards, gate refusal, FP16."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from starflow_trt.calibration.capture import CallReservoir, CaptureSet
from starflow_trt.calibration.trt_cache import decode_scale, encode_scale, read_cache, trt_version_tag, write_cache
from starflow_trt.errors import StarflowError

pytest.importorskip("onnxruntime")


def test_trt_cache_round_trip(tmp_path):
    amax = {"tokens": 3.25, "layer_norm": 17.0, "val_12": 1e-3, "odd:name": 250.5}
    path = write_cache(tmp_path / "c.cache", amax, "entropy", "10.3.0")
    lines = path.read_text().splitlines()
    assert lines[0] == "TRT-100300-EntropyCalibration2"
    header, scales = read_cache(path)
    assert header == lines[0] and set(scales) == set(amax)
    for name, value in amax.items():
        assert scales[name] == struct.unpack(">f", struct.pack(">f", value / 127.0))[0]
    # the hex is the big-endian float32 of amax/127
    assert encode_scale(1.0) == "3f800000" and decode_scale("3f800000") == 1.0
    assert trt_version_tag("8.6.1") == 8601 and trt_version_tag("10.0.1") == 100001
    bad = tmp_path / "bad.cache"
    bad.write_text("tokens 3.0\n")
    with pytest.raises(ValueError, match="TRT-"):
        read_cache(bad)


def test_reservoir_and_shards(tmp_path):
    res = CallReservoir(max_calls=5, seed=1)
    for i in range(40):
        res.offer("g", {"x": torch.full((2, i % 3 + 1), float(i))})
    assert len(res.calls["g"]) == 5 and res.seen["g"] == 40
    values = sorted(int(c["x"].flat[0]) for c in res.calls["g"])
    assert values != [0, 1, 2, 3, 4]  # a sample of the whole stream, not its head
    cap = CaptureSet(calls=res.calls, seen=res.seen)
    index = cap.save(tmp_path / "cap", shard_bytes=40)
    assert len(index["graphs"]["g"]["shards"]) > 1  # size-bounded
    again = CaptureSet.load(tmp_path / "cap")
    for a, b in zip(cap.calls["g"], again.calls["g"]):
        np.testing.assert_array_equal(a["x"], b["x"])
    cal, held = again.split(0.25)
    assert len(cal.calls["g"]) + len(held.calls["g"]) == 5 and held.calls["g"]


#: the files ONNX shape inference wrote while ``int8_dir`` was made (ORT's quantizer writes scratch graphs)
SCRATCH: list[Path] = []


@pytest.fixture(scope="module")
def int8_dir(goldens_export, cases, tmp_path_factory):
    """The goldens export calibrated to INT8 (forced: random weights are not a quality target)."""
    import onnx

    from starflow_trt.calibration import calibrate_directory

    out = tmp_path_factory.mktemp("int8") / "g"
    y, u = cases["y"], cases["y_uncond"]
    infer = onnx.shape_inference.infer_shapes_path

    def spy(model_path, output_path="", *args, **kwargs):
        SCRATCH.append(Path(output_path or model_path).resolve())
        return infer(model_path, output_path, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(onnx.shape_inference, "infer_shapes_path", spy)
        return calibrate_directory(goldens_export, out, "int8", method="percentile", text=y, uncond=u, guidance=2.0,
                                   force=True, eval_clips=(cases["x"], y), capture_dir=out.parent / "capture",
                                   shard_bytes=1 << 20, log=lambda m: None)


def test_calibration_writes_nothing_into_the_export_it_reads(int8_dir, goldens_export):
    # ORT's quantizer writes `<graph>-inferred.onnx` beside the path it is given: a private view, not the export
    source = goldens_export.resolve()
    assert SCRATCH and not [p for p in SCRATCH if p.is_relative_to(source)], SCRATCH


def test_int8_graphs_have_weight_qdq_and_run(int8_dir, cases):
    from starflow_trt.calibration.int8 import weight_quantized_matmuls
    from starflow_trt.runtime import Pipeline

    for name, spec in int8_dir.graphs.items():
        conv = spec.extra["conversion"]
        assert spec.precision == "int8" and conv["QuantizeLinear"] > 0
        hits, total = weight_quantized_matmuls(spec.path)
        assert hits == conv["quantized_nodes"] == total - len(conv["excluded_nodes"])
        header, scales = read_cache(spec.root / conv["trt_calibration_cache"])
        assert header.startswith("TRT-") and scales
    pipe = Pipeline.from_dir(int8_dir.root, backend="ort", precision="int8")
    result = pipe.generate(cases["y"], noise=cases["noise"], denoise=False)
    assert torch.isfinite(result.latents).all()
    q = int8_dir.extra["quality"]
    assert set(q) >= {"graphs", "bpd_increase", "latent_psnr_db", "gate"}


def test_int8_manifest_records_the_residual_floor_and_the_pipeline_uses_it(int8_dir, goldens_export, cases):
    from starflow_trt.calibration.floor import QUANTILE, SWEEPS
    from starflow_trt.runtime import Pipeline
    from starflow_trt.sampling import JacobiConfig

    floor = int8_dir.extra["calibration"]["residual_floor"]
    assert floor["sweeps"] == SWEEPS and floor["quantile"] == QUANTILE and floor["chunks"] > 0
    assert 0 < floor["value"] < 1 and int8_dir.residual_floor == floor["value"]
    pipe8 = Pipeline.from_dir(int8_dir.root, backend="ort", precision="int8")
    pipe32 = Pipeline.from_dir(goldens_export)
    assert pipe8.spec.residual_floor == floor["value"] and pipe32.spec.residual_floor == 0.0   # float: unchanged
    jac = JacobiConfig(block_size=4, threshold=floor["value"] / 10, schedule="upstream")
    r = pipe8.generate(cases["y"][:1], cases["y_uncond"][:1], noise=cases["noise"][:1], guidance=2.0, jacobi=jac,
                       denoise=False)
    assert r.stats["request"]["jacobi"]["floor"] == floor["value"]
    deep = next(t for t in r.stats["jacobi"] if t["block"] == "deep_step")
    assert all(c["delta"] < floor["value"] or c["iterations"] == jac.max_iter for c in deep["chunks"])


def test_capture_shards_hold_kv_and_iterates(int8_dir):
    cap_dir = int8_dir.root.parent / "capture"
    captured = CaptureSet.load(cap_dir)
    assert set(captured.calls) == set(int8_dir.graphs)
    steps = captured.calls["deep_step"]
    assert {"tokens", "past_k_0", "past_v_1", "rope_cos", "rope_sin"} <= set(steps[0])
    assert max(c["past_k_0"].shape[0] for c in steps) > 4  # real caches (text + generated tokens)
    assert captured.seen["deep_step"] >= len(steps)
    assert any(c["tokens"].shape[1] > 1 for c in steps)  # Jacobi iterates (S > 1 chunks) are captured
    shards = list((cap_dir / "deep_step").glob("shard_*.npz"))
    assert len(shards) > 1 and all(p.stat().st_size < 3 << 20 for p in shards)


def test_gate_refuses_without_force(goldens_export, cases, tmp_path):
    from starflow_trt.calibration import QualityGate, calibrate_directory

    strict = QualityGate(max_graph_error=1e-9, max_bpd_increase=1e-9, min_psnr_db=500.0)
    out = tmp_path / "refused"
    with pytest.raises(StarflowError, match="quality gate"):
        calibrate_directory(goldens_export, out, "fp16", text=cases["y"], uncond=cases["y_uncond"], guidance=2.0,
                            gate=strict, eval_clips=(cases["x"], cases["y"]), log=lambda m: None)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_calibrate_needs_prompts_for_foreign_models(goldens_export, tmp_path):
    from starflow_trt.calibration import calibrate_directory

    with pytest.raises(StarflowError, match="text-embeddings"):
        calibrate_directory(goldens_export, tmp_path / "x", "int8", log=lambda m: None)


def test_quality_gate_fails_on_non_finite_metrics():
    from starflow_trt.calibration.calibrate import _check_gate, default_gate

    gate = default_gate("int8")
    good = {"graphs": {"deep_step": {"rel_l2": {"scale": 0.0}}}, "bpd_increase": 0.0, "latent_psnr_db": float("inf")}
    assert _check_gate(good, gate) == []
    nan = float("nan")
    bad = {"graphs": {"deep_step": {"rel_l2": {"scale": nan}}}, "bpd_increase": nan, "latent_psnr_db": nan}
    assert len(_check_gate(bad, gate)) == 3


def test_toy_calibration_set_only_for_toy_exports(goldens_export, toy_export):
    from starflow_trt.export.manifest import load_manifest
    from starflow_trt.toy.calibration import HELD_OUT_CLIPS, toy_calibration_set

    assert toy_calibration_set(load_manifest(goldens_export), samples=4) is None
    text, uncond, (clips, clip_text) = toy_calibration_set(load_manifest(toy_export), samples=4)
    assert text.shape[0] == uncond.shape[0] == 4 and clips.shape[0] == clip_text.shape[0] == HELD_OUT_CLIPS
    assert not torch.equal(text[0], uncond[0])


def test_samples_takes_the_first_rows_or_is_refused(goldens_export, cases, tmp_path, monkeypatch):
    """--samples N with embeddings: the first N rows are captured (was: ignored); more than given: one line."""
    from click.testing import CliRunner

    from starflow_trt.calibration import calibrate as C
    from starflow_trt.cli import main

    seen = {}

    class Stop(Exception):
        pass

    def spy(pipe, text, uncond, *args, **kwargs):
        seen["text"], seen["uncond"] = text.clone(), uncond.clone()
        raise Stop

    monkeypatch.setattr(C, "capture_activations", spy)
    y, u = cases["y"], cases["y_uncond"]
    assert y.shape[0] >= 2
    with pytest.raises(Stop):
        C.calibrate_directory(goldens_export, tmp_path / "a", "int8", samples=1, text=y, uncond=u, log=lambda m: None)
    assert torch.equal(seen["text"], y[:1]) and torch.equal(seen["uncond"], u[:1])
    with pytest.raises(Stop):   # no --samples: every row
        C.calibrate_directory(goldens_export, tmp_path / "a", "int8", text=y, uncond=u, log=lambda m: None)
    assert seen["text"].shape[0] == y.shape[0]
    np.save(tmp_path / "y.npy", y.numpy())
    np.save(tmp_path / "u.npy", u.numpy())
    res = CliRunner().invoke(main, ["calibrate", str(goldens_export), "--precision", "int8", "--samples",
                                    str(y.shape[0] + 1), "--text-embeddings", str(tmp_path / "y.npy"), "--uncond",
                                    str(tmp_path / "u.npy"), "-o", str(tmp_path / "out")])
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert f"--samples {y.shape[0] + 1} but --text-embeddings has {y.shape[0]} row(s)" in res.output
    assert not (tmp_path / "out").exists()
