"""Q/DQ placed as TensorRT's explicit quantization fuses it: INT8 and FP8 (E4M3), one inserter, and the
driver of placement "trt" (:func:`quantize_graph_trt`: calibrate a graph, place its Q/DQ, write it).

Placement rules (``placement="trt"``), each with its source:

1. Quantize the *inputs* of weighted ops (MatMul, Gemm) and nothing else: no Q/DQ on their outputs, biases,
   norms, softmax, residual adds. TensorRT, "Q/DQ Layer-Placement Recommendations" (Explicit Quantization,
   docs.nvidia.com/deeplearning/tensorrt/latest/inference-library/quantized-types-explicit-quantization.html):
   quantize all inputs of weighted operations, do not quantize their outputs by default; TensorRT then fuses
   DQ→GEMM (and a following bias/element-wise add) into one quantized kernel. Model Optimizer's ONNX quantizer
   does the same: ``OpTypesToExcludeOutputQuantization`` = every op type, ``QuantizeBias: False``
   (modelopt/onnx/quantization/ort_utils.py ``configure_ort``). Residual adds get Q/DQ there only inside a
   Conv partition (``build_non_residual_input_map``: Conv→Add); these graphs have no Conv, so none here.
2. Activations: one per-tensor, symmetric scale (zero point 0): ``amax / 127`` (INT8), ``amax / 448`` (E4M3),
   amax from the captured activations (max |x|, or a percentile). TensorRT supports only symmetric, per-tensor
   activation quantization (same page, "Quantized Types"). One Q/DQ pair per tensor, shared by all the
   quantized consumers (modelopt: ``DedicatedQDQPair: False``); unquantized consumers keep the float tensor.
3. Weights: symmetric, INT8 per output channel (``amax_c / 127``), FP8 per tensor by default (``amax / 448``,
   one scalar scale: FP8 GEMMs on Ada and Hopper) or per output channel (``weight_scale="channel"``: TensorRT
   documents per-channel FP8 GEMMs on Hopper, sm_90, from 10.6 only), stored quantized (INT8 or
   float8e4m3fn initializers) behind a ``DequantizeLinear`` (``axis`` = output axis when per channel): TensorRT accepts pre-quantized
   weights when "an IDequantizeLayer is required between the weights and the linear operator" (same page,
   "Quantized Weights"). MatMul B ``[.., K, N]``: axis = last; Gemm B: axis 0 with ``transB`` else 1.
   (modelopt stores float weights with a Q→DQ pair instead, ``AddQDQPairToWeight``: equivalent after
   TensorRT's constant folding; quantized initializers are 4× smaller on disk.)
4. Small GEMMs stay in float: a weight whose K or N is below 16 (modelopt ``find_nodes_from_matmul_to_exclude``:
   "INT8 and FP8 Tensor Core kernels need K/N >= 16"). Its other rule, M or N == 1 (GEMV), is shape-dependent;
   the step graphs have dynamic S (S = 1 decode and S = 64 Jacobi chunks share one engine), so it is not applied.
5. Attention BMMs (both inputs activations): kept in float by default (``DEFAULT_EXCLUDE``). FP8 attention
   (``attention=True``, ``calibrate --quantize-attention``) quantizes them as NVIDIA's FP8 fused-MHA pattern
   has it: Q → DQ → BMM1 → (Mul/Div) → (Add) → Softmax → (Cast) → Q → DQ → BMM2 (Model Optimizer,
   ``modelopt/onnx/quantization/graph_utils.py`` ``match_fp8_mha_pattern``; its FP8 MHA recipe, Model-Optimizer
   PR #1289: the attention scale on the Q side so a DQ feeds each BMM directly, the softmax output at a fixed
   1/448 scale). Per layer (:func:`attention_bmms`): the query, every key part and every value part get one
   per-tensor scale each (a part of the portable form, past or new, takes the scale of the concatenated
   tensor the fused form quantizes), the probabilities amax 1 (scale 1/448: a softmax output is in [0, 1]).
   The fused form (``.trt.onnx``) scales Q before BMM1 as TensorRT requires ("Fused Attention": Q or K
   multiplied by the attention scale before the first BMM), so its Q/DQ sits between that Mul and BMM1; the
   portable two-part form scales the scores after its two BMM1s, and since E4M3 rounding of ``x / s`` commutes
   with a constant factor on ``x`` and ``s``, its Q/DQ on the unscaled query rounds the same values (the parity
   check between the two forms measures it). TensorRT fuses FP8 MHA on Ada from 10.6 for S <= 3072 and head
   size <= 64, larger from 10.7 (release notes); modelopt keeps it for 8 < head size <= 256.
6. FP8 graphs are opset >= 19 (QuantizeLinear/DequantizeLinear with float8e4m3fn, ``saturate=1``: values past
   amax clamp to ±448 instead of overflowing to NaN) and IR version >= 9.
7. Body dtype (``body``, ``calibrate --high-precision-dtype``): ``"fp16"`` converts the graph to FP16 first
   (:func:`~.fp16.convert_fp16`: FP32 only in its named islands) and then places the Q/DQ on the FP16 GEMM
   inputs with FP16 scales (opset >= 19 lets a Q/DQ scale have the input's type), so each GEMM reads FP16
   behind its DQ and no Cast to FP32 sits beside a Q/DQ pair: a strongly typed TensorRT network (TensorRT 11's
   only kind) runs exactly the ONNX types, so an FP32 body would run every norm, softmax and add in FP32 and
   dequantize GEMM inputs to FP32. Model Optimizer's ONNX quantizer does the same by default
   (``high_precision_dtype='fp16'``, Casts around Q/DQ folded, FP16 scales at opset >= 19: NVIDIA Model-Optimizer
   PR #1289). ``"bf16"``: the same FP16 conversion retyped to BF16 (:mod:`.bf16`: BF16 scales, FP32's range with
   8 mantissa bits); ORT's CPU EP cannot run it, so the gate runs its FP32 simulation. ``"fp32"``: the graph's
   own FP32 body (what ``--placement ort`` writes).

What ONNX Runtime's CPU EP runs from these graphs (the quality gate): DequantizeLinear(QuantizeLinear(x)) in
the body dtype, i.e. the exact E4M3 / INT8 rounding of every quantized input with the chosen scales, then the
GEMM; an FP16 body runs in FP16 on ORT's CPU kernels (FP16 MatMul / elementwise ops, each rounded to FP16).
It does not represent TensorRT's kernels: their accumulation order and precision (FP8 GEMMs accumulate in FP32
on Hopper, outputs may be FP16), the ops TensorRT fuses or runs in FP16 around them, or its tactic choices.
"""

