"""``torch`` backend: the export wrappers themselves in PyTorch, on the CPU or a CUDA GPU (no TensorRT).

It needs the checkpoint the graphs were exported from (recorded in the manifest; pass
``checkpoint=`` if it moved); the sha256 is checked so the two cannot drift. Media graphs
(text encoder, VAE) are rebuilt from the source weights their manifest entries record.

``device``: where the modules, the KV workspace and every buffer live (``cpu`` or ``cuda[:i]``).
``dtype``: the step, forward and denoiser modules' precision: ``fp32``, ``fp16`` or ``bf16`` (Linear
weights in that dtype, FP32 norms and affine head, as ``export --dtype``), K/V caches in it too;
None: the manifest's. A step runs :class:`~starflow_trt.export.graphs.CachedStepGraph` when its
``new_k_l`` slots follow its ``past_k_l`` in one buffer (the runtime's cache always does): one
``scaled_dot_product_attention`` over the cache prefix. ``cuda_graphs`` (CUDA only): a step call
whose shapes and K/V / output addresses repeat (the sweeps of one Jacobi chunk at one cache index)
is captured on its second occurrence and replayed after (tokens and RoPE rows copied in); a call
seen once pays nothing, so schedules that move the index every sweep gain little. ``threads``: torch's intra-op
threads during a call (CPU; None: leave torch's setting).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Mapping, Optional, Union

import torch

from ...errors import BackendUnavailable, InputError, ManifestError
from ...export.dtypes import TORCH_DTYPES
from ...export.manifest import GraphSpec, Manifest
from ...export.names import NEW, PAST, ROPE_COS, ROPE_SIN, SCALE, SHIFT, TOKENS
from .base import Backend, GraphRunner

#: ``dtype`` names the torch backend takes
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: captured CUDA graphs kept per step runner (each holds its activations)
MAX_GRAPHS = 8
#: step inputs a captured graph takes by copy (the rest: by address)
_COPIED = (TOKENS, ROPE_COS, ROPE_SIN)


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """``device`` as a torch device; BackendUnavailable when it names a CUDA GPU this machine lacks."""
    try:
        dev = torch.device(device or "cpu")
    except RuntimeError as exc:
        raise InputError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable(f"device {dev} needs a CUDA GPU and this machine has none; use --device cpu")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise BackendUnavailable(f"device {dev} does not exist: this machine has {torch.cuda.device_count()} GPU(s)")
        dev = torch.device("cuda", dev.index or 0)
    return dev


def resolve_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r} for backend 'torch': choose {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _span(past: torch.Tensor, new: torch.Tensor) -> Optional[torch.Tensor]:
    """past [P, ...] and new [S, ...] as one view [P + S, ...] when new's slots follow past's in one
    buffer; None otherwise."""
    p = past.shape[0]
    if p == 0:
        return new
    if (past.dtype != new.dtype or past.shape[1:] != new.shape[1:] or past.stride() != new.stride()
            or past.untyped_storage().data_ptr() != new.untyped_storage().data_ptr()
            or new.storage_offset() != past.storage_offset() + p * past.stride(0)):
        return None
    return past.as_strided((p + new.shape[0], *past.shape[1:]), past.stride(), past.storage_offset())


class TorchRunner(GraphRunner):
    """A module behind the graph contract: outputs copied into the caller's buffers."""

    def __init__(self, spec: GraphSpec, module: torch.nn.Module, kv_dtype: Optional[torch.dtype] = None):
        super().__init__(spec)
        self.module = module
        if kv_dtype is not None:   # the backend's dtype replaces the manifest's for the K/V
            self._dtypes.update({n: kv_dtype for n in self._dtypes if n.startswith((f"{PAST}_", f"{NEW}_"))})

    @torch.no_grad()
    def infer_impl(self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        result = self.module(*(inputs[t.name] for t in self.spec.inputs))
        result = result if isinstance(result, tuple) else (result,)
        for info, value in zip(self.spec.outputs, result):
            outputs[info.name].copy_(value)

    def close(self) -> None:
        super().close()
        self.module = None


class TorchStepRunner(TorchRunner):
    """A step graph: :class:`CachedStepGraph` over the cache prefix when the new slots follow the past,
    else the exported :class:`StepGraph`; optional CUDA-graph replay of repeated calls."""

    def __init__(self, spec: GraphSpec, module: torch.nn.Module, cached: torch.nn.Module,
                 kv_dtype: Optional[torch.dtype], cuda_graphs: bool = False):
        super().__init__(spec, module, kv_dtype)
        self.cached = cached
        self.layers = sum(t.name.startswith(f"{PAST}_k_") for t in spec.inputs)
        self.cuda_graphs = cuda_graphs
        self._seen: set[tuple] = set()
        self._graphs: "OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, dict]]" = OrderedDict()

    @torch.no_grad()
    def _run(self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        spans = []
        for l in range(self.layers):
            for kv in "kv":
                span = _span(inputs[f"{PAST}_{kv}_{l}"], outputs[f"{NEW}_{kv}_{l}"])
                if span is None:   # separate buffers: the exported two-part attention
                    return super().infer_impl(inputs, outputs)
                spans.append(span)
        a, b = self.cached(inputs[TOKENS], inputs[ROPE_COS], inputs[ROPE_SIN], *spans)
        outputs[SCALE].copy_(a)
        outputs[SHIFT].copy_(b)

    def infer_impl(self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        if not (self.cuda_graphs and inputs[TOKENS].is_cuda):
            return self._run(inputs, outputs)
        # tokens and RoPE rows are small: copied into the graph's own inputs, so only their shapes
        # key a graph; the K/V and outputs are bound by address (the cache slots of this call)
        key = tuple((n, tuple(t.shape), None if n in _COPIED else t.data_ptr())
                    for n, t in (*inputs.items(), *outputs.items()))
        entry = self._graphs.get(key)
        if entry is None and key in self._seen:   # the second call alike: capture it, replay from now on
            entry = self._capture(key, inputs, outputs)
        if entry is None:
            if len(self._seen) > 4 * 1024:   # keys of calls long past (the cache index only grows)
                self._seen.clear()
            self._seen.add(key)
            return self._run(inputs, outputs)
        self._graphs.move_to_end(key)
        graph, static = entry
        for n in _COPIED:
            static[n].copy_(inputs[n])
        graph.replay()

    def _capture(self, key: tuple, inputs, outputs) -> tuple["torch.cuda.CUDAGraph", dict]:
        """Capture one call on static copies of its small inputs (warmed up on a side stream first,
        as the CUDA-graph docs ask); each graph has its own memory pool."""
        static = {**inputs, **{n: inputs[n].clone() for n in _COPIED}}
        stream = torch.cuda.current_stream()
        side = torch.cuda.Stream()
        side.wait_stream(stream)
        with torch.cuda.stream(side):
            self._run(static, outputs)
        stream.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._run(static, outputs)
        self._graphs[key] = (graph, static)
        if len(self._graphs) > MAX_GRAPHS:
            self._graphs.popitem(last=False)[1][0].reset()
        return graph, static

    def close(self) -> None:
        if self._graphs:
            torch.cuda.synchronize()
            for graph, _ in self._graphs.values():
                graph.reset()
            self._graphs.clear()
        super().close()
        self.cached = None


class TorchBackend(Backend):
    """``torch``: the export wrappers (built by each graph's registered kind) behind the same interface."""

    name = "torch"

    def __init__(self, manifest: Manifest, checkpoint: Optional[Union[str, os.PathLike]] = None,
                 device: Union[str, torch.device, None] = None, dtype: Union[str, torch.dtype, None] = None,
                 cuda_graphs: bool = False, threads: Optional[int] = None):
        from ...checkpoint import load_checkpoint
        from ...export.weights import BlockLoader
        from ...reference import parameter_shapes
        from ...staging import sha256_file

        super().__init__()
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.host_threads = threads   # torch intra-op threads while generating (None: torch's setting)
        path = Path(checkpoint or manifest.checkpoint.get("path", ""))
        if not path.is_file():
            raise ManifestError(f"backend 'torch' needs the checkpoint the graphs came from; "
                                f"{str(path) or 'none'} not found: pass checkpoint=PATH (--checkpoint)")
        if sha256_file(path) != manifest.checkpoint.get("sha256"):
            raise ManifestError(f"checkpoint {path} is not the one {manifest.root} was exported from (sha256 differs)")
        state, _ = load_checkpoint(path, parameter_shapes(manifest.config))
        self.loader = BlockLoader(manifest.config, state)
        self.geo = manifest.geometry
        if self.device.type == "cuda":   # float32 means float32 (parity), not TF32
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False

    def kv_dtype(self, manifest_dtype: torch.dtype) -> torch.dtype:
        """The K/V dtype of a step graph whose manifest says ``manifest_dtype``."""
        return self.dtype or manifest_dtype

    def load_impl(self, spec: GraphSpec) -> GraphRunner:
        from ...export.graphs import CachedStepGraph
        from ...export.registry import graph_kind
        from ...export.weights import BlockLoader

        kind = graph_kind(spec.kind)
        # graphs of an `export --dtype fp16|bf16` take half K/V: build their modules in that dtype
        kv = self.kv_dtype(TORCH_DTYPES[next((t.dtype for t in spec.outputs if t.name.startswith(f"{NEW}_k_")),
                                             "float32")])
        loader = self.loader if kv == torch.float32 else BlockLoader(self.loader.cfg, self.loader.state, kv)
        weights = kind.runtime_weights(spec, loader)
        module = kind.build(self.geo, spec.block, weights).to(self.device)
        if not kind.flow_weights:   # text encoder, VAE: rebuilt from the source the manifest records, as exported
            return TorchRunner(spec, module)
        override = kv if self.dtype is not None else None
        if spec.kind == "step":
            return TorchStepRunner(spec, module, CachedStepGraph(module.block), override, self.cuda_graphs)
        return TorchRunner(spec, module, override)

    def release(self) -> None:
        self.loader = None

    def describe(self) -> dict:
        out = {**super().describe(), "dtype": str(self.dtype or "manifest").replace("torch.", ""),
               "cuda_graphs": self.cuda_graphs}
        if self.device.type == "cuda":
            out["gpu"] = torch.cuda.get_device_name(self.device)
        return out
