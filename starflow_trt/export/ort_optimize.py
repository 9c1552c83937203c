"""ORT-only optimised variants of exported graphs (ONNX Runtime contrib ops), written beside the portable ones.

The portable graph (``deep_step.onnx``) is what TensorRT and every other consumer reads; this module
rewrites a copy for ONNX Runtime (``deep_step.ort.onnx``) with fusions ORT's session-level optimizer
does not find in our graphs, and records it in the manifest as the graph's ``ort_variant``
(file + sha256 + the fusions applied + the onnxruntime version), which the ``ort`` backend loads when
present. Same inputs, outputs and maths: tests/test_ort_variant.py checks the variant against the
portable graph and the pipeline against the goldens.

Fusions (each a pattern of our own exporter's output, matched on structure and constants, never on names):

* ``rotary``: RoPE ``u·cos + (u·R)·sin`` with ``R`` the exact pair-swap matrix
  (:func:`~starflow_trt.reference.rope.pair_rotation`) → one ``com.microsoft.RotaryEmbedding``
  (interleaved) per layer, fed half-width tables sliced once per graph from the ``rope_cos``/``rope_sin``
  rows (rows are pair-duplicated by construction, :func:`~starflow_trt.reference.rope.rope_table`).
  Replaces a [.., hd]x[hd, hd] MatMul and three element-wise passes.
* ``gemm_bias`` (opt-in): ``MatMul(x, W) + b`` (W, b constant) → ``Gemm(x2d, W, b)`` between two Reshapes:
  the bias is added inside the GEMM instead of by a separate pass. Not a default: on the bench config
  the Add time it saves comes back as slower GEMMs (no net change, benchmarks/README.md).

Measured and NOT used: ``SkipLayerNormalization`` (residual + bias + LayerNorm) runs ~15x slower than
``Add, Add, LayerNormalization`` on ORT 1.32's CPU kernel at [2, 64, 512].

Run on an export directory: ``python -m starflow_trt.export.ort_optimize DIR [--fusions rotary,gemm_bias]``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from ..errors import StarflowError

#: applied by default; ``gemm_bias`` is available but measured no faster (module docstring)
FUSIONS = ("rotary",)
ALL_FUSIONS = ("rotary", "gemm_bias")
SUFFIX = ".ort.onnx"
MS_DOMAIN = "com.microsoft"
#: graph kinds that get a variant (the hot loop: step graphs)
VARIANT_KINDS = ("step",)


class _Graph:
    """Producer / consumer maps and constants of an ONNX graph, for local rewrites.

    The model is loaded without its external data: constants are read on demand (:meth:`value`),
    so a 7B graph is rewritten without reading its weights, and the variant keeps pointing at the
    portable graph's external data files instead of copying them.
    """

    def __init__(self, model, base_dir: Path):
        self.model = model
        self.graph = model.graph
        self.base_dir = base_dir
        self.tensors = {i.name: i for i in self.graph.initializer}
        for node in self.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.tensors[node.output[0]] = node.attribute[0].t
        self.consts: dict[str, np.ndarray] = {}
        self.outputs = {o.name for o in self.graph.output}
        self.index()
        self.counter = 0

    def shape(self, name: str) -> Optional[tuple[int, ...]]:
        """Shape of constant ``name`` (None if it is not a constant), without reading its data."""
        t = self.tensors.get(name)
        return None if t is None else tuple(t.dims)

    def value(self, name: str) -> Optional[np.ndarray]:
        """Value of constant ``name`` (None if it is not a constant), read (once) when asked for."""
        from onnx import numpy_helper

        if name not in self.consts and name in self.tensors:
            self.consts[name] = numpy_helper.to_array(self.tensors[name], base_dir=str(self.base_dir))
        return self.consts.get(name)

    def index(self) -> None:
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def name(self, stem: str) -> str:
        self.counter += 1
        return f"ort_opt/{stem}_{self.counter}"

    def const(self, stem: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(stem)
        tensor = numpy_helper.from_array(value, name)
        self.graph.initializer.append(tensor)
        self.tensors[name], self.consts[name] = tensor, value
        return name

    def only_consumer(self, tensor: str):
        users = self.consumers.get(tensor, [])
        return users[0] if len(users) == 1 and tensor not in self.outputs else None


def _is_pair_rotation(g: _Graph, name: str) -> bool:
    """Is constant ``name`` the exact pair-swap matrix of :func:`~starflow_trt.reference.rope.pair_rotation`?"""
    shape = g.shape(name)
    if shape is None or len(shape) != 2 or shape[0] != shape[1] or shape[0] % 2 or shape[0] > 1024:
        return False
    from ..reference.rope import pair_rotation

    r = g.value(name)
    return bool(np.array_equal(r, pair_rotation(shape[0]).numpy().astype(r.dtype)))


def _fuse_rotary(g: _Graph) -> int:
    """``Add(Mul(u, cos), Mul(MatMul(u, R), sin))`` → Reshape → RotaryEmbedding(interleaved) → Reshape."""
    from onnx import helper

    halves: dict[str, str] = {}
    shapes: dict[tuple, tuple[str, str]] = {}   # symbolic shape of u → (Shape(u), 4-D shape), made once
    known = _symbolic_shapes(g.model)
    zero_pos = None
    fused = 0
    for mm in [n for n in g.graph.node if n.op_type == "MatMul"]:
        if not _is_pair_rotation(g, mm.input[1]):
            continue
        u, rotated = mm.input[0], mm.output[0]
        mul_sin = g.only_consumer(rotated)
        if mul_sin is None or mul_sin.op_type != "Mul":
            continue
        sin = mul_sin.input[1] if mul_sin.input[0] == rotated else mul_sin.input[0]
        add = g.only_consumer(mul_sin.output[0])
        if add is None or add.op_type != "Add":
            continue
        other = add.input[1] if add.input[0] == mul_sin.output[0] else add.input[0]
        mul_cos = g.producer.get(other)
        if mul_cos is None or mul_cos.op_type != "Mul" or u not in mul_cos.input or g.only_consumer(other) is None:
            continue
        cos = mul_cos.input[1] if mul_cos.input[0] == u else mul_cos.input[0]
        if cos not in g.tensors and cos not in {i.name for i in g.graph.input}:
            continue   # tables must be graph inputs or constants (sliced once per graph)
        new = []
        for table in (cos, sin):
            if table not in halves:
                halves[table] = g.name("rope_half")
                new.append(helper.make_node(
                    "Slice", [table, g.const("zero", np.array([0], np.int64)),
                              g.const("end", np.array([np.iinfo(np.int64).max], np.int64)),
                              g.const("axis", np.array([-1], np.int64)), g.const("step", np.array([2], np.int64))],
                    [halves[table]], name=g.name("rope_half_slice")))
        if zero_pos is None:
            zero_pos = g.const("position0", np.array([0], np.int64))
        key = known.get(u)
        if key is not None and key in shapes:   # same symbolic shape as an earlier u: reuse its shape tensors
            shape_u, shape4 = shapes[key]
        else:
            shape_u, tail, shape4 = g.name("shape_u"), g.name("s_hd"), g.name("shape4")
            new += [helper.make_node("Shape", [u], [shape_u], name=g.name("shape")),
                    helper.make_node("Shape", [u], [tail], start=-2, name=g.name("shape")),
                    helper.make_node("Concat", [g.const("lead", np.array([-1, 1], np.int64)), tail], [shape4],
                                     axis=0, name=g.name("concat"))]
            if key is not None:
                shapes[key] = (shape_u, shape4)
        u4, r4 = g.name("u4"), g.name("rot4")
        new += [helper.make_node("Reshape", [u, shape4], [u4], name=g.name("reshape")),
                helper.make_node("RotaryEmbedding", [u4, zero_pos, halves[cos], halves[sin]], [r4],
                                 domain=MS_DOMAIN, interleaved=1, name=g.name("rotary")),
                helper.make_node("Reshape", [r4, shape_u], [add.output[0]], name=g.name("reshape"))]
        _replace(g, [mm, mul_sin, mul_cos, add], new)
        fused += 1
    return fused


def _symbolic_shapes(model) -> dict[str, tuple]:
    """Tensor name → shape as a tuple of ints and dim names, where ONNX shape inference fully knows it."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:   # e.g. a model over 2 GB: no sharing, still correct
        return {}
    out = {}
    for vi in (*inferred.graph.value_info, *inferred.graph.input):
        dims = vi.type.tensor_type.shape.dim
        key = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in dims)
        if dims and None not in key:
            out[vi.name] = key
    return out