from __future__ import annotations

import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from ..export.dtypes import elem_types
from .capture import Call, iter_feeds
from .bf16 import convert_bf16
from .fp16 import FP16_MODULES, convert_fp16
from .int8 import DEFAULT_EXCLUDE, calibrate_ranges, load_ranges, select_nodes

#: ``calibrate --high-precision-dtype``: the dtype of a Q/DQ graph's body (rule 7)
BODY_DTYPES = ("fp16", "bf16", "fp32")
#: how FP8 weights are scaled (rule 3): "tensor" (default; Ada and Hopper) or "channel" (sm_90, TensorRT >= 10.6)
WEIGHT_SCALES = ("tensor", "channel")


@dataclass(frozen=True)
class QFormat:
    """One quantized type: ONNX element type, largest representable magnitude, minimum opset."""

    name: str          # recorded in the manifest
    elem_type: int     # onnx.TensorProto enum
    qmax: float
    min_opset: int


def qformat(precision: str) -> QFormat:
    """``"int8"`` or ``"fp8"`` (E4M3, finite-only: float8e4m3fn)."""
    from onnx import TensorProto

    if precision == "int8":
        return QFormat("int8", TensorProto.INT8, 127.0, 13)
    if precision == "fp8":
        return QFormat("float8e4m3fn", TensorProto.FLOAT8E4M3FN, 448.0, 19)
    raise ValueError(f"no Q/DQ format for precision {precision!r} (int8 or fp8)")


