"""Test helpers around the project's one exporter (:func:`starflow_trt.export.onnx_export.trace_onnx`):
export a module or a media graph on its own example, run a file on a plain CPU ONNX Runtime session."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from starflow_trt.export.onnx_export import TWO_GB, dynamic_axes, trace_onnx

PathLike = Union[str, os.PathLike]


def export_module(module: nn.Module, args: Sequence[torch.Tensor], path: PathLike, input_names: Sequence[str],
                  output_names: Sequence[str], axes: Sequence[Sequence[int]], opset: int = 18) -> float:
    """Export ``module(*args)`` (eval mode) to ``path``; ``axes[i]``: dynamic axes of input ``i``. Returns seconds.

    Examples are made contiguous first: a strided example (a slice) makes the exporter emit
    ``sym_stride``, which has no ONNX conversion. External data past 2 GB of weights.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    external = sum(p.numel() * p.element_size() for p in module.parameters()) > TWO_GB - (64 << 20)
    trace_onnx(module.eval(), [a.contiguous() for a in args], path, input_names, output_names, axes, opset,
               external)
    return time.perf_counter() - start


def export_graph(graph, directory: PathLike, dynamic: bool = True) -> Path:
    """Write a :class:`~starflow_trt.media.graphs.MediaGraph` to ``{directory}/{name}.onnx`` on its example.

    ``dynamic=False`` fixes every axis to the example's (3-4x faster to export).
    """
    path = Path(directory) / f"{graph.name}.onnx"
    axes = dynamic_axes(graph.inputs) if dynamic else [[] for _ in graph.inputs]
    export_module(graph.module, graph.example, path, [t.name for t in graph.inputs], [t.name for t in graph.outputs],
                  axes)
    return path


def ort_run(path: PathLike, threads: Optional[int] = None) -> Callable[..., tuple[torch.Tensor, ...]]:
    """A CPU ONNX Runtime session on ``path`` as ``f(*tensors) -> tuple[Tensor, ...]`` (inputs in graph order);
    ``threads`` None: the runtime's default (``$STARFLOW_TRT_THREADS``, the suite's)."""
    import onnxruntime as ort

    from starflow_trt.defaults import default_threads

    opts = ort.SessionOptions()
    threads = threads or default_threads()
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.x64quantprecision", "1")   # as the runtime's ORT backend
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if len(tensors) != len(names):
            raise ValueError(f"graph takes {len(names)} inputs, got {len(tensors)}")
        feeds = {n: np.ascontiguousarray(t.detach().cpu().numpy()) for n, t in zip(names, tensors)}
        return tuple(torch.from_numpy(o) for o in session.run(None, feeds))

    return run


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|`` (0 when both are all zeros)."""
    actual, expected = actual.double(), expected.double()
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch {tuple(actual.shape)} vs {tuple(expected.shape)}")
    scale = expected.abs().max().item()
    diff = (actual - expected).abs().max().item()
    return diff / scale if scale > 0 else diff
