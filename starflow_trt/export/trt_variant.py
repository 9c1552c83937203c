"""TensorRT variants of the step and prefill graphs: the same graph in TensorRT's fused-attention form.

The portable step graph (``deep_step.onnx``) scores the past and the new keys separately and takes
one softmax over both (:class:`~starflow_trt.reference.layers.TwoPartMask`): no copy of the cache on
ONNX Runtime, but a form no TensorRT document calls fusable. TensorRT fuses attention built from
primitive layers when a layer has one Q·Kᵀ MatMul with the scale on Q (or K) before it, an optional
add (or bool) mask, a softmax and one MatMul with V (TensorRT's fused-attention guide); with a KV cache
the past and new keys are concatenated first (NVIDIA/TensorRT#2981). The opset-23 ``Attention`` op is
not an option: TensorRT's importer rejects it with past K/V (NVIDIA/TensorRT#4738).

So export also traces each step / prefill wrapper with ``concat_attention`` (the maths in
:func:`~starflow_trt.reference.layers._concat_attention`) into ``<graph>.trt.onnx``, recorded as the
graph's ``trt_variant`` in the manifest (file, sha256, :data:`FORM`, external data) and parsed by
``starflow-trt build`` instead of the portable graph. Same inputs, outputs and precision policy
(FP32 softmax island in FP16/BF16 graphs). :func:`attention_layers` reads the form back from an ONNX
graph; export refuses a variant whose layers do not all have it (:func:`form_problems`).
Whether TensorRT then fuses it is only observable on a GPU build.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .names import kv_names
from .ort_optimize import _Graph

#: manifest ``trt_variant.form``: per layer concat(past, new) K/V → Mul(scale) on Q → Q·Kᵀ → (+ mask) → Softmax → ·V
FORM = "concat_qk_softmax_v"
SUFFIX = ".trt.onnx"
#: ops looked through when tracing a tensor to its source: layout and precision changes, and the Q/DQ of a
#: calibrated twin (``calibrate --quantize-attention`` quantizes the BMM inputs)
_PRECISION = ("Cast", "QuantizeLinear", "DequantizeLinear")
_PASSTHROUGH = ("Transpose", *_PRECISION)


def variant_path(portable: Path) -> Path:
    """``dir/deep_step.onnx`` → ``dir/deep_step.trt.onnx``."""
    return portable.with_name(portable.name[: -len(".onnx")] + SUFFIX)


@dataclass(frozen=True)
class AttentionLayer:
    """One Softmax of a graph and the attention around it, as read from the nodes.

    ``keys`` / ``values``: the tensors concatenated into K / V, each traced back through
    Transpose / Cast to a graph input (``past_k_l``) or the graph output it is also written to
    (``new_k_l``); one entry when K / V is not a Concat. ``q_scale``: the constant a Mul applies to Q
    right before the Q·Kᵀ MatMul (None: no such Mul). ``score_ops``: ops from that MatMul to the
    Softmax (e.g. ``("Add",)``, ``("Cast", "Add")``). ``two_part``: the Softmax input is a Concat of
    separately computed score blocks (the portable form).
    """

    softmax: str
    axis: int
    q_scale: Optional[float]
    keys: tuple[str, ...]
    values: tuple[str, ...]
    key_axis: Optional[int]
    value_axis: Optional[int]
    score_ops: tuple[str, ...]
    two_part: bool


class _Nodes(_Graph):
    """:class:`~.ort_optimize._Graph`'s producer / consumer maps and constants, with the walks below."""

    def __init__(self, model):
        super().__init__(model, Path("."))
        self.inputs = {i.name for i in model.graph.input}

    def scalar(self, name: str) -> Optional[float]:
        shape = self.shape(name)
        if shape is None or int(np.prod(shape)) != 1 or self.tensors[name].data_location == 1:   # 1: EXTERNAL
            return None
        return float(self.value(name).reshape(()))

    def up(self, name: str) -> tuple[str, list[str]]:
        """Walk producers of ``name`` through layout / precision ops: (source tensor, ops passed)."""
        ops = []
        while name in self.producer and self.producer[name].op_type in _PASSTHROUGH:
            ops.append(self.producer[name].op_type)
            name = self.producer[name].input[0]
        return name, ops

    def down(self, name: str):
        """The single consumer of ``name`` after Cast and Q/DQ nodes (None if it fans out)."""
        while True:
            users = self.consumers.get(name, [])
            if len(users) != 1:
                return None
            if users[0].op_type not in _PRECISION:
                return users[0]
            name = users[0].output[0]

    def label(self, name: str) -> str:
        """The graph output ``name`` is written to through a Transpose (and Casts: an FP16 body, whose FP32
        islands Cast around the Transpose, writing FP32 IO), else the graph input it comes from (through
        Transpose / Cast), else ``name``."""
        todo, seen = [(name, False)], set()
        while todo:
            tensor, transposed = todo.pop()
            if transposed and tensor in self.outputs:
                return tensor
            for user in self.consumers.get(tensor, []):
                if user.op_type in _PASSTHROUGH and user.output[0] not in seen:
                    seen.add(user.output[0])
                    todo.append((user.output[0], transposed or user.op_type == "Transpose"))
        source, _ = self.up(name)
        return source if source in self.inputs else name

    def parts(self, name: str) -> tuple[tuple[str, ...], Optional[int]]:
        """The labelled inputs of the Concat ``name`` comes from (through Transpose/Cast) and its axis."""
        source, _ = self.up(name)
        node = self.producer.get(source)
        if node is None or node.op_type != "Concat":
            return (self.label(source),), None
        axis = next(a.i for a in node.attribute if a.name == "axis")
        return tuple(self.label(i) for i in node.input), axis