#: modelopt's smallest K / N for a quantized GEMM (rule 4)
MIN_GEMM_DIM = 16


@dataclass(frozen=True)
class Site:
    """One quantized input: ``node`` reads ``tensor`` at ``index``; ``axis`` is the weight's channel axis
    (None: an activation, per tensor)."""

    node: str
    index: int
    tensor: str
    axis: Optional[int]


@dataclass(frozen=True)
class AttentionBmms:
    """One attention layer's batched MatMuls around its Softmax: ``scores`` compute Q·Kᵀ (input 0 the query,
    input 1 the keys), ``mix`` compute P·V (input 0 the probabilities, input 1 the values). The fused form has
    one of each; the portable two-part form two of each (past and new)."""

    softmax: str
    scores: tuple[str, ...]
    mix: tuple[str, ...]


#: ops between an attention BMM1 and its Softmax (scale, mask, the two-part form's Concat, precision casts)
_SCORE_OPS = ("Mul", "Div", "Add", "Concat", "Cast")
#: ops between a Softmax and its BMM2 (the two-part form's Slices or Split, precision casts, rule 5's own Q/DQ)
_PROB_OPS = ("Slice", "Split", "Cast", "QuantizeLinear", "DequantizeLinear")


def attention_bmms(model) -> list[AttentionBmms]:
    """The attention BMMs of ``model`` per Softmax: MatMuls with two activation inputs reached upstream of
    the Softmax through :data:`_SCORE_OPS` and downstream (as input 0) through :data:`_PROB_OPS`."""
    graph = model.graph
    weights = {i.name for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def bmm(node) -> bool:
        return node.op_type == "MatMul" and not set(node.input[:2]) & weights

    layers = []
    for softmax in (n for n in graph.node if n.op_type == "Softmax"):
        scores, stack = [], [softmax.input[0]]
        while stack:
            node = producers.get(stack.pop())
            if node is None:
                continue
            if bmm(node):
                scores.append(node.name)
            elif node.op_type in _SCORE_OPS:
                stack.extend(node.input)
        mix, stack = [], [softmax.output[0]]
        while stack:
            name = stack.pop()
            for node in consumers.get(name, []):
                if bmm(node) and node.input[0] == name:
                    mix.append(node.name)
                elif node.op_type in _PROB_OPS:
                    stack.extend(node.output)
        if scores and mix:
            layers.append(AttentionBmms(softmax.name, tuple(sorted(scores)), tuple(sorted(mix))))
    return layers


def plan_sites(model, exclude: Sequence[str], attention: Sequence[AttentionBmms] = ()
               ) -> tuple[list[Site], list[str], list[str]]:
    """(sites to quantize, quantized MatMul/Gemm names, excluded MatMul/Gemm names) under rules 1-5.

    A node is excluded when its name or module path (``namespace`` metadata) matches a regex of ``exclude``
    or its weight is a small GEMM (rule 4); the BMMs of ``attention`` (:func:`attention_bmms`) are quantized
    whatever ``exclude`` says (rule 5)."""
    selected = set(select_nodes(model, exclude)[0])   # the module-path / name regexes
    selected |= {name for layer in attention for name in (*layer.scores, *layer.mix)}
    weights = {i.name: i for i in model.graph.initializer}
    sites, keep, skip = [], [], []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        w = weights.get(node.input[1])
        small = w is not None and len(w.dims) >= 2 and min(w.dims[-2:]) < MIN_GEMM_DIM
        if small or node.name not in selected or node.input[0] in weights:
            skip.append(node.name)
            continue
        keep.append(node.name)
        sites.append(Site(node.name, 0, node.input[0], None))
        if w is None:   # an attention BMM: both inputs are activations
            sites.append(Site(node.name, 1, node.input[1], None))
        else:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = (0 if trans_b else 1) if node.op_type == "Gemm" else len(w.dims) - 1
            sites.append(Site(node.name, 1, node.input[1], axis))
    return sites, keep, skip


def attention_amax(model, layers: Sequence[AttentionBmms], amax: Mapping[str, float]) -> dict[str, float]:
    """The amax of every input of the attention BMMs ``layers`` under rule 5: per layer the largest over the
    query / key / value parts, 1.0 for the probabilities (scale ``1 / qmax``: 1/448 in E4M3)."""
    nodes = {n.name: n for n in model.graph.node}
    out = {}
    for layer in layers:
        for group, index in ((layer.scores, 0), (layer.scores, 1), (layer.mix, 1)):
            names = {nodes[b].input[index] for b in group}
            known = [float(amax[t]) for t in names if t in amax and math.isfinite(float(amax[t]))]
            if known:
                out.update(dict.fromkeys(names, max(known)))
        out.update(dict.fromkeys((nodes[b].input[0] for b in layer.mix), 1.0))
    return out


def activation_tensors(model, exclude: Sequence[str], attention: bool = False) -> list[str]:
    """The activation tensors :func:`insert_qdq` needs an amax for (calibrate these)."""
    layers = attention_bmms(model) if attention else ()
    return sorted({s.tensor for s in plan_sites(model, exclude, layers)[0] if s.axis is None})


def quantize_weight(w: np.ndarray, axis: Optional[int], fmt: QFormat,
                    scale_dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """(quantized weight, scale) of a float weight, symmetric: per channel along ``axis`` (scale [C]) or per
    tensor (``axis=None``, scalar scale). ``scale_dtype``: the body's float type (the scale is rounded to it
    first, so the stored weight matches the scale TensorRT and ORT read).

    INT8: round-half-even, clamp to ±127. FP8: round to nearest E4M3 (ml_dtypes), clamp to ±448."""
    w = w.astype(np.float32)
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w).max(axis=reduce).astype(np.float32)
    scale = _scale(np.where(amax > 0, amax / fmt.qmax, 1.0), scale_dtype)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    x = np.clip(w / scale.astype(np.float32).reshape(shape), -fmt.qmax, fmt.qmax)
    if fmt.name == "int8":
        return np.round(x).astype(np.int8), scale
    import ml_dtypes

    return x.astype(ml_dtypes.float8_e4m3fn), scale


def _scale(value, dtype: type) -> np.ndarray:
    """``value`` as a scale of ``dtype``, never rounded to 0 (an FP16 scale of a near-zero amax)."""
    import ml_dtypes

    return np.maximum(np.asarray(value, np.float32), float(ml_dtypes.finfo(dtype).tiny)).astype(dtype)


def _body_dtype(elem_type: Optional[int]) -> type:
    """The numpy type of a Q/DQ scale for a tensor of ONNX type ``elem_type`` (FP32 unless a 16-bit body)."""
    import ml_dtypes
    from onnx import TensorProto

    return {TensorProto.FLOAT16: np.float16, TensorProto.BFLOAT16: ml_dtypes.bfloat16}.get(elem_type, np.float32)


def _tensor(name: str, array: np.ndarray, fmt: Optional[QFormat] = None):
    from onnx import helper, numpy_helper

    if fmt is None or fmt.name == "int8":
        return numpy_helper.from_array(array, name)
    return helper.make_tensor(name, fmt.elem_type, list(array.shape), array.view(np.uint8).tobytes(), raw=True)


def insert_qdq(model, amax: Mapping[str, float], fmt: QFormat, exclude: Sequence[str],
               weight_scale: str = "channel", attention: bool = False) -> dict:
    """Insert Q/DQ into ``model`` (in place) by rules 1-7; ``amax``: activation tensor → max |x| (calibrated on
    the FP32 graph: a tensor the FP16 conversion re-typed through a Cast takes its source's amax).
    ``weight_scale``: "channel" or "tensor" (rule 3); ``attention``: quantize the attention BMMs by rule 5.
    Scales have the type of the tensor they quantize.

    Returns what was done: quantized / excluded node names, Q and DQ counts, the activation scales."""
    from onnx import helper

    layers = attention_bmms(model) if attention else []
    sites, keep, skip = plan_sites(model, exclude, layers)
    producers = {o: n for n in model.graph.node for o in n.output}
    amax = dict(amax)
    for site in sites:   # the FP16 body: Cast(x) feeds the GEMM where the FP32 graph read x itself
        source = producers.get(site.tensor)
        if site.tensor not in amax and source is not None and source.op_type == "Cast" and source.input[0] in amax:
            amax[site.tensor] = amax[source.input[0]]
    amax.update(attention_amax(model, layers, amax))
    missing = sorted({s.tensor for s in sites if s.axis is None} - set(amax))
    if missing:
        raise ValueError(f"no calibrated amax for activation(s) {', '.join(missing[:5])}")
    types = elem_types(model)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    new_nodes, done, scales, stems = [], {}, {}, set()
    for site in sites:
        if site.tensor not in done:
            stem = re.sub(r"[^A-Za-z0-9_]", "_", site.tensor)
            while stem in stems:   # two names that sanitise alike
                stem += "_"
            stems.add(stem)
            dtype = _body_dtype(types.get(site.tensor))
            if site.axis is None:   # activation: Q→DQ, per tensor
                scale = _scale(max(float(amax[site.tensor]), 1e-12) / fmt.qmax, dtype)
                zero = np.zeros((), np.int8) if fmt.name == "int8" else np.zeros((), np.uint8).view(_fp8())
                graph.initializer.extend([_tensor(f"{stem}_scale", np.array(scale)),
                                          _tensor(f"{stem}_zero", zero, fmt)])
                q_attrs = {"saturate": 1} if fmt.name != "int8" else {}
                new_nodes += [helper.make_node("QuantizeLinear", [site.tensor, f"{stem}_scale", f"{stem}_zero"],
                                               [f"{stem}_q"], name=f"{stem}_QuantizeLinear", **q_attrs),
                              helper.make_node("DequantizeLinear", [f"{stem}_q", f"{stem}_scale", f"{stem}_zero"],
                                               [f"{stem}_dq"], name=f"{stem}_DequantizeLinear")]
                scales[site.tensor] = float(scale)
            else:                   # weight: quantized initializer → DQ, per output channel
                from onnx import numpy_helper

                axis = None if fmt.name != "int8" and weight_scale == "tensor" else site.axis
                wq, wscale = quantize_weight(numpy_helper.to_array(inits[site.tensor]), axis, fmt, dtype)
                # an explicit zero point of the scale's shape: ORT's S8→U8 weight rewrite (x86 without VNNI) gives
                # a per-axis DQ without one a scalar zero point, which its own kernel then refuses
                wzero = np.zeros(wscale.shape, np.int8) if fmt.name == "int8" else \
                    np.zeros(wscale.shape, np.uint8).view(_fp8())
                graph.initializer.extend([_tensor(f"{stem}_quantized", wq, fmt), _tensor(f"{stem}_scale", wscale),
                                          _tensor(f"{stem}_zero", wzero, fmt)])
                new_nodes.append(helper.make_node("DequantizeLinear",
                                                  [f"{stem}_quantized", f"{stem}_scale", f"{stem}_zero"],
                                                  [f"{stem}_dq"], name=f"{stem}_DequantizeLinear",
                                                  **({"axis": axis} if axis is not None else {})))
            done[site.tensor] = f"{stem}_dq"
        nodes[site.node].input[site.index] = done[site.tensor]
    _toposort(graph, new_nodes)   # each Q/DQ right where its input is ready
    _drop_unused_initializers(graph)
    _set_opset(model, max(fmt.min_opset, 19 if half_scales(graph) else 0))
    counts = {op: sum(n.op_type == op for n in graph.node) for op in ("QuantizeLinear", "DequantizeLinear")}
    out = {"quantized_nodes": len(keep), "excluded_nodes": skip, **counts, "activation_scales": len(scales)}
    if attention:
        out["attention_layers"] = len(layers)
    return out


def half_scales(graph) -> bool:
    """Whether a Q/DQ of ``graph`` has an FP16 or BF16 scale (opset >= 19: before it, scales are FP32 only)."""
    from onnx import TensorProto

    inits = {i.name: i.data_type for i in graph.initializer}
    return any(inits.get(n.input[1]) in (TensorProto.FLOAT16, TensorProto.BFLOAT16)
               for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))


