"""TensorRT variants of the step / prefill graphs (export/trt_variant.py): the concat-then-attend form in
every layer, the same outputs as the portable graphs under ONNX Runtime, recorded and hash-checked in the
manifest, parsed by ``build``. Whether TensorRT fuses the form is not observable here (no GPU): the
structural tests assert the pattern TensorRT's fused-attention guide documents, nothing more."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from starflow_trt.errors import ManifestError
from starflow_trt.export.manifest import load_manifest
from starflow_trt.export.trt_variant import FORM, attention_layers, form_problems
from starflow_trt.reference.layers import _concat_attention, _two_part_attention

from .exports import GOLDENS_FLOW

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

VARIANT_KINDS = ("step", "prefill")


def _export(goldens_dir, out, graphs, **kw):
    from starflow_trt.export.onnx_export import ExportLimits, export_graphs

    export_graphs(goldens_dir / "config.yaml", goldens_dir / "model.pth", out, graphs=graphs, trt_variants=True,
                  limits=ExportLimits(height=6, width=4, max_frames=3, max_batch=4, **kw))
    return out


@pytest.fixture(scope="module")
def small_dir(goldens_dir, tmp_path_factory):
    """One 1-layer shallow step graph and its variant, exported by the CLI with its weights in external data
    (the path of graphs over 2 GB; the full export below keeps them inline)."""
    from click.testing import CliRunner

    from starflow_trt.cli import main

    out = tmp_path_factory.mktemp("trtvar") / "g"
    res = CliRunner().invoke(main, ["export", str(goldens_dir / "config.yaml"), str(goldens_dir / "model.pth"),
                                    "-o", str(out), "--graphs", "shallow_step_1", "--grid", "6x4", "--max-frames", "3",
                                    "--trt-variants", "--external-data", "always"])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def full_dir(exports):
    """The goldens export with variants (every step and prefill graph has one; shared with test_calibration_twin)."""
    return exports(**GOLDENS_FLOW, trt_variants=True)


def _session(path):
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _cases(spec, rng):
    """Sizes within the graph's ranges: P = 0, the smallest S, and random S / P."""
    if spec.kind == "prefill":
        return [{"batch": 1}, {"batch": 3}]
    d = spec.dims
    rand = {k: int(rng.integers(r.min, r.max + 1)) for k, r in d.items()}
    return [{"batch": 2, "S": min(5, d["S"].max), "P": 0}, {"batch": 1, "S": 1, "P": d["P"].max}, rand,
            {**rand, "P": int(rng.integers(d["P"].min, d["P"].max + 1))}]


def _parity(directory) -> list[tuple[str, dict, float, float]]:
    """(graph, sizes, max abs error, max relative error) of variant vs portable over every output."""
    from starflow_trt.bench.workloads import graph_tensors

    manifest = load_manifest(directory)
    rng = np.random.default_rng(0)
    rows = []
    for spec in (s for s in manifest.graphs.values() if s.kind in VARIANT_KINDS):
        portable, variant = _session(spec.path), _session(spec.trt_path)
        for sizes in _cases(spec, rng):
            inputs, _ = graph_tensors(SimpleNamespace(manifest=manifest), spec, sizes, seed=3)
            feed = {k: v.numpy() for k, v in inputs.items()}
            ref, got = portable.run(None, feed), variant.run(None, feed)
            assert [a.shape for a in ref] == [b.shape for b in got]
            err = max(float(np.abs(a - b).max(initial=0.0)) for a, b in zip(ref, got))
            rel = max(float(np.abs(a - b).max(initial=0.0) / max(np.abs(a).max(initial=0.0), 1e-30))
                      for a, b in zip(ref, got))
            rows.append((spec.name, sizes, err, rel))
    return rows


