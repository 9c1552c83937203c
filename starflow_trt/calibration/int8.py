"""Explicit INT8 / FP8: Q/DQ graphs calibrated on captured activations (ORT's calibrators).

Two placements: "ort" (:func:`quantize_graph`, onnxruntime.quantization's QDQ quantizer) and "trt"
(:func:`.qdq.quantize_graph_trt`, TensorRT's explicit-quantization rules; the only one for FP8). Both
calibrate with :func:`calibrate_ranges` and quantize the nodes :func:`select_nodes` picks.

Weights are quantized per output channel, symmetric; activations per tensor, symmetric
(TensorRT's explicit-quantization requirement). Only MatMul/Gemm are quantized;
by default the numerically sensitive ones stay in float: the affine output
projection (``proj_out``: its output becomes the scale through softplus, and the
inverse multiplies by it) and the attention matmuls (softmax inputs and outputs).
Norms, softplus/exp, softmax are never quantized (not MatMul/Gemm).
"""

from __future__ import annotations

import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from .capture import Call, iter_feeds

METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
#: module-path patterns (the exporter's ``namespace`` metadata) kept in float by default
#: (SDPA in full-sequence graphs; the explicit q·kᵀ / p·v matmuls of the step graphs' two-part attention)
DEFAULT_EXCLUDE = ("proj_out", "scaled_dot_product_attention", r"Attention/matmul")


def _namespace(node) -> str:
    for prop in node.metadata_props:
        if prop.key == "namespace":
            return prop.value
    return ""


def select_nodes(model, exclude: Sequence[str]) -> tuple[list[str], list[str]]:
    """(quantized, excluded) MatMul/Gemm node names; a node is excluded when its module path
    or name matches any regex in ``exclude``."""
    patterns = [re.compile(p) for p in exclude]
    keep, skip = [], []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        where = f"{node.name} {_namespace(node)}"
        (skip if any(p.search(where) for p in patterns) else keep).append(node.name)
    return keep, skip


class _Reader:
    """onnxruntime CalibrationDataReader over captured calls."""

    def __init__(self, calls: Sequence[Call], names: Sequence[str]):
        self._it = iter_feeds(calls, names)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - not used by quantize_static
        raise NotImplementedError


@contextmanager
def private_view(src: Path) -> Iterator[Path]:
    """``src`` as seen from a private temporary directory: the graph and its external-data files linked there.

    ORT's quantization tools write scratch files next to the model path they are given
    (``load_model_with_shape_infer``: ``<name>-inferred.onnx``, onnxruntime/quantization/quant_utils.py);
    given the export's own path they would write into an input directory, which another process may be
    reading, or which may be read-only.
    """
    import onnx

    model = onnx.load(str(src), load_external_data=False)
    data = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    with tempfile.TemporaryDirectory(prefix="sftrt-view.") as tmp:
        for name in (src.name, *data):
            os.symlink((src.parent / name).resolve(), Path(tmp) / name)
        yield Path(tmp) / src.name


def calibrate_ranges(src: Path, calls: Sequence[Call], method: str, path: Path, percentile: float = 99.99) -> Path:
    """ORT's symmetric calibration ranges of every MatMul/Gemm input and output of ``src`` over ``calls``,
    written to ``path`` (JSON; :func:`load_ranges` reads amax from it). One call at a time: calls differ in
    shape (S, P, batch); min/max and histograms merge across calls."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    if method not in METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(METHODS)}, got {method!r}")
    if not calls:
        raise ValueError(f"no captured calls to calibrate {src.name}")
    import onnx

    names = [i.name for i in onnx.load(str(src), load_external_data=False).graph.input]
    reader_type = type("Reader", (_Reader, CalibrationDataReader), {})
    with tempfile.TemporaryDirectory(prefix="sftrt-calib.") as tmp, private_view(src) as view:
        calibrator = create_calibrator(str(view), ["MatMul", "Gemm"], augmented_model_path=str(Path(tmp) / "aug.onnx"),
                                       calibrate_method=getattr(CalibrationMethod, METHODS[method]),
                                       extra_options={"symmetric": True, "percentile": percentile})
        for call in calls:
            calibrator.collect_data(reader_type([call], names))
        save_tensors_data(calibrator.compute_data(), path)
        del calibrator
    return path


def quantize_graph(src: Path, dst: Path, calls: Sequence[Call], method: str = "entropy",
                   exclude: Sequence[str] = DEFAULT_EXCLUDE, percentile: float = 99.99,
                   ranges_path: Optional[Path] = None) -> dict:
    """Write the Q/DQ version of ``src`` to ``dst`` with ORT's quantizer (placement "ort"); returns what was
    quantized.

    ``ranges_path``: where ORT's calibration ranges (JSON) are kept; the TensorRT
    calibration cache is derived from the same file.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(src))
    keep, skip = select_nodes(model, exclude)
    with tempfile.TemporaryDirectory(prefix="sftrt-quant.") as tmp, private_view(src) as view:
        cache = calibrate_ranges(src, calls, method, ranges_path or Path(tmp) / "ranges.json", percentile)
        quantize_static(str(view), str(dst), None, quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul", "Gemm"],
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        nodes_to_quantize=keep, calibrate_method=getattr(CalibrationMethod, METHODS[method]),
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
                        calibration_cache_path=str(cache))
    q = onnx.load(str(dst))
    counts = {op: sum(n.op_type == op for n in q.graph.node) for op in ("QuantizeLinear", "DequantizeLinear")}
    return {"quantized_nodes": len(keep), "excluded_nodes": skip, "method": method, "placement": "ort",
            "format": "int8", **counts}


def load_ranges(path: Path) -> dict[str, float]:
    """Tensor name → amax (max |value|) from ORT's calibration-range JSON."""
    from onnxruntime.quantization.calibrate import load_tensors_data

    data = load_tensors_data(path)
    out = {}
    for name, rng in data.data.items():
        lo, hi = (np.asarray(v).item() for v in rng.range_value)
        out[name] = float(max(abs(lo), abs(hi)))
    return out


def weight_quantized_matmuls(path: Path) -> tuple[int, int]:
    """(MatMul/Gemm nodes whose weight input comes through DequantizeLinear of a constant, all MatMul/Gemm)."""
    import onnx

    model = onnx.load(str(path))
    inits = {i.name for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    consts = inits | {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    hits = total = 0
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        total += 1
        for inp in node.input[1:2]:
            dq = producers.get(inp)
            while dq is not None and dq.op_type in ("Transpose", "Reshape"):
                dq = producers.get(dq.input[0])
            if dq is not None and dq.op_type == "DequantizeLinear" and (
                    dq.input[0] in consts or (producers.get(dq.input[0]) is not None
                                              and producers[dq.input[0]].op_type == "Constant")):
                hits += 1
    return hits, total
