"""Export one media wrapper to ONNX and check it against PyTorch with ONNX Runtime.

Same exporter choices as :mod:`starflow_trt.export.onnx_export` (``torch.onnx.export(dynamo=True)``,
opset 18, ``Dim.AUTO`` axes, external data past 2 GB). The graph registry entries for
``text_encoder`` / ``vae_*`` call :func:`export_module` with the names and axes of :mod:`.graphs`.
"""

from __future__ import annotations

import gc
import inspect
import os
import time
import warnings
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

DEFAULT_OPSET = 18
TWO_GB = 2 * 1024 ** 3

Axes = Mapping[int, str]


def _dynamic_shapes(module: nn.Module, axes: Sequence[Axes]) -> tuple:
    """Positional specs like the example args; a ``*caches`` vararg gets its specs as one nested tuple."""
    auto = torch.export.Dim.AUTO
    specs = [{i: auto for i in a} for a in axes]
    params = inspect.signature(module.forward).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        named = sum(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
        return (*specs[:named], tuple(specs[named:]))
    return tuple(specs)


def export_module(module: nn.Module, args: Sequence[torch.Tensor], path: Union[str, os.PathLike],
                  input_names: Sequence[str], output_names: Sequence[str], axes: Sequence[Axes],
                  opset: int = DEFAULT_OPSET, external_data: Optional[bool] = None) -> float:
    """Export ``module(*args)`` to ``path``; ``axes[i]`` marks the dynamic axes of input ``i``. Returns seconds.

    Example inputs must have every dynamic axis ≥ 2 (a size-1 axis is specialised to 1). They are
    made contiguous first: a strided example (a slice) makes the exporter emit ``sym_stride``,
    which has no ONNX conversion.
    """
    args = tuple(a.contiguous() for a in args)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    external = weight_bytes > TWO_GB - (64 << 20) if external_data is None else external_data
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module.eval(), tuple(args), dynamo=True, opset_version=opset,
            dynamic_shapes=_dynamic_shapes(module, axes), input_names=list(input_names),
            output_names=list(output_names), optimize=True, verbose=False)
        program.save(path, external_data=external)
    del program
    gc.collect()
    return time.perf_counter() - start


def ort_session(path: Union[str, os.PathLike], threads: Optional[int] = None):
    """A CPU ONNX Runtime session (all graph optimisations)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_callable(session):
    """Wrap a session as ``f(*tensors) -> tuple[Tensor, ...]`` (positional inputs in graph order)."""
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
