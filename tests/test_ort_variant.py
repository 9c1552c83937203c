"""ORT-optimised step-graph variants (export/ort_optimize.py): same outputs as the portable graphs,
recorded and hash-checked in the manifest, loaded by the ort backend, goldens through the pipeline."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from starflow_trt.errors import ManifestError, StarflowError
from starflow_trt.export.manifest import load_manifest
from starflow_trt.export.ort_optimize import optimize_graph, write_ort_variants
from starflow_trt.reference.rope import pair_rotation

from .conftest import assert_golden

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")
from onnx import numpy_helper  # noqa: E402


@pytest.fixture(scope="module")
def variant_dir(goldens_export, tmp_path_factory):
    out = tmp_path_factory.mktemp("ortvar") / "tiny_t2v"
    shutil.copytree(goldens_export, out)
    rows = write_ort_variants(out)
    assert rows, "no step graph got a variant"
    return out


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def test_variants_are_recorded_and_fused(variant_dir):
    manifest = load_manifest(variant_dir, verify=True)
    steps = [s for s in manifest.graphs.values() if s.kind == "step"]
    assert steps and all(s.ort_variant for s in steps)
    assert all(s.ort_variant is None for s in manifest.graphs.values() if s.kind != "step")
    for spec in steps:
        layers = manifest.geometry.blocks[spec.block].layers
        assert spec.ort_variant["fusions"] == {"rotary": layers}
        model = onnx.load(str(spec.ort_path))
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("RotaryEmbedding") == layers
        # the pair-swap MatMuls are gone
        r = pair_rotation(manifest.geometry.head_dim).numpy()
        consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
        assert not any(n.op_type == "MatMul" and n.input[1] in consts and np.array_equal(consts[n.input[1]], r)
                       for n in model.graph.node)


def test_variant_outputs_match_portable(variant_dir):
    from types import SimpleNamespace

    from starflow_trt.bench.workloads import graph_tensors

    manifest = load_manifest(variant_dir)
    for spec in (s for s in manifest.graphs.values() if s.kind == "step"):
        for sizes in ({"batch": 2, "S": 5, "P": 7}, {"batch": 1, "S": 1, "P": 0}):
            # example inputs carry real (pair-duplicated) RoPE rows
            inputs, _ = graph_tensors(SimpleNamespace(manifest=manifest), spec, sizes, seed=3)
            feed = {k: v.numpy() for k, v in inputs.items()}
            ref = _session(spec.path).run(None, feed)
            got = _session(spec.ort_path).run(None, feed)
            for t, a, b in zip(spec.outputs, ref, got):
                rel = np.abs(a - b).max() / max(np.abs(a).max(), 1e-30)
                assert rel <= 1e-5, f"{spec.name} {t.name} {sizes}: relative error {rel:.2e}"


def test_pipeline_with_variants_matches_goldens(variant_dir, cases):
    from starflow_trt.reference import JacobiConfig
    from starflow_trt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_dir(variant_dir, backend="ort")
    spec = pipe.manifest.graph("deep_step")
    assert pipe.backend.graph_path(spec) == spec.ort_path   # the variant is what the backend loads
    y, yu, noise = cases["y"], cases["y_uncond"], cases["noise"]
    exact = JacobiConfig(block_size=8, max_iter=40, threshold=0.0, schedule="upstream")
    assert_golden(pipe.generate(y, yu, noise=noise, guidance=2.0, denoise=False).latents,
                  cases["reverse.g2"], "reverse.g2")
    assert_golden(pipe.generate(y, yu, noise=noise, guidance=2.0, jacobi=exact, denoise=False).latents,
                  cases["jacobi.exact.g2"], "jacobi.exact.g2")
    assert_golden(pipe.generate(y, noise=noise).latents, cases["denoised"], "denoised")
    pipe.close()


def test_backend_can_ignore_variants(variant_dir):
    from starflow_trt.runtime.backends.ort_backend import OrtBackend

    spec = load_manifest(variant_dir).graph("deep_step")
    assert OrtBackend(ort_variants=False).graph_path(spec) == spec.path
    assert OrtBackend().graph_path(spec) == spec.ort_path


def test_modified_or_missing_variant_is_refused(variant_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(variant_dir, broken)
    spec = load_manifest(broken).graph("deep_step")
    with open(spec.ort_path, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ManifestError, match="ORT variant .* modified"):
        load_manifest(broken, verify=True)
    (broken / spec.ort_variant["file"]).unlink()
    with pytest.raises(ManifestError, match="ORT variant .* missing"):
        load_manifest(broken, verify=True)


def test_derived_graphs_drop_the_variant(variant_dir):
    spec = load_manifest(variant_dir).graph("deep_step")
    assert spec.derive(root=variant_dir).ort_variant == spec.ort_variant     # same file: kept
    assert spec.derive(sha256="0" * 64).ort_variant is None                   # calibrated / engine: dropped
    assert spec.derive(file="x.onnx", ort_variant=spec.ort_variant).ort_variant == spec.ort_variant


def test_unknown_fusion_and_graph_without_the_pattern(variant_dir, tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    spec = load_manifest(variant_dir).graph("deep_step")
    with pytest.raises(StarflowError, match="unknown ORT fusion"):
        optimize_graph(spec.path, tmp_path / "x.onnx", ["nope"])
    # x @ W with a 4x4 W that is not the pair rotation: nothing to fuse, the graph stays as it was
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32)[::-1].copy(), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(tmp_path / "m.onnx"))
    assert optimize_graph(tmp_path / "m.onnx", tmp_path / "m.ort.onnx") == {"rotary": 0}
    assert [n.op_type for n in onnx.load(str(tmp_path / "m.ort.onnx")).graph.node] == ["MatMul"]


def test_external_data_is_shared_not_copied(variant_dir, tmp_path):
    from types import SimpleNamespace

    from starflow_trt.bench.workloads import graph_tensors

    manifest = load_manifest(variant_dir)
    spec = manifest.graph("deep_step")
    src = tmp_path / "deep_step.onnx"
    onnx.save(onnx.load(str(spec.path)), str(src), save_as_external_data=True, all_tensors_to_one_file=True,
              location="deep_step.onnx.data", size_threshold=1024)   # R (16 kB) too
    dst = tmp_path / "deep_step.ort.onnx"
    assert optimize_graph(src, dst) == {"rotary": manifest.geometry.blocks[spec.block].layers}
    assert dst.stat().st_size < src.stat().st_size + 64 * 1024          # weights stay in the shared .data file
    assert not (tmp_path / "deep_step.ort.onnx.data").exists()
    inputs, _ = graph_tensors(SimpleNamespace(manifest=manifest), spec, {"batch": 2, "S": 4, "P": 3}, seed=5)
    feed = {k: v.numpy() for k, v in inputs.items()}
    for a, b in zip(_session(src).run(None, feed), _session(dst).run(None, feed)):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max()
    with pytest.raises(StarflowError, match="external data"):
        (tmp_path / "elsewhere").mkdir()
        optimize_graph(src, tmp_path / "elsewhere" / "x.onnx")