def _fuse_gemm_bias(g: _Graph) -> int:
    """``Add(MatMul(x, W), b)`` with constant 2-D W and 1-D b → ``Gemm`` on ``x`` flattened to 2-D."""
    from onnx import helper

    fused = 0
    for mm in [n for n in g.graph.node if n.op_type == "MatMul"]:
        w = g.shape(mm.input[1])
        if w is None or len(w) != 2 or _is_pair_rotation(g, mm.input[1]):
            continue
        add = g.only_consumer(mm.output[0])
        if add is None or add.op_type != "Add":
            continue
        bias = add.input[1] if add.input[0] == mm.output[0] else add.input[0]
        if g.shape(bias) != (w[1],):
            continue
        if any(c.op_type in ("Div", "Erf") for c in g.consumers.get(add.output[0], [])):
            continue   # GELU input: ORT fuses this bias into BiasGelu
        x = mm.input[0]
        x2, y2, lead, shape = (g.name(s) for s in ("x2d", "y2d", "lead", "shape"))
        new = [helper.make_node("Reshape", [x, g.const("flat", np.array([-1, w[0]], np.int64))], [x2],
                                name=g.name("reshape")),
               helper.make_node("Gemm", [x2, mm.input[1], bias], [y2], name=g.name("gemm")),
               helper.make_node("Shape", [x], [lead], end=-1, name=g.name("shape")),
               helper.make_node("Concat", [lead, g.const("n", np.array([w[1]], np.int64))], [shape], axis=0,
                                name=g.name("concat")),
               helper.make_node("Reshape", [y2, shape], [add.output[0]], name=g.name("reshape"))]
        _replace(g, [mm, add], new)
        fused += 1
    return fused