def _assert_form(directory):
    """Every layer of every variant in the form; IO identical to the portable graph."""
    manifest = load_manifest(directory, verify=True)
    specs = [s for s in manifest.graphs.values() if s.kind in VARIANT_KINDS]
    assert specs
    for spec in specs:
        assert spec.trt_variant["form"] == FORM and spec.trt_path.name == spec.file[:-5] + ".trt.onnx"
        model, portable = onnx.load(str(spec.trt_path)), onnx.load(str(spec.path))
        io = lambda m: [(v.name, str(v.type)) for v in (*m.graph.input, *m.graph.output)]  # noqa: E731
        assert io(model) == io(portable)
        layers = manifest.geometry.blocks[spec.block].layers
        past = spec.kind == "step"
        attended = range(layers) if past else range(layers - 1)   # prefill: the last layer's attention is dead code
        found = attention_layers(model)
        assert len(found) == len(attended) and not any(n.op_type == "Attention" for n in model.graph.node)
        for layer in attended:
            k, v = f"new_k_{layer}", f"new_v_{layer}"
            (a,) = [a for a in found if k in a.keys]
            assert a.keys == ((f"past_k_{layer}", k) if past else (k,)), a
            assert a.values == ((f"past_v_{layer}", v) if past else (v,)), a
            if past:
                assert a.key_axis == 2 and a.value_axis == 2   # the sequence axis of [B, H, P+S, hd]
            assert a.q_scale == pytest.approx(manifest.geometry.head_dim ** -0.5, rel=1e-6)
            assert a.axis == -1 and [op for op in a.score_ops if op != "Cast"] == ["Add"] and not a.two_part
        assert form_problems(model, layers, manifest.geometry.head_dim, past, attended) == []
        # the portable step graph is the two-part form: the check can fail
        if past:
            assert any("two-part" in p for p in form_problems(portable, layers, manifest.geometry.head_dim, True))


# ---------------------------------------------------------------------------------------- the maths
@pytest.mark.parametrize("past_len", [0, 1, 6])
def test_concat_attention_equals_two_part(past_len):
    g = torch.Generator().manual_seed(past_len)
    b, h, s, hd = 2, 3, 4, 8
    q, k, v = (torch.randn(b, h, s, hd, generator=g, dtype=torch.float64) for _ in range(3))
    past = tuple(torch.randn(b, h, past_len, hd, generator=g, dtype=torch.float64) for _ in range(2))
    bias = torch.zeros(s, s, dtype=torch.float64).masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(),
                                                              float("-inf"))
    scale = hd ** -0.5
    want = _two_part_attention(q, k, v, past, bias, scale)
    assert torch.allclose(_concat_attention(q, k, v, past, bias, scale), want, rtol=1e-12, atol=1e-12)
    full = torch.softmax((q @ torch.cat([past[0], k], 2).transpose(-1, -2)) * scale
                         + torch.nn.functional.pad(bias, (past_len, 0)), -1) @ torch.cat([past[1], v], 2)
    assert torch.allclose(want, full, rtol=1e-12, atol=1e-12)


