"""TensorRT-placed Q/DQ (calibration/qdq.py): placement rules per layer on a small transformer-like graph,
FP8 E4M3 numerics on ORT's CPU EP against an independent numpy model, precision policy and build flags."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
ml_dtypes = pytest.importorskip("ml_dtypes")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from starflow_trt.calibration.int8 import DEFAULT_EXCLUDE  # noqa: E402
from starflow_trt.calibration.qdq import MIN_GEMM_DIM, activation_tensors, insert_qdq, qdq_layout, qformat  # noqa: E402

D, H = 32, 64


def _ns(node, path: str):
    node.metadata_props.add(key="namespace", value=path)
    return node


def block_graph(attention: str = "two_part"):
    """x [S, D] → LayerNorm → q/k/v projections → attention (``two_part``: past and new keys scored separately,
    one softmax; ``single``: Q·Kᵀ → softmax → ·V) → out proj → residual add → MLP (GELU) → residual add;
    plus a small GEMM (K = 8) on a side input. Past K/V [P, D] are graph inputs."""
    rng = np.random.default_rng(0)
    w = {n: rng.standard_normal(s).astype(np.float32) * 0.2 for n, s in
         {"wq": (D, D), "wk": (D, D), "wv": (D, D), "wo": (D, D), "w1": (D, H), "w2": (H, D), "ws": (8, D),
          "b1": (H,)}.items()}
    inits = [numpy_helper.from_array(v, k) for k, v in w.items()]
    inits += [numpy_helper.from_array(np.ones(D, np.float32), "g"), numpy_helper.from_array(np.zeros(D, np.float32), "b")]
    att = "block.attention: Attention/matmul"
    n = [helper.make_node("LayerNormalization", ["x", "g", "b"], ["ln"], name="ln"),
         _ns(helper.make_node("MatMul", ["ln", "wq"], ["q"], name="q_proj"), "block.attention.qkv: Linear"),
         _ns(helper.make_node("MatMul", ["ln", "wk"], ["k"], name="k_proj"), "block.attention.qkv: Linear"),
         _ns(helper.make_node("MatMul", ["ln", "wv"], ["v"], name="v_proj"), "block.attention.qkv: Linear")]
    if attention == "two_part":
        n += [helper.make_node("Transpose", ["past_k"], ["pkT"], perm=[1, 0]),
              helper.make_node("Transpose", ["k"], ["kT"], perm=[1, 0]),
              _ns(helper.make_node("MatMul", ["q", "pkT"], ["s_past"], name="score_past"), att),
              _ns(helper.make_node("MatMul", ["q", "kT"], ["s_new"], name="score_new"), att),
              helper.make_node("Concat", ["s_past", "s_new"], ["s"], axis=1),
              helper.make_node("Softmax", ["s"], ["p"], axis=1),
              helper.make_node("Shape", ["past_k"], ["pk_shape"]),
              helper.make_node("Slice", ["pk_shape", "zero", "one"], ["plen"]),
              helper.make_node("Shape", ["k"], ["k_shape"]),
              helper.make_node("Slice", ["k_shape", "zero", "one"], ["slen"]),
              helper.make_node("Concat", ["plen", "slen"], ["splits"], axis=0),
              helper.make_node("Split", ["p", "splits"], ["p_past", "p_new"], axis=1),
              _ns(helper.make_node("MatMul", ["p_past", "past_v"], ["o_past"], name="pv_past"), att),
              _ns(helper.make_node("MatMul", ["p_new", "v"], ["o_new"], name="pv_new"), att),
              helper.make_node("Add", ["o_past", "o_new"], ["o"])]
        inits += [numpy_helper.from_array(np.array([0], np.int64), "zero"),
                  numpy_helper.from_array(np.array([1], np.int64), "one")]
    else:
        n += [helper.make_node("Transpose", ["k"], ["kT"], perm=[1, 0]),
              _ns(helper.make_node("MatMul", ["q", "kT"], ["s"], name="score"), att),
              helper.make_node("Softmax", ["s"], ["p"], axis=1),
              _ns(helper.make_node("MatMul", ["p", "v"], ["o"], name="pv"), att)]
    n += [_ns(helper.make_node("MatMul", ["o", "wo"], ["proj"], name="o_proj"), "block.attention.proj: Linear"),
          helper.make_node("Add", ["x", "proj"], ["h"], name="residual_1"),
          _ns(helper.make_node("MatMul", ["h", "w1"], ["m1"], name="mlp_0"), "block.mlp.main.0: Linear"),
          helper.make_node("Add", ["m1", "b1"], ["m1b"], name="bias"),
          helper.make_node("Gelu", ["m1b"], ["g1"], domain="com.microsoft", name="gelu"),
          _ns(helper.make_node("MatMul", ["g1", "w2"], ["m2"], name="mlp_2"), "block.mlp.main.2: Linear"),
          helper.make_node("Add", ["h", "m2"], ["y"], name="residual_2"),
          _ns(helper.make_node("MatMul", ["side", "ws"], ["side_out"], name="small"), "block.proj_in: Linear")]
    f = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)  # noqa: E731
    inputs = [f("x", ["S", D]), f("side", ["S", 8])]
    if attention == "two_part":
        inputs += [f("past_k", ["P", D]), f("past_v", ["P", D])]
    graph = helper.make_graph(n, "block", inputs, [f("y", ["S", D]), f("side_out", ["S", D])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return model


def _feeds(attention: str, seed: int = 1):
    rng = np.random.default_rng(seed)
    feeds = {"x": rng.standard_normal((5, D)).astype(np.float32), "side": rng.standard_normal((5, 8)).astype(np.float32)}
    if attention == "two_part":
        feeds.update(past_k=rng.standard_normal((7, D)).astype(np.float32),
                     past_v=rng.standard_normal((7, D)).astype(np.float32))
    return feeds


def _amax(model, feeds) -> dict:
    """Max |x| of every tensor the inserter asks for, from one ORT run of the float graph."""
    names = activation_tensors(model, ())
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend([helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in names
                           if t not in {o.name for o in m.graph.output} and t not in feeds])
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    outs.update(feeds)
    return {t: float(np.abs(outs[t]).max()) for t in names}


@pytest.mark.parametrize("precision", ["fp8", "int8"])
@pytest.mark.parametrize("attention", ["two_part", "single"])
def test_placement_rules_per_layer(precision, attention):
    model = block_graph(attention)
    feeds = _feeds(attention)
    fmt = qformat(precision)
    info = insert_qdq(model, _amax(block_graph(attention), feeds), fmt, DEFAULT_EXCLUDE)
    layout = qdq_layout(model)
    weighted = {"q_proj", "k_proj", "v_proj", "o_proj", "mlp_0", "mlp_2"}
    attn = {"score_past", "score_new", "pv_past", "pv_new"} if attention == "two_part" else {"score", "pv"}
    # rule 1: weighted GEMMs have both inputs quantized; attention BMMs (excluded by default) and the small GEMM none
    assert set(layout) == weighted
    assert set(info["excluded_nodes"]) == attn | {"small"}
    for name in weighted:
        act, weight = layout[name][0], layout[name][1]
        assert act == {"weight": False, "axis": None, "type": None}                  # rule 2: per tensor
        assert weight["weight"] and weight["axis"] == 1 and weight["type"] == fmt.elem_type   # rule 3
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    # rule 1: Q/DQ only where a quantized GEMM reads: every DQ feeds GEMMs only, never a residual / bias add,
    # softmax, norm or a graph output (a GEMM output is quantized only as the next GEMM's input)
    outputs = {o.name for o in model.graph.output}
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear":
            assert consumers[n.output[0]] and all(c.name in weighted for c in consumers[n.output[0]])
            assert n.output[0] not in outputs
        if n.op_type in ("Add", "Softmax", "LayerNormalization", "Gelu"):
            assert all(producers.get(i) is None or producers[i].op_type != "DequantizeLinear" for i in n.input)
    # rule 2: one Q/DQ pair for ln, shared by q/k/v; unquantized consumers (none here) would keep the float tensor
    q_of_ln = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "ln"]
    assert len(q_of_ln) == 1
    # scales: per-tensor activation scale = amax / qmax; per-channel weight scale [N]
    scales = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    amax = _amax(block_graph(attention), feeds)
    assert scales["ln_scale"].shape == () and np.isclose(scales["ln_scale"], amax["ln"] / fmt.qmax)
    assert scales["w1_scale"].shape == (H,)
    # rule 6: FP8 needs opset 19 / IR 9; INT8 keeps the export's opset
    opset = next(o.version for o in model.opset_import if o.domain == "")
    assert (opset, model.ir_version >= 9) == ((19, True) if precision == "fp8" else (18, False))
    onnx.checker.check_model(model)


@pytest.mark.parametrize("attention", ["two_part", "single"])
def test_attention_bmms_quantized_when_included(attention):
    """Rule 5: with attention included, every BMM of either form gets per-tensor Q/DQ on both inputs."""
    model = block_graph(attention)
    feeds = _feeds(attention)
    insert_qdq(model, _amax(block_graph(attention), feeds), qformat("fp8"), exclude=())
    layout = qdq_layout(model)
    attn = {"score_past", "score_new", "pv_past", "pv_new"} if attention == "two_part" else {"score", "pv"}
    for name in attn:
        assert set(layout[name]) == {0, 1} and not layout[name][0]["weight"] and not layout[name][1]["weight"]
    assert "small" not in layout   # rule 4 holds regardless of the regexes
    ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("attention", ["two_part", "single"])
def test_fp8_attention_recipe_against_numpy(attention):
    """Rule 5 (``attention=True``, the default excludes kept): every attention BMM reads both inputs through
    a DQ; the probabilities at scale 1/448; one key scale and one value scale per layer (the two-part form's
    past and new parts share the concatenated tensor's); on ORT the attention output equals a numpy model
    of E4M3 rounding with those scales (the projections feeding it read from the same run)."""
    from starflow_trt.calibration.qdq import attention_bmms

    model = block_graph(attention)
    feeds = _feeds(attention)
    amax = _amax(block_graph(attention), feeds)
    assert [(a.scores, a.mix) for a in attention_bmms(model)] == (
        [(("score_new", "score_past"), ("pv_new", "pv_past"))] if attention == "two_part" else [(("score",), ("pv",))])
    info = insert_qdq(model, amax, qformat("fp8"), DEFAULT_EXCLUDE, weight_scale="tensor", attention=True)
    assert info["attention_layers"] == 1
    layout = qdq_layout(model)
    attn = {"score_past", "score_new", "pv_past", "pv_new"} if attention == "two_part" else {"score", "pv"}
    assert all(set(layout[b]) == {0, 1} for b in attn)
    scales = {i.name: float(numpy_helper.to_array(i)) for i in model.graph.initializer if i.name.endswith("_scale")}
    two = attention == "two_part"
    p_scales = {scales[f"{t}_scale"] for t in (("p_past", "p_new") if two else ("p",))}
    assert p_scales == {float(np.float32(1 / 448))}
    key_amax = max(amax["pkT"], amax["kT"]) if two else amax["kT"]
    assert {scales[f"{t}_scale"] for t in (("pkT", "kT") if two else ("kT",))} == {float(np.float32(key_amax / 448))}
    value_amax = max(float(np.abs(feeds["past_v"]).max()), amax["v"]) if two else amax["v"]
    assert {scales[f"{t}_scale"] for t in (("past_v", "v") if two else ("v",))} == \
        {float(np.float32(value_amax / 448))}
    wanted = ["q", "k", "v", "o"]
    model.graph.output.extend([helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in wanted])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    q, k, v, o = sess.run(wanted, feeds)
    keys = np.concatenate([feeds["past_k"], k]) if two else k
    values = np.concatenate([feeds["past_v"], v]) if two else v
    s = _e4m3(q, scales["q_scale"]) @ _e4m3(keys, np.float32(key_amax / 448)).T
    p = np.exp(s - s.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    want = _e4m3(p, np.float32(1 / 448)) @ _e4m3(values, np.float32(value_amax / 448))
    np.testing.assert_allclose(o, want, rtol=1e-4, atol=1e-5)


def _e4m3(x: np.ndarray, scale) -> np.ndarray:
    """Independent model of QuantizeLinear→DequantizeLinear to float8e4m3fn (saturating)."""
    return np.clip(x / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32) * scale


def test_fp8_graph_on_ort_cpu_matches_e4m3_rounding():
    """The gate's simulation: ORT's CPU EP runs the FP8 Q/DQ graph as exact E4M3 rounding of each quantized
    input with its scale, then FP32 GEMMs: equal to a numpy model of the same, and off the float graph by
    about E4M3's precision (not zero, not more)."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((D, H)).astype(np.float32)
    graph = helper.make_graph([_ns(helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"), "mlp: Linear")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["S", D])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["S", H])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    x = (rng.standard_normal((16, D)) * 3).astype(np.float32)
    amax = float(np.abs(x).max())
    insert_qdq(model, {"x": amax}, qformat("fp8"), DEFAULT_EXCLUDE)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    wscale = (np.abs(w).max(axis=0) / 448).astype(np.float32)[None, :]
    for feed in (x, 4 * x):   # 4x: past amax, saturate=1 must clamp to ±448, not give NaN
        got = sess.run(None, {"x": feed})[0]
        want = _e4m3(feed, np.float32(amax / 448)) @ _e4m3(w, wscale)
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    got = sess.run(None, {"x": x})[0]
    rel = np.linalg.norm(got - x @ w) / np.linalg.norm(x @ w)
    assert 0.005 < rel < 0.08   # E4M3: 3 mantissa bits on both inputs


def test_small_gemm_threshold_is_modelopts():
    assert MIN_GEMM_DIM == 16


def test_precision_policy_and_builder_flags_for_fp8():
    from starflow_trt.calibration.policy import builder_flags, graph_precision
    from starflow_trt.errors import StarflowError

    flow, text, vae = "step", "text_encoder", "vae_decode_first"
    assert graph_precision(flow, "fp8").precision == "fp8"
    assert graph_precision(flow, "fp8", called=False).precision == "fp32"
    assert graph_precision(text, "fp8").precision == "fp32"     # T5 stays FP32
    assert graph_precision(vae, "fp8").precision == "fp16"      # the VAE FP16
    assert builder_flags(flow, "fp8", weakly_typed=False) == []              # strongly typed: from the ONNX
    assert builder_flags(flow, "fp8", weakly_typed=True) == ["FP16", "FP8"]
    assert builder_flags(flow, "int8", weakly_typed=True) == ["FP16", "INT8"]
    with pytest.raises(StarflowError, match="must not be fp8"):
        builder_flags(text, "fp8", weakly_typed=False)


def test_fp8_gate_and_verify_tolerance():
    from starflow_trt.calibration.calibrate import default_gate
    from starflow_trt.verify import default_tolerance

    gate = default_gate("fp8")
    assert (gate.max_bpd_increase, gate.min_psnr_db) == (0.002, 35.0)
    assert default_tolerance("fp8") == gate.max_graph_error < default_tolerance("int8") + 0.1


def test_kv_fp8_rounds_what_is_written_not_what_is_scored():
    """--kv-dtype fp8: the new_k output (written to the cache) is E4M3-rounded with amax/448; the same step's
    attention still reads the unrounded K."""
    from starflow_trt.calibration.qdq import kv_outputs, quantize_kv_writes

    rng = np.random.default_rng(5)
    w = rng.standard_normal((D, D)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["new_k_0"], name="k_proj"),
             helper.make_node("Transpose", ["new_k_0"], ["kT"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "kT"], ["scores"], name="score")]
    f = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)  # noqa: E731
    model = helper.make_model(helper.make_graph(nodes, "g", [f("x", ["S", D])], [f("scores", ["S", "S"]),
                                                                                  f("new_k_0", ["S", D])],
                                                [numpy_helper.from_array(w, "w")]),
                              opset_imports=[helper.make_opsetid("", 18)])
    x = rng.standard_normal((6, D)).astype(np.float32)
    k = x @ w
    assert kv_outputs(model) == ["new_k_0"]
    assert quantize_kv_writes(model, {"new_k_0": float(np.abs(k).max())}, qformat("fp8")) == ["new_k_0"]
    onnx.checker.check_model(model)
    scores, new_k = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})
    np.testing.assert_allclose(new_k, _e4m3(k, np.float32(np.abs(k).max() / 448)), rtol=1e-6, atol=1e-6)
    assert not np.allclose(new_k, k, rtol=1e-4)
    np.testing.assert_allclose(scores, x @ k.T, rtol=1e-4, atol=1e-4)