def attention_layers(model) -> list[AttentionLayer]:
    """Every Softmax of ``model`` (an ``onnx.ModelProto``) with the attention around it, in node order."""
    g = _Nodes(model)
    layers = []
    for sm in (n for n in model.graph.node if n.op_type == "Softmax"):
        axis = next((a.i for a in sm.attribute if a.name == "axis"), -1)
        score_ops: list[str] = []
        name = sm.input[0]
        # up from the softmax through the mask Add and precision casts to the Q·Kᵀ MatMul
        while name in g.producer and g.producer[name].op_type in ("Add", "Cast"):
            node = g.producer[name]
            score_ops.insert(0, node.op_type)
            scores = [i for i in node.input if g.producer.get(i) is not None
                      and g.producer[i].op_type in ("MatMul", "Cast", "Add", "Concat")]
            name = scores[0] if node.op_type == "Add" and len(scores) == 1 else node.input[0]
        bmm1 = g.producer.get(name)
        two_part = bmm1 is not None and bmm1.op_type == "Concat"
        q_scale, keys, key_axis = None, (), None
        if bmm1 is not None and bmm1.op_type == "MatMul":
            mul = g.producer.get(g.up(bmm1.input[0])[0])
            if mul is not None and mul.op_type == "Mul":
                q_scale = g.scalar(mul.input[1]) if g.scalar(mul.input[1]) is not None else g.scalar(mul.input[0])
            keys, key_axis = g.parts(bmm1.input[1])
        bmm2 = g.down(sm.output[0])
        values, value_axis = (), None
        if bmm2 is not None and bmm2.op_type == "MatMul":
            values, value_axis = g.parts(bmm2.input[1])
        layers.append(AttentionLayer(sm.name, axis, q_scale, keys, values, key_axis, value_axis,
                                     tuple(score_ops), two_part))
    return layers