def _toy_graph(scale_q: bool = True, concat_k: bool = True):
    """One attention layer in ONNX by hand: K/V = Concat(past, new) [B, H, P+S, hd], Q·Kᵀ, mask, softmax, ·V."""
    from onnx import TensorProto, helper, numpy_helper

    hd = 4
    f = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, None)  # noqa: E731
    nodes = [helper.make_node("Transpose", [f"{p}_{t}_0"], [f"{p}{t}"], perm=[1, 2, 0, 3])
             for p in ("past", "new") for t in ("k", "v")]
    nodes[2].output[0], nodes[3].output[0] = "k", "v"   # the new K/V before their output transposes
    nodes[2].input[0], nodes[3].input[0] = "k_in", "v_in"
    nodes += [helper.make_node("Transpose", ["k"], ["new_k_0"], perm=[2, 0, 1, 3]),
              helper.make_node("Transpose", ["v"], ["new_v_0"], perm=[2, 0, 1, 3]),
              helper.make_node("Concat", ["pastk", "k"] if concat_k else ["k"], ["keys"], axis=2),
              helper.make_node("Concat", ["pastv", "v"], ["values"], axis=2),
              helper.make_node("Transpose", ["keys"], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("Mul", ["q", "scale"], ["qs"]),
              helper.make_node("MatMul", ["qs" if scale_q else "q", "kt"], ["scores"]),
              helper.make_node("Add", ["scores", "mask"], ["masked"]),
              helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
              helper.make_node("MatMul", ["probs", "values"], ["out"])]
    graph = helper.make_graph(nodes, "toy", [f(n) for n in ("q", "k_in", "v_in", "past_k_0", "past_v_0", "mask")],
                              [f(n) for n in ("out", "new_k_0", "new_v_0")],
                              [numpy_helper.from_array(np.array(hd ** -0.5, np.float32), "scale")])
    return helper.make_model(graph), hd


def test_form_check_on_a_hand_built_layer():
    model, hd = _toy_graph()
    (layer,) = attention_layers(model)
    assert layer.keys == ("past_k_0", "new_k_0") and layer.values == ("past_v_0", "new_v_0")
    assert layer.key_axis == 2 and layer.score_ops == ("Add",)
    assert form_problems(model, 1, hd, past=True) == []
    assert any("Q not multiplied" in p for p in form_problems(_toy_graph(scale_q=False)[0], 1, hd, past=True))
    assert any("K is ('new_k_0',)" in p for p in form_problems(_toy_graph(concat_k=False)[0], 1, hd, past=True))
    assert any("0 softmax nodes" in p for p in form_problems(model, 2, hd, past=True))   # layer 1 missing


# ------------------------------------------- one small graph (slow: its export, ~20 s on a busy box)
@pytest.mark.slow
def test_variant_form_and_parity_small(small_dir):
    _assert_form(small_dir)
    rows = _parity(small_dir)
    assert rows and all(rel <= 1e-5 for *_, rel in rows), rows


@pytest.mark.slow
def test_build_plan_parses_the_variant(small_dir, tmp_path):
    import json

    from click.testing import CliRunner

    from starflow_trt.cli import main
    from starflow_trt.engine.build import BuildOptions, build_plan

    step = load_manifest(small_dir).graph("shallow_step_1")
    res = CliRunner().invoke(main, ["build", str(small_dir), "--dry-run"])
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)["graphs"]["shallow_step_1"]
    assert plan["onnx"] == str(step.trt_path) and plan["attention"] == FORM
    plain = tmp_path / "plain"   # the same directory without the variant recorded: the portable graph
    shutil.copytree(small_dir, plain)
    manifest = load_manifest(plain)
    manifest.graph("shallow_step_1").trt_variant = None
    manifest.save()
    plan = build_plan(plain, BuildOptions())["graphs"]["shallow_step_1"]
    assert plan["onnx"] == str(plain / step.file) and plan["attention"] == "portable"


