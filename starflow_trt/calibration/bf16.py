"""BF16 graphs (``calibrate --precision bf16``), BF16 bodies of Q/DQ graphs (``--high-precision-dtype bf16``),
and the FP32 simulation of them the quality gate runs.

A BF16 body is the FP16 conversion (:func:`.fp16.convert_fp16`, the same FP32 islands: norms, softmax, the
affine head) retyped to bfloat16 (:func:`to_bfloat16`): every FLOAT16 tensor, Cast target and constant becomes
BFLOAT16, initializers rounded from the FP32 source (not through FP16, whose range BF16 does not share).
BF16 keeps FP32's exponent range with 8 bits of mantissa (FP16: 11), so it trades precision for range.

ONNX Runtime's CPU EP has no BF16 MatMul and few BF16 element-wise kernels (NOT_IMPLEMENTED at session
creation; microsoft/onnxruntime#19937), so the gate runs :func:`simulate`'s graph instead: the same nodes in
FP32 with every tensor the BF16 graph types BFLOAT16 rounded to BF16 where it is produced (Cast to BFLOAT16
and back, which ORT's CPU EP has). That is BF16 storage of every intermediate with FP32 arithmetic inside each
op, as TensorRT's BF16 kernels accumulate in FP32; it is not their accumulation order or fused epilogues.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..export.dtypes import elem_types
from ..export.manifest import Manifest
from ..export.trt_variant import variant_path
from ..staging import sha256_file
from .fp16 import FP16_MODULES, convert_fp16

#: what the gate records (``quality.simulated``) for a directory with BF16 graphs or bodies
SIMULATION = "bf16 graphs simulated in FP32, each bf16 tensor rounded to bf16 where produced (calibration/bf16.py)"


def to_bfloat16(model, source) -> None:
    """Retype the FP16 parts of ``model`` (an FP16 conversion of ``source``, the FP32 graph) to BF16, in place."""
    import ml_dtypes
    from onnx import AttributeProto, TensorProto, numpy_helper

    fp32 = {i.name: i for i in source.graph.initializer}
    for init in model.graph.initializer:
        if init.data_type == TensorProto.FLOAT16:
            original = fp32.get(init.name)
            values = numpy_helper.to_array(original if original is not None else init).astype(np.float32)
            init.CopyFrom(numpy_helper.from_array(values.astype(ml_dtypes.bfloat16), init.name))
    for node in model.graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT16:
                attr.i = TensorProto.BFLOAT16
            elif attr.type == AttributeProto.TENSOR and attr.t.data_type == TensorProto.FLOAT16:
                values = numpy_helper.to_array(attr.t).astype(np.float32).astype(ml_dtypes.bfloat16)
                attr.t.CopyFrom(numpy_helper.from_array(values, attr.t.name))
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        if value.type.tensor_type.elem_type == TensorProto.FLOAT16:
            value.type.tensor_type.elem_type = TensorProto.BFLOAT16


def convert_bf16(src: Path, dst: Path, modules: Sequence[str] = FP16_MODULES) -> dict:
    """Write the BF16 version of ``src`` (``calibrate --precision bf16``): the FP16 conversion with its FP32
    islands (:func:`.fp16.convert_fp16`), retyped; returns its conversion record."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="sftrt-bf16.") as tmp:
        info = convert_fp16(src, Path(tmp) / "fp16.onnx", modules)
        model = onnx.load(str(Path(tmp) / "fp16.onnx"))
    to_bfloat16(model, onnx.load(str(src)))
    onnx.save(model, str(dst))
    return {**info, "body": "bf16"}


def simulate(model):
    """A copy of the BF16-bodied ``model`` that ORT's CPU EP runs: FP32 everywhere, each BF16 tensor of the
    original rounded to BF16 (Cast → BFLOAT16 → Cast → FLOAT) right after the node producing it."""
    import onnx
    from onnx import AttributeProto, TensorProto, helper, numpy_helper

    bf16 = TensorProto.BFLOAT16
    types = elem_types(model)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for init in graph.initializer:
        if init.data_type == bf16:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name))
    nodes = []
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Cast" and attr.name == "to" and attr.i == bf16:
                attr.i = TensorProto.FLOAT
            elif attr.type == AttributeProto.TENSOR and attr.t.data_type == bf16:
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name))
        nodes.append(node)
        for i, name in enumerate(node.output):
            if name and types.get(name) == bf16:
                wide, narrow = f"{name}__fp32", f"{name}__bf16"
                node.output[i] = wide
                nodes += [helper.make_node("Cast", [wide], [narrow], to=bf16, name=f"{name}_round_bf16"),
                          helper.make_node("Cast", [narrow], [name], to=TensorProto.FLOAT, name=f"{name}_as_fp32")]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    for value in (*graph.input, *graph.output):
        if value.type.tensor_type.elem_type == bf16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    return out


@contextmanager
def simulated(manifest: Manifest) -> Iterator[Manifest]:
    """``manifest`` with each BF16-bodied graph (and its TensorRT twin) replaced by its :func:`simulate` copy,
    written beside it as ``<graph>.bf16sim.onnx`` and removed on exit; ``manifest`` itself when no graph has a
    BF16 body. What the gate runs on ORT."""
    import onnx

    graphs, written = {}, []
    try:
        for name, spec in manifest.graphs.items():
            conv = spec.extra.get("conversion", {})
            if conv.get("body") != "bf16":
                graphs[name] = spec
                continue
            dst = spec.path.with_name(spec.path.name[: -len(".onnx")] + ".bf16sim.onnx")
            written.append(dst)
            onnx.save(simulate(onnx.load(str(spec.path))), str(dst))
            twin = None
            if spec.trt_path is not None:
                written.append(variant_path(dst))
                onnx.save(simulate(onnx.load(str(spec.trt_path))), str(variant_path(dst)))
                twin = {**spec.trt_variant, "file": variant_path(dst).name, "sha256": sha256_file(variant_path(dst))}
            record = {**conv, "body": "fp32", "simulates": "bf16"}
            graphs[name] = spec.derive(file=dst.name, sha256=sha256_file(dst), trt_variant=twin,
                                       precision="fp32" if spec.precision == "bf16" else spec.precision,
                                       extra={**spec.extra, "conversion": record})
        yield manifest.derive(manifest.root, graphs=graphs) if written else manifest
    finally:
        for path in written:
            path.unlink(missing_ok=True)