def form_problems(model, layers: int, head_dim: int, past: bool,
                  attended: Optional[Sequence[int]] = None) -> list[str]:
    """Where ``model`` departs from :data:`FORM` (empty: every layer has it).

    ``attended``: the layers whose attention is in the graph (default all; a prefill graph has no
    attention in its last layer, whose output feeds nothing). Per attended layer l: one Softmax over the last axis whose scores are Mul(Q, 1/√hd) · Kᵀ (+ an add mask),
    K = Concat(past_k_l, new_k_l) and V = Concat(past_v_l, new_v_l) along the sequence axis
    (``past``; else K / V are the layer's new_k_l / new_v_l alone), no opset-23 ``Attention`` op.
    """
    problems = [f"has an {n.op_type} op ({n.name})" for n in model.graph.node if n.op_type == "Attention"]
    found = attention_layers(model)
    attended = range(layers) if attended is None else attended
    if len(found) != len(attended):
        problems.append(f"{len(found)} Softmax nodes for {len(attended)} attention layers")
    scale = head_dim ** -0.5
    new, old = kv_names(layers, "new"), kv_names(layers, "past")
    for l in attended:
        k, v = new[2 * l: 2 * l + 2]
        want_k, want_v = ((old[2 * l], k), (old[2 * l + 1], v)) if past else ((k,), (v,))
        mine = [a for a in found if k in a.keys]
        if len(mine) != 1:
            problems.append(f"layer {l}: {len(mine)} softmax nodes attend over {k}, expected one")
            continue
        layer = mine[0]
        if layer.axis not in (-1, 3):
            problems.append(f"layer {l}: softmax axis {layer.axis}, not the last")
        if layer.q_scale is None or abs(layer.q_scale - scale) > 1e-2 * scale:   # held in the graph's dtype
            problems.append(f"layer {l}: Q not multiplied by 1/sqrt({head_dim}) before Q·Kᵀ (got {layer.q_scale})")
        if layer.keys != want_k or (past and layer.key_axis not in (2, -2)):
            problems.append(f"layer {l}: K is {layer.keys} (axis {layer.key_axis}), expected {want_k}")
        if layer.values != want_v or (past and layer.value_axis not in (2, -2)):
            problems.append(f"layer {l}: V is {layer.values} (axis {layer.value_axis}), expected {want_v}")
        if [op for op in layer.score_ops if op != "Cast"] not in ([], ["Add"]):
            problems.append(f"layer {l}: {layer.score_ops} between Q·Kᵀ and Softmax")
    problems += [f"softmax {a.softmax}: over separately computed score blocks (two-part form)"
                 for a in found if a.two_part]
    return problems


def share_external_data(variant: Path, portable: Path) -> int:
    """Point the variant's external initializers at identical bytes in the portable graph's data files.

    Both graphs hold the same weights (traced from the same module), but under exporter-made names,
    so tensors are matched by dtype, shape and content. The variant's own data files are deleted when
    nothing references them any more. Returns how many tensors now share the portable graph's data.
    """
    import onnx

    def ext(t) -> dict[str, str]:
        return {e.key: e.value for e in t.external_data}

    def digest(directory: Path, t) -> str:
        info = ext(t)
        with open(directory / info["location"], "rb") as fh:
            fh.seek(int(info.get("offset", 0)))
            return hashlib.sha256(fh.read(int(info["length"]))).hexdigest()

    external = onnx.TensorProto.EXTERNAL
    base = onnx.load(str(portable), load_external_data=False)
    known = {(t.data_type, tuple(t.dims), digest(portable.parent, t)): t
             for t in base.graph.initializer if t.data_location == external}
    model = onnx.load(str(variant), load_external_data=False)
    own = {ext(t)["location"] for t in model.graph.initializer if t.data_location == external}
    shared = 0
    for t in model.graph.initializer:
        if t.data_location != external:
            continue
        match = known.get((t.data_type, tuple(t.dims), digest(variant.parent, t)))
        if match is not None:
            del t.external_data[:]
            t.external_data.extend(match.external_data)
            shared += 1
    onnx.save(model, str(variant))
    still = {ext(t)["location"] for t in model.graph.initializer if t.data_location == external}
    for location in own - still - {ext(t)["location"] for t in base.graph.initializer
                                   if t.data_location == external}:
        (variant.parent / location).unlink()
    return shared


def trt_variant_entry(path: Path, external_data: Sequence[str]) -> dict:
    """The manifest's ``trt_variant`` record of a written variant file."""
    from ..staging import sha256_file

    return {"file": path.name, "sha256": sha256_file(path), "form": FORM, "external_data": list(external_data)}