@pytest.mark.slow
def test_modified_or_missing_variant_is_refused(small_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(small_dir, broken)
    spec = load_manifest(broken).graph("shallow_step_1")
    assert spec.derive(root=broken).trt_variant == spec.trt_variant   # same file: kept
    assert spec.derive(sha256="0" * 64).trt_variant is None            # calibrated / engine: dropped
    with open(spec.trt_path, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ManifestError, match="TensorRT variant .* modified"):
        load_manifest(broken, verify=True)
    (broken / spec.trt_variant["file"]).unlink()
    with pytest.raises(ManifestError, match="TensorRT variant .* missing"):
        load_manifest(broken, verify=True)


@pytest.mark.slow
def test_form_problems_name_what_is_wrong(small_dir):
    """Break one piece of the variant at a time: the check names it."""
    spec = load_manifest(small_dir).graph("shallow_step_1")
    hd = load_manifest(small_dir).geometry.head_dim
    for breaks, expect in (("scale", "Q not multiplied"), ("concat", "K is"), ("axis", "softmax axis")):
        model = onnx.load(str(spec.trt_path))
        nodes = list(model.graph.node)
        if breaks == "scale":
            mm = next(n for n in nodes if n.op_type == "MatMul" and n.output[0] in
                      {m.input[0] for m in nodes if m.op_type == "Add"} and
                      any(p.op_type == "Mul" and p.output[0] == n.input[0] for p in nodes))
            mul = next(p for p in nodes if p.output[0] == mm.input[0])
            mm.input[0] = mul.input[0]
        elif breaks == "concat":
            cat = next(n for n in nodes if n.op_type == "Concat" and "past_k_0" in
                       {p.input[0] for p in nodes if p.op_type == "Transpose" and p.output[0] in n.input})
            cat.input[0] = cat.input[1]
        else:
            sm = next(n for n in nodes if n.op_type == "Softmax")
            del sm.attribute[:]
            sm.attribute.append(onnx.helper.make_attribute("axis", 2))
        assert any(expect in p for p in form_problems(model, 1, hd, past=True)), breaks


@pytest.mark.slow
def test_share_external_data(small_dir, tmp_path):
    """A variant saved with its own external data is pointed at the portable graph's file."""
    from starflow_trt.export.trt_variant import share_external_data

    spec = load_manifest(small_dir).graph("shallow_step_1")
    src, dst = tmp_path / "s.onnx", tmp_path / "s.trt.onnx"
    for model_path, target in ((spec.path, src), (spec.trt_path, dst)):
        onnx.save(onnx.load(str(model_path)), str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=target.name + ".data", size_threshold=256)
    assert share_external_data(dst, src) > 0
    assert not (tmp_path / "s.trt.onnx.data").exists()
    model = onnx.load(str(dst), load_external_data=False)
    locations = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    assert locations == {"s.onnx.data"}
    from starflow_trt.bench.workloads import graph_tensors

    inputs, _ = graph_tensors(SimpleNamespace(manifest=load_manifest(small_dir)), spec, {"batch": 2, "S": 3, "P": 2},
                              seed=1)
    feed = {k: v.numpy() for k, v in inputs.items()}
    for a, b in zip(_session(spec.trt_path).run(None, feed), _session(dst).run(None, feed)):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ every step / prefill graph
@pytest.mark.slow
def test_every_variant_has_the_form(full_dir):
    _assert_form(full_dir)


@pytest.mark.slow
def test_every_variant_matches_the_portable_graph(full_dir):
    rows = _parity(full_dir)
    names = {r[0] for r in rows}
    assert names == {"deep_prefill", "deep_step", *(f"shallow_step_{k}" for k in range(5))}
    bad = [r for r in rows if r[3] > 1e-5]
    assert not bad, bad


@pytest.mark.slow
def test_fp16_variant_keeps_the_fp32_softmax_island(goldens_dir, tmp_path):
    out = _export(goldens_dir, tmp_path / "h", ["deep_step"], dtype="fp16")
    spec = load_manifest(out).graph("deep_step")
    model = onnx.load(str(spec.trt_path))
    for a in attention_layers(model):
        assert a.score_ops == ("Cast", "Add"), a   # fp16 Q·Kᵀ, cast to float32, float32 mask + softmax
    softmax_in = {n.input[0] for n in model.graph.node if n.op_type == "Softmax"}
    # the softmax runs on float32 in both forms
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    assert {types[t] for t in softmax_in} == {onnx.TensorProto.FLOAT}
    geo = load_manifest(out).geometry
    assert form_problems(model, geo.blocks[spec.block].layers, geo.head_dim, True) == []
    rows = _parity(out)
    assert all(rel <= 1e-3 for *_, rel in rows), rows   # fp16 products: both graphs round alike, not bitwise


@pytest.mark.slow
def test_external_data_variant_shares_the_portable_file(small_dir):
    """Graphs over 2 GB keep weights in external data: the variant points at the portable graph's file."""
    spec = load_manifest(small_dir, verify=True).graph("shallow_step_1")
    assert spec.external_data and spec.trt_variant["external_data"] == spec.external_data
    assert sorted(p.name for p in small_dir.iterdir() if p.name.endswith(".data")) == spec.external_data
    rows = _parity(small_dir)
    assert rows and all(rel <= 1e-5 for *_, rel in rows), rows
