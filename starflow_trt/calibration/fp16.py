"""FP16 graphs with FP32 islands (onnxconverter-common's float16 converter).

FP16 runs inside the transformer layers and the input projections; kept in FP32: everything
of the affine head (final RMSNorm, ``proj_out``, soft clip, softplus/exp of the scale), the
index/mask arithmetic, and inside the layers the norms, softmax and erf (GELU).
Graph inputs/outputs stay FP32 (casts inside), so the runtime's buffers do not change;
the result runs on ORT (CPU, CUDA) and in a strongly typed TensorRT build. The legacy
``BuilderFlag.FP16`` is only for TensorRT <= 10.x builds of FP32 graphs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

FP32_OPS = ("Softplus", "Exp", "Log", "Tanh", "Softmax", "LayerNormalization", "ReduceMean", "Pow", "Sqrt",
            "Reciprocal", "Erf", "Cast", "Floor", "Div", "Range",  # + index arithmetic done in float
            "ConstantOfShape")  # zero tensors (the VAE's first-chunk caches): the converter mistypes them
FP16_MODULES = ("attn_blocks", "proj_in", "proj_txt")


def convert_fp16(src: Path, dst: Path, modules: Sequence[str] = FP16_MODULES) -> dict:
    """Write the mixed FP16/FP32 version of ``src``; returns counts of FP32-kept nodes.

    ``modules``: module paths (the exporter's ``namespace`` metadata) whose nodes may run in FP16.
    """
    import warnings

    import onnx

    try:
        from onnxconverter_common import float16
    except ImportError as exc:  # pragma: no cover - dependency of the cpu extra
        from ..errors import StarflowError

        raise StarflowError("FP16 conversion needs onnxconverter-common: pip install 'starflow-trt[cpu]'") from exc
    model = onnx.load(str(src))
    _leaf_outputs(model)
    # intermediate type annotations go stale once tensors become fp16 (Cast nodes keep their
    # target type); drop them and let the runtime infer types
    del model.graph.value_info[:]
    keep = []
    for node in model.graph.node:
        ns = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
        if node.op_type in FP32_OPS or not any(m in ns for m in modules):
            keep.append(node.name)
    with warnings.catch_warnings():  # "-3.4e38 truncated to -10000": masked logits, harmless
        warnings.simplefilter("ignore")
        converted = float16.convert_float_to_float16(model, keep_io_types=True, node_block_list=keep)
    _float32_outputs(converted)
    onnx.save(converted, str(dst))
    return {"fp32_nodes": len(keep), "nodes": len(model.graph.node)}


def _float32_outputs(model) -> None:
    """Cast any FP16 graph output back to FP32 (the manifest's IO contract stays FP32)."""
    from onnx import TensorProto, helper

    for out in model.graph.output:
        if out.type.tensor_type.elem_type != TensorProto.FLOAT16:
            continue
        inner = f"{out.name}__fp16"
        for node in model.graph.node:
            node.output[:] = [inner if o == out.name else o for o in node.output]
            node.input[:] = [inner if i == out.name else i for i in node.input]
        model.graph.node.append(helper.make_node("Cast", [inner], [out.name], to=TensorProto.FLOAT,
                                                 name=f"{out.name}_to_fp32"))
        out.type.tensor_type.elem_type = TensorProto.FLOAT


def _leaf_outputs(model) -> None:
    """Give every graph output that other nodes also read its own Identity node (the VAE's caches: a new
    cache is also the next conv's input), so the converter's output casts never feed fp32 into fp16 nodes."""
    from onnx import helper

    outputs = {o.name for o in model.graph.output}
    read = {i for node in model.graph.node for i in node.input}
    for name in sorted(outputs & read):
        inner = f"{name}__value"
        for node in model.graph.node:
            node.output[:] = [inner if o == name else o for o in node.output]
            node.input[:] = [inner if i == name else i for i in node.input]
        model.graph.node.append(helper.make_node("Identity", [inner], [name], name=f"{name}_leaf"))