def _replace(g: _Graph, old: Sequence, new: Sequence) -> None:
    """Swap ``old`` nodes for ``new`` at the first old node's position (keeps a topological order).

    Nodes are told apart by their outputs (protobuf wrappers have no stable identity).
    """
    drop = {tuple(n.output) for n in old}
    nodes = list(g.graph.node)
    at = next(i for i, n in enumerate(nodes) if tuple(n.output) in drop)
    kept = [n for n in nodes if tuple(n.output) not in drop]
    at -= sum(1 for n in nodes[:at] if tuple(n.output) in drop)
    del g.graph.node[:]
    g.graph.node.extend(kept[:at] + list(new) + kept[at:])
    g.index()


PASSES = {"rotary": _fuse_rotary, "gemm_bias": _fuse_gemm_bias}
assert tuple(PASSES) == ALL_FUSIONS


def optimize_graph(src: Union[str, os.PathLike], dst: Union[str, os.PathLike],
                   fusions: Iterable[str] = FUSIONS) -> dict[str, int]:
    """Write the ORT variant of ``src`` to ``dst``; returns how many patterns each fusion replaced.

    Weights kept as external data by ``src`` are neither read nor copied: ``dst`` references the same
    data files (so it must be written into the same directory).
    """
    import onnx

    fusions = list(fusions)
    unknown = [f for f in fusions if f not in PASSES]
    if unknown:
        raise StarflowError(f"unknown ORT fusion(s) {unknown}; choose from {', '.join(PASSES)}")
    src, dst = Path(src), Path(dst)
    model = onnx.load(str(src), load_external_data=False)
    if _external_locations(model) and dst.resolve().parent != src.resolve().parent:
        raise StarflowError(f"{src.name} keeps its weights in external data: write its ORT variant into "
                            f"{src.parent}, not {dst.parent}")
    g = _Graph(model, src.parent)
    counts = {name: PASSES[name](g) for name in fusions}
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(MS_DOMAIN, 1))
    onnx.save(model, str(dst))
    return counts


def _external_locations(model) -> list[str]:
    """External data files an (unloaded) model's initializers point to."""
    import onnx

    return sorted({e.value for init in model.graph.initializer if init.data_location == onnx.TensorProto.EXTERNAL
                   for e in init.external_data if e.key == "location"})


def write_ort_variants(directory: Union[str, os.PathLike], graphs: Optional[Sequence[str]] = None,
                       fusions: Iterable[str] = FUSIONS) -> list[dict]:
    """Write ``<graph>.ort.onnx`` beside each step graph of an export (or calibration) directory and
    record it in ``manifest.json`` (``graphs.<name>.ort_variant``); returns one row per graph.

    ``graphs``: names (default: every graph of a kind in :data:`VARIANT_KINDS`). A graph where no
    fusion applies gets no variant. Needs ``onnx`` (and onnxruntime to load the result later).
    """
    import onnxruntime

    from ..staging import sha256_file
    from .manifest import load_manifest

    manifest = load_manifest(directory)
    names = list(graphs) if graphs else [n for n, s in manifest.graphs.items() if s.kind in VARIANT_KINDS]
    fusions = list(fusions)
    rows = []
    for name in names:
        spec = manifest.graph(name)
        spec.ort_variant = None   # replaced (or dropped) below
        spec.verify()             # the portable graph it is made from
        dst = spec.path.with_name(spec.path.name[: -len(".onnx")] + SUFFIX)
        counts = optimize_graph(spec.path, dst, fusions)
        if not any(counts.values()):
            dst.unlink()
            rows.append({"graph": name, "fusions": counts, "file": None})
            continue
        spec.ort_variant = {"file": dst.name, "sha256": sha256_file(dst), "fusions": counts,
                            # the portable graph's own files (shared, not copied)
                            "external_data": list(spec.external_data),
                            "onnxruntime": onnxruntime.__version__}
        rows.append({"graph": name, "fusions": counts, "file": dst.name})
    manifest.save()
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the ORT variants of an export directory's step graphs")
    parser.add_argument("directory")
    parser.add_argument("--fusions", default=",".join(FUSIONS), help=f"comma-separated, of {', '.join(ALL_FUSIONS)}")
    args = parser.parse_args()
    for row in write_ort_variants(args.directory, fusions=[f for f in args.fusions.split(",") if f]):
        print(row)