def _fp8():
    import ml_dtypes

    return ml_dtypes.float8_e4m3fn


def _drop_unused_initializers(graph) -> None:
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [i for i in graph.initializer if i.name in used]   # the float weights now quantized are gone
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _toposort(graph, extra) -> None:
    """Put each node of ``extra`` (Q/DQ chains) right after the node producing its input; ``graph.node`` is
    already topologically ordered."""
    waiting: dict[str, list] = {}
    for node in extra:
        waiting.setdefault(node.input[0], []).append(node)
    ordered = []

    def emit(node) -> None:
        ordered.append(node)
        for out in node.output:
            for follower in waiting.pop(out, []):
                emit(follower)

    for name in [i.name for i in graph.input] + [i.name for i in graph.initializer]:
        for follower in waiting.pop(name, []):
            emit(follower)
    for node in list(graph.node):
        emit(node)
    if waiting:
        raise ValueError(f"Q/DQ inputs never produced: {', '.join(sorted(waiting)[:5])}")
    del graph.node[:]
    graph.node.extend(ordered)


def _set_opset(model, minimum: int) -> None:
    """Raise the default-domain opset to ``minimum`` (18 → 19 changes no semantics of the ops these graphs
    use for float types; 19 adds float8 to Q/DQ, Cast, Reshape …) and the IR version to what it needs."""
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version < minimum:
            op.version = minimum
    if minimum >= 19:
        model.ir_version = max(model.ir_version, 9)


