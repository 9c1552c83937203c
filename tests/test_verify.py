"""``verify``: polygraphy parity of calibrated graphs vs the FP32 export; media graphs through ``calibrate``."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxconverter_common")
pytest.importorskip("polygraphy")

from click.testing import CliRunner  # noqa: E402

from starflow_trt.cli import main  # noqa: E402
from starflow_trt.export.manifest import load_manifest  # noqa: E402
from starflow_trt.staging import sha256_file  # noqa: E402


@pytest.fixture(scope="module")
def toy_dirs(toy_prompt_export, tmp_path_factory):
    """The bundled toy exported WITH its text_encoder graph, and its fp16 calibration (+ captured inputs)."""
    from starflow_trt.calibration import calibrate_directory
    from starflow_trt.toy.calibration import toy_calibration_set

    root = tmp_path_factory.mktemp("verify")
    fp32, fp16, capture = toy_prompt_export, root / "fp16", root / "capture"
    text, uncond, clips = toy_calibration_set(load_manifest(fp32), 4)
    calibrate_directory(fp32, fp16, "fp16", samples=4, text=text, uncond=uncond, eval_clips=clips,
                        capture_dir=capture, log=lambda _: None)
    return fp32, fp16, capture


def _run(args):
    res = CliRunner().invoke(main, ["verify", *map(str, args)])
    return res.exit_code, res.output


# ----------------------------------------------------------------- calibrate policy
def test_calibrate_keeps_the_text_encoder_fp32_and_prompts_encode_identically(toy_dirs):
    from starflow_trt.runtime import Pipeline

    fp32, fp16, _ = toy_dirs
    m32, m16 = load_manifest(fp32), load_manifest(fp16)
    te = m16.graphs["text_encoder"]
    assert te.precision == "fp32" and "FP32" in te.extra["precision_policy"]
    assert te.sha256 == m32.graphs["text_encoder"].sha256 == sha256_file(te.path)   # copied unchanged
    assert m16.graphs["denoiser"].precision == "fp16"                                # flow graphs converted
    assert "text_encoder" not in m16.extra["quality"]["graphs"]                      # fp32: nothing to gate
    prompts = ["a red square moving right", "a blue disc moving up"]
    with Pipeline.from_dir(fp32, backend="ort") as p32, Pipeline.from_dir(fp16, backend="ort") as p16:
        for a, b in zip(p32.encode_text(prompts, fps=16), p16.encode_text(prompts, fps=16)):
            assert torch.equal(a, b)


def test_precision_policy_per_kind():
    from starflow_trt.calibration.policy import DEFAULT_POLICY, builder_flags, graph_precision
    from starflow_trt.errors import StarflowError

    text, vae, step, toy_text = "text_encoder", "vae_decode_step", "step", "toy_text_encoder"
    for req in ("fp16", "int8"):
        assert graph_precision(text, req).precision == "fp32"
        assert graph_precision(toy_text, req).precision == "fp32"
        assert graph_precision(vae, req).precision == "fp16"   # never int8
    assert graph_precision(step, "int8").precision == "int8"
    assert graph_precision(step, "int8", called=False).precision == "fp32"
    assert graph_precision(None, "fp16").precision == "fp16" and DEFAULT_POLICY.allows("int8")
    assert graph_precision(step, "fp32").precision == "fp32"
    # TensorRT flags: strongly typed builds take precision from the ONNX (no flags); weakly typed FP32 builds
    assert builder_flags(step, "int8", weakly_typed=False) == []
    assert builder_flags(step, "fp32", weakly_typed=True) == ["FP16"]
    assert builder_flags(vae, "fp32", weakly_typed=True) == ["FP16"]
    assert builder_flags(text, "fp32", weakly_typed=True) == []
    assert builder_flags(text, "fp32", weakly_typed=True, bf16_text=True) == ["BF16"]
    assert builder_flags(step, "fp32", weakly_typed=True, bf16_text=True) == ["FP16"]
    with pytest.raises(StarflowError, match="text_encoder graph must not be fp16"):
        builder_flags(text, "fp16", weakly_typed=False)
    with pytest.raises(StarflowError, match="must not be int8"):
        builder_flags(vae, "int8", weakly_typed=False)


def test_build_plan_flags_follow_the_policy(toy_dirs):
    from starflow_trt.engine.build import BuildOptions, build_plan

    fp32, fp16, _ = toy_dirs
    legacy = build_plan(fp32, BuildOptions(legacy_fp16_flag=True), "10")["graphs"]
    assert legacy["text_encoder"]["flags"] == [] and legacy["denoiser"]["flags"] == ["FP16"]
    assert build_plan(fp32, BuildOptions(legacy_fp16_flag=True, bf16_text=True), "10")["graphs"][
        "text_encoder"]["flags"] == ["BF16"]
    typed = build_plan(fp16, BuildOptions(), "10")["graphs"]
    assert all(g["flags"] == [] for g in typed.values()) and typed["text_encoder"]["precision"] == "fp32"


# ------------------------------------------------------------------------- verify
def test_verify_fp16_against_recorded_fp32_passes(toy_dirs, tmp_path):
    fp32, fp16, capture = toy_dirs
    report = tmp_path / "verify.json"
    code, out = _run([fp16, "--inputs", capture, "--report", report])
    assert code == 0, out
    assert "9/9 graphs pass" in out
    data = json.loads(report.read_text())
    assert data["passed"] and data["reference"] == str(fp32) and data["inputs"] == "captured"
    graphs = {g["name"]: g for g in data["graphs"]}
    assert set(graphs) == set(load_manifest(fp16).graphs)
    te = graphs["text_encoder"]   # not called by the capture (embeddings): seeded random tokens, bit-identical
    assert te["inputs"] == "random" and te["precision"] == "fp32" and te["max_abs"] == 0 and te["rel_l2"] == 0
    for name, g in graphs.items():
        if g["precision"] == "fp16":
            # under the fp16 quality gate, yet not exact: the graphs really ran in fp16
            assert g["tolerance"] == 0.01 and 0 < g["rel_l2"] <= 0.01 and g["calls"] >= 1, (name, g)
            assert g["inputs"] == "captured"
    # the gate's own metric on the same graphs agrees in magnitude (both relative L2, other held-out calls)
    gate = load_manifest(fp16).extra["quality"]["graphs"]["denoiser"]["rel_l2"]["d"]
    assert graphs["denoiser"]["rel_l2"] == pytest.approx(gate, rel=1.0)


def test_verify_samples_inputs_when_no_capture(toy_dirs):
    fp32, fp16, _ = toy_dirs
    code, out = _run([fp16, "--against", fp32, "--graphs", "text_encoder,deep_step", "--json"])
    assert code == 0, out
    data = json.loads(out)
    assert [g["name"] for g in data["graphs"]] == ["text_encoder", "deep_step"]
    assert all(g["inputs"] == "sampled" for g in data["graphs"])   # the toy prompts went through text_encoder
    assert data["graphs"][1]["calls"] == 4


def test_verify_fails_a_corrupted_graph(toy_dirs, tmp_path):
    import onnx
    from onnx import numpy_helper

    fp32, fp16, capture = toy_dirs
    bad = tmp_path / "bad"
    shutil.copytree(fp16, bad)
    m = load_manifest(bad)
    spec = m.graphs["denoiser"]
    model = onnx.load(str(spec.path))
    init = max((i for i in model.graph.initializer if i.data_type in (1, 10)), key=lambda i: np.prod(i.dims))
    arr = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array((arr * 1.5).astype(arr.dtype), init.name))   # a consistent but wrong graph
    onnx.save(model, str(spec.path))
    m.graphs["denoiser"] = spec.derive(sha256=sha256_file(spec.path))
    m.save(bad)
    report = tmp_path / "r.json"
    code, out = _run([bad, "--inputs", capture, "--report", report])
    assert code == 1, out
    rows = {line.split()[0]: line.split()[-1] for line in out.splitlines()[2:-1]}
    assert rows["denoiser"] == "FAIL" and sum(v == "FAIL" for v in rows.values()) == 1, out
    assert "failing: denoiser" in out
    data = json.loads(report.read_text())
    assert not data["passed"] and [g["name"] for g in data["graphs"] if not g["passed"]] == ["denoiser"]
    # a strict tolerance fails the honest fp16 graphs too; a loose one passes the corrupted graph
    assert _run([fp16, "--inputs", capture, "--graphs", "deep_step", "--tol", "1e-9"])[0] == 1
    assert _run([bad, "--inputs", capture, "--graphs", "denoiser", "--tol", "10"])[0] == 0


def test_verify_bad_input_is_one_line_exit_2(toy_dirs, tmp_path, monkeypatch):
    import sys

    fp32, fp16, capture = toy_dirs
    not_capture = tmp_path / "empty"
    not_capture.mkdir()
    cases = [([fp32], "records no FP32 export"),
             ([fp16, "--against", fp16], "is not an FP32 ONNX export"),
             ([fp32, "--against", fp32], "is its own reference"),
             ([fp16, "--inputs", not_capture], "is not a capture directory"),
             ([fp16, "--graphs", "nope"], "graph 'nope' is not in"),
             ([tmp_path], "manifest.json not found"),
             ([fp16, "--calls", "0"], "--calls")]
    for args, message in cases:
        code, out = _run(args)
        lines = out.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (args, out)
    monkeypatch.setitem(sys.modules, "polygraphy.comparator", None)
    code, out = _run([fp16, "--inputs", capture])
    assert code == 2 and "pip install polygraphy" in out and "starflow-trt[gpu]" in out, out


def test_engine_graphs_need_tensorrt(toy_dirs):
    pytest.importorskip("polygraphy.backend.trt")
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    from starflow_trt.errors import BackendUnavailable
    from starflow_trt.verify import _runner

    spec = load_manifest(toy_dirs[1]).graphs["denoiser"].derive(file="denoiser.engine")
    with pytest.raises(BackendUnavailable, match=r"starflow-trt\[gpu\]"):
        _runner(spec, "x")


# ------------------------------------------------------------ torch backend, media graphs
def test_torch_backend_rebuilds_the_text_encoder_from_its_recorded_source(toy_dirs, tmp_path):
    from starflow_trt.errors import ManifestError
    from starflow_trt.runtime import Pipeline
    from starflow_trt.toy import load_bundled

    fp32 = toy_dirs[0]
    src = load_manifest(fp32).graphs["text_encoder"].extra["source"]
    assert src["path"] == str(load_bundled().text_encoder_path.resolve()) and len(src["sha256"]) == 1
    prompts = ["a red square moving right", "a blue disc moving up"]
    with Pipeline.from_dir(fp32, backend="torch") as pt, Pipeline.from_dir(fp32, backend="ort") as po:
        (y, u), (ry, ru) = pt.encode_text(prompts), po.encode_text(prompts)
        assert y.abs().sum() > 0 and torch.allclose(y, ry, rtol=0, atol=1e-6) and torch.equal(u, ru)
    # a moved / unrecorded source: one line naming the fix
    moved = tmp_path / "moved"
    shutil.copytree(fp32, moved)
    m = load_manifest(moved)
    te = m.graphs["text_encoder"]
    for extra, message in [({**te.extra, "source": {**src, "path": str(tmp_path / "gone.safetensors")}}, "is gone"),
                           ({k: v for k, v in te.extra.items() if k != "source"}, "does not record")]:
        m.graphs["text_encoder"] = te.derive(extra=extra)
        m.save(moved)
        with pytest.raises(ManifestError, match=message) as info:
            Pipeline.from_dir(moved, backend="torch").encode_text(prompts)
        assert "\n" not in str(info.value) and "--backend ort" in str(info.value)
