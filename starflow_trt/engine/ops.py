"""Static table of the ONNX operators TensorRT's ONNX parser supports, per targeted version.

Source: onnx/onnx-tensorrt ``docs/operators.md`` (the "Operator Support Matrix" of the
TensorRT 10.x parser: "TensorRT 10.x supports operators in the inclusive range of opset 9
to opset 20/24"; TensorRT 11 keeps every operator listed there). Rows marked N there
(e.g. MatMulInteger, QLinearMatMul, DynamicQuantizeLinear, ConvInteger, Sequence*) are
absent here on purpose: ORT's integer kernels are not a TensorRT form, Q/DQ is.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

_COMMON = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization BlackmanWindow
Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv
DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample
GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish Hardmax Identity If ImageScaler
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM
LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression
NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin
ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan
Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign
SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample
Where Xor
""".split())

#: targeted TensorRT major version → supported ONNX op types (default domain)
TRT_ONNX_OPS = {
    "10": _COMMON,
    "11": _COMMON | {"Attention", "RMSNormalization", "RotaryEmbedding"},
}
#: opsets each version's parser reads
TRT_OPSETS = {"10": range(9, 21), "11": range(9, 26)}
SOURCE = "onnx/onnx-tensorrt docs/operators.md (TensorRT 10.x operator support matrix)"


def graph_ops(path: str | Path) -> Counter:
    """Op types of an ONNX graph (without loading external weights)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return Counter(n.op_type for n in model.graph.node if n.domain in ("", "ai.onnx"))


def check_graph_ops(path: str | Path, trt_version: str = "10") -> list[tuple[str, int]]:
    """(op type, count) of every op in the graph that TensorRT ``trt_version`` cannot parse."""
    import onnx

    major = trt_version.split(".")[0]
    if major not in TRT_ONNX_OPS:
        raise ValueError(f"no operator table for TensorRT {trt_version}; known: {', '.join(TRT_ONNX_OPS)}")
    model = onnx.load(str(path), load_external_data=False)
    bad = [(op, n) for op, n in sorted(graph_ops(path).items()) if op not in TRT_ONNX_OPS[major]]
    bad += [(f"custom-domain {n.domain}::{n.op_type}", 1) for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset not in TRT_OPSETS[major]:
        bad.append((f"opset {opset}", 1))
    return bad