def qdq_layout(model) -> dict:
    """Per quantized MatMul/Gemm: which inputs come through DequantizeLinear and how ("tensor" or the
    channel axis). The structural tests and ``build --dry-run`` read it."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        entry = {}
        for idx, name in enumerate(node.input[:2]):
            dq = producers.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            axis = next((a.i for a in dq.attribute if a.name == "axis"), None)
            src = inits.get(dq.input[0])
            entry[idx] = {"weight": src is not None, "axis": axis if src is not None else None,
                          "type": src.data_type if src is not None else None}
        if entry:
            out[node.name] = entry
    return out


# ------------------------------------------------------------------------ --kv-dtype fp8
def kv_outputs(model) -> list[str]:
    """The K/V a graph writes to the cache: its ``new_k_l`` / ``new_v_l`` outputs [S, batch, heads, head_dim]."""
    from ..export.names import NEW

    return [o.name for o in model.graph.output if o.name.startswith((f"{NEW}_k_", f"{NEW}_v_"))]


def output_amax(path, calls, names: Sequence[str]) -> dict[str, float]:
    """Max |x| of the graph outputs ``names`` over ``calls`` (ORT CPU)."""
    import onnxruntime as ort

    from ..runtime.backends.ort_backend import session_options

    sess = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
    inputs = [i.name for i in sess.get_inputs()]
    amax = {n: 0.0 for n in names}
    for feeds in iter_feeds(calls, inputs):
        for n, v in zip(names, sess.run(list(names), feeds)):
            amax[n] = max(amax[n], float(np.abs(v).max()) if v.size else 0.0)
    return amax


def quantize_kv_writes(model, amax: Mapping[str, float], fmt: QFormat) -> list[str]:
    """``--kv-dtype fp8``: every K/V output goes through Q→DQ (per tensor, ``amax / qmax``, saturating) before
    it is written, so the cache holds E4M3 values and later calls read them dequantized (in place; returns the
    outputs changed). The step's own new K/V are scored unrounded: they are read before they are written.
    On ORT the cache array stays FP32 (the values are what an FP8 cache would hold; the memory is not saved);
    an FP8 cache in memory needs FP8 graph I/O, which this export does not have."""
    from onnx import helper

    graph = model.graph
    changed = []
    for name in kv_outputs(model):
        inner = f"{name}__unquantized"
        for node in graph.node:
            node.output[:] = [inner if o == name else o for o in node.output]
            node.input[:] = [inner if i == name else i for i in node.input]
        scale = np.float32(max(float(amax[name]), 1e-12) / fmt.qmax)
        zero = np.zeros((), np.int8) if fmt.name == "int8" else np.zeros((), np.uint8).view(_fp8())
        graph.initializer.extend([_tensor(f"{name}_kv_scale", np.array(scale)), _tensor(f"{name}_kv_zero", zero, fmt)])
        attrs = {"saturate": 1} if fmt.name != "int8" else {}
        graph.node.extend([helper.make_node("QuantizeLinear", [inner, f"{name}_kv_scale", f"{name}_kv_zero"],
                                            [f"{name}_kv_q"], name=f"{name}_kv_QuantizeLinear", **attrs),
                           helper.make_node("DequantizeLinear", [f"{name}_kv_q", f"{name}_kv_scale", f"{name}_kv_zero"],
                                            [name], name=f"{name}_kv_DequantizeLinear")])
        changed.append(name)
    _set_opset(model, fmt.min_opset)
    return changed


# ------------------------------------------------------------------------ the driver
def quantize_graph_trt(src: Path, dst: Path, calls: Sequence[Call], precision: str = "int8",
                       method: str = "minmax", exclude: Sequence[str] = DEFAULT_EXCLUDE, percentile: float = 99.99,
                       ranges_path: Optional[Path] = None, kv_fp8: bool = False, body: str = "fp32",
                       weight_scale: str = "channel", fp16_modules: Sequence[str] = FP16_MODULES,
                       attention: bool = False) -> dict:
    """Write ``src`` with INT8 or FP8 Q/DQ placed by TensorRT's rules (rules 1-7, placement "trt") to ``dst``.

    Activation amax from ORT's symmetric calibrator over ``calls`` (``method``) on the FP32 graph; ``body``:
    "fp16", "bf16" or "fp32" (rule 7; ``fp16_modules``: where a 16-bit body may run, :func:`~.fp16.convert_fp16`);
    ``weight_scale``: FP8 weights per "tensor" or "channel" (rule 3; INT8 weights are per channel).
    ``kv_fp8``: also round the K/V the graph writes to E4M3 (:func:`quantize_kv_writes`); ``attention``: FP8
    attention BMMs (rule 5; FP8 only)."""
    import onnx

    if body not in BODY_DTYPES:
        raise ValueError(f"body dtype must be one of {', '.join(BODY_DTYPES)}, got {body!r}")
    if weight_scale not in WEIGHT_SCALES:
        raise ValueError(f"weight scale must be one of {', '.join(WEIGHT_SCALES)}, got {weight_scale!r}")
    fmt = qformat(precision)
    if attention and fmt.name == "int8":
        raise ValueError("attention BMMs are quantized in FP8 only (the fused-MHA recipe of rule 5)")
    body_info: dict = {}
    with tempfile.TemporaryDirectory(prefix="sftrt-quant.") as tmp:
        cache = calibrate_ranges(src, calls, method, ranges_path or Path(tmp) / "ranges.json", percentile)
        amax = load_ranges(cache)
        if body in ("fp16", "bf16"):
            convert = convert_bf16 if body == "bf16" else convert_fp16
            body_info = convert(src, Path(tmp) / "body.onnx", fp16_modules)
            model = onnx.load(str(Path(tmp) / "body.onnx"))
        else:
            model = onnx.load(str(src))
    info = insert_qdq(model, amax, fmt, exclude, weight_scale, attention)
    if kv_fp8 and kv_outputs(model):
        names = kv_outputs(model)
        info["kv_fp8_outputs"] = quantize_kv_writes(model, output_amax(src, calls, names), qformat("fp8"))
    onnx.save(model, str(dst))
    return {**info, "method": method, "placement": "trt", "format": fmt.name, "opset": _opset(model),
            "body": body, **({"fp32_island_nodes": body_info["fp32_nodes"]} if body_info else {}),
            "weight_scale": "channel" if fmt.name == "int8" else weight_scale,
            "attention": precision if attention else body}


def _opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