def test_the_policy_table_names_registered_kinds():
    from starflow_trt.calibration.policy import KIND_POLICIES
    from starflow_trt.export.registry import graph_kinds

    registered = {k.kind for k in graph_kinds()}
    assert set(KIND_POLICIES) <= registered and {"text_encoder", "vae_decode_step"} <= set(KIND_POLICIES)


# ------------------------------------------------------------------ issue 30: a 16-bit body (--high-precision-dtype)
def _casts_beside_qdq(model) -> list[str]:
    """Cast-to-FP32 nodes that read a DequantizeLinear output or feed a QuantizeLinear."""
    producers = {o: n for n in model.graph.node for o in n.output}
    q_inputs = {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
    out = []
    for n in model.graph.node:
        to = next((a.i for a in n.attribute if a.name == "to"), None)
        if n.op_type == "Cast" and to == TensorProto.FLOAT:
            src = producers.get(n.input[0])
            if (src is not None and src.op_type == "DequantizeLinear") or n.output[0] in q_inputs:
                out.append(n.name)
    return out


def _fp16_block(tmp_path):
    """(the single-attention block as the exporter writes it: every node named, ONNX-domain ops; its FP16
    conversion), the FP32 graph saved as ``f32.onnx``."""
    from starflow_trt.calibration.fp16 import convert_fp16

    model = block_graph("single")
    for i, node in enumerate(model.graph.node):
        node.name = node.name or f"{node.op_type}_{i}"
        if node.op_type == "Gelu":
            node.op_type, node.domain = "Relu", ""
    onnx.save(model, str(tmp_path / "f32.onnx"))
    convert_fp16(tmp_path / "f32.onnx", tmp_path / "f16.onnx", modules=("block",))
    return model, onnx.load(str(tmp_path / "f16.onnx"))


@pytest.mark.parametrize("precision,weight_scale", [("fp8", "tensor"), ("fp8", "channel"), ("int8", "tensor")])
def test_fp16_body_qdq(tmp_path, precision, weight_scale):
    """FP16 body: every quantized GEMM reads FP16 behind its DQ, scales are FP16 (opset 19), no Cast to FP32 sits
    beside a Q/DQ, FP8 weights per tensor by default (INT8 stays per channel); on ORT's CPU EP the graph computes
    the FP32-body Q/DQ graph's outputs up to FP16 rounding."""
    from starflow_trt.export.dtypes import elem_types

    model, body = _fp16_block(tmp_path)
    fmt = qformat(precision)
    amax = _amax(model, _feeds("single"))
    info = insert_qdq(body, amax, fmt, DEFAULT_EXCLUDE, weight_scale)
    ref = onnx.load(str(tmp_path / "f32.onnx"))
    insert_qdq(ref, amax, fmt, DEFAULT_EXCLUDE, weight_scale)
    assert info["quantized_nodes"] == len(qdq_layout(body)) > 0
    assert next(o.version for o in body.opset_import if o.domain == "") == 19
    types = elem_types(body)
    inits = {i.name: i for i in body.graph.initializer}
    producers = {o: n for n in body.graph.node for o in n.output}
    per_tensor = precision == "fp8" and weight_scale == "tensor"
    for name, entry in qdq_layout(body).items():
        node = next(n for n in body.graph.node if n.name == name)
        assert [types[i] for i in node.input[:2]] == [TensorProto.FLOAT16] * 2, name   # 16-bit behind the DQ
        for i in (0, 1):
            dq = producers[node.input[i]]
            assert inits[dq.input[1]].data_type == TensorProto.FLOAT16   # the scale in the body dtype
        assert (entry[1]["axis"] is None) == per_tensor and (list(inits[producers[node.input[1]].input[1]].dims)
                                                             == ([] if per_tensor else [inits[
                                                                 producers[node.input[1]].input[0]].dims[-1]]))
    assert _casts_beside_qdq(body) == []
    assert info["DequantizeLinear"] == info["QuantizeLinear"] + info["quantized_nodes"]   # + one DQ a weight
    feeds = _feeds("single", seed=3)

    def run(m, optimize: bool):
        options = ort.SessionOptions()
        options.add_session_config_entry("session.x64quantprecision", "1")   # exact int8 GEMMs on AVX2
        if not optimize:   # the reference: the ONNX ops as written (with ORT 1.32's graph optimisations on, this
            # FP32-body FP8 graph's output moves ~70 % from it, weights per tensor or per channel alike)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        return ort.InferenceSession(m.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)

    for got, want in zip(run(body, True), run(ref, False)):
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < (0.05 if precision == "fp8" else 0.02)


@pytest.mark.parametrize("precision", ["fp8", "int8"])
def test_bf16_body_qdq_and_its_simulation(tmp_path, precision):
    """BF16 body (:mod:`starflow_trt.calibration.bf16`): the FP16 conversion retyped, every quantized GEMM reads
    BF16 behind its DQ with BF16 scales (opset 19), no Cast to FP32 beside a Q/DQ, the graph valid ONNX. ORT's
    CPU EP refuses it; its simulation runs and computes the FP32-body Q/DQ graph's outputs up to BF16 rounding."""
    from starflow_trt.calibration.bf16 import simulate, to_bfloat16
    from starflow_trt.export.dtypes import elem_types

    model, body = _fp16_block(tmp_path)
    to_bfloat16(body, model)
    amax = _amax(model, _feeds("single"))
    info = insert_qdq(body, amax, qformat(precision), DEFAULT_EXCLUDE, "tensor")
    ref = onnx.load(str(tmp_path / "f32.onnx"))
    insert_qdq(ref, amax, qformat(precision), DEFAULT_EXCLUDE, "tensor")
    onnx.checker.check_model(body, full_check=True)
    assert next(o.version for o in body.opset_import if o.domain == "") == 19
    types = elem_types(body)
    inits = {i.name: i for i in body.graph.initializer}
    producers = {o: n for n in body.graph.node for o in n.output}
    assert info["quantized_nodes"] == len(qdq_layout(body)) > 0
    for name in qdq_layout(body):
        node = next(n for n in body.graph.node if n.name == name)
        assert [types[i] for i in node.input[:2]] == [TensorProto.BFLOAT16] * 2, name
        assert {inits[producers[i].input[1]].data_type for i in node.input[:2]} == {TensorProto.BFLOAT16}
    assert TensorProto.FLOAT16 not in types.values() and _casts_beside_qdq(body) == []
    with pytest.raises(Exception, match="NOT_IMPLEMENTED|Could not find an implementation"):
        ort.InferenceSession(body.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = _feeds("single", seed=3)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.x64quantprecision", "1")
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    got = ort.InferenceSession(simulate(body).SerializeToString(), options,
                               providers=["CPUExecutionProvider"]).run(None, feeds)
    want = ort.InferenceSession(ref.SerializeToString(), plain, providers=["CPUExecutionProvider"]).run(None, feeds)
    for g, w in zip(got, want):
        assert 1e-4 < np.linalg.norm(g - w) / np.linalg.norm(w) < 0.05   # BF16's 8 bits: rounded, not more


def test_bf16_simulation_rounds_each_bf16_tensor_where_it_is_produced():
    """simulate(): y = Cast_fp32(MatMul(Cast_bf16(x), W_bf16)) runs on ORT as bf16(bf16(x) @ W) (numpy)."""
    from starflow_trt.calibration.bf16 import simulate

    rng = np.random.default_rng(7)
    w = rng.standard_normal((D, H)).astype(ml_dtypes.bfloat16)
    nodes = [helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16),
             helper.make_node("MatMul", ["xb", "w"], ["yb"]),
             helper.make_node("Cast", ["yb"], ["y"], to=TensorProto.FLOAT)]
    f = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)  # noqa: E731
    model = helper.make_model(helper.make_graph(nodes, "g", [f("x", ["S", D])], [f("y", ["S", H])],
                                                [numpy_helper.from_array(w, "w")]),
                              opset_imports=[helper.make_opsetid("", 19)])
    x = rng.standard_normal((5, D)).astype(np.float32)
    got = ort.InferenceSession(simulate(model).SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]
    want = (x.astype(ml_dtypes.bfloat16).astype(np.float32) @ w.astype(np.float32)).astype(ml_dtypes.bfloat16)
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-2)   # one bf16 ulp: the sum's order
    assert np.mean(got == want.astype(np.float32)) > 0.9


def test_dry_run_names_what_per_channel_fp8_weights_need():
    from types import SimpleNamespace

    from starflow_trt.engine.build import qdq_plan

    def plan(weight_scale):
        conv = {"placement": "trt", "format": "float8e4m3fn", "opset": 19, "body": "fp16", "weight_scale": weight_scale}
        return qdq_plan(SimpleNamespace(precision="fp8", extra={"conversion": conv}))

    assert "9.0" in plan("channel")["requires"] and "10.6" in plan("channel")["requires"]
    assert "8.9" in plan("tensor")["requires"] and "10.6" not in plan("tensor")["requires"]
    assert plan("tensor")["qdq"]["body"] == "fp16" and plan("channel")["qdq"]["weight_scale"] == "channel"
