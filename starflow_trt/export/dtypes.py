"""The torch dtype of each tensor dtype name the manifest records (``TensorInfo.dtype``), and the ONNX
element type of every tensor of a graph."""

from __future__ import annotations

import torch

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "int64": torch.int64, "int32": torch.int32, "int8": torch.int8, "bool": torch.bool}


def elem_types(model) -> dict[str, int]:
    """Tensor name → ONNX element type (``TensorProto`` enum) of every typed tensor in ``model``'s main graph:
    initializers, inputs, outputs and what ONNX shape inference derives in between."""
    import onnx

    graph = onnx.shape_inference.infer_shapes(model).graph
    types = {t.name: t.data_type for t in graph.initializer}
    for v in (*graph.input, *graph.value_info, *graph.output):
        if v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    return types
