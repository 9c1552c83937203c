"""Backend registry: name → factory. ``make_backend``, the CLI's ``--backend`` choices and ``doctor`` read it.

A backend is one :func:`register_backend` entry: a factory ``(manifest, options) -> Backend``
that imports its engine lazily (nothing here imports onnxruntime or TensorRT), and a probe
that says, without importing the engine, why it cannot run here (None: it can)::

    @register_backend("mine", "what it runs on", probe=lambda: None)
    def _mine(manifest, options):
        from .mine_backend import MineBackend
        return MineBackend(manifest)
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from ...defaults import DEFAULT_THREAD_POOL
from ...errors import BackendUnavailable, InputError
from ...export.manifest import Manifest
from .base import Backend

#: ORT CPU thread pools: one per session, or ORT's process-wide pool shared by every session
THREAD_POOLS = ("session", "shared")


@dataclass(frozen=True)
class BackendOptions:
    """What callers may ask of a backend (each factory takes what applies to it)."""

    providers: Optional[Sequence] = None   # ort: execution providers (None: CPU, "auto": best available)
    checkpoint: Optional[str] = None       # torch: the checkpoint the graphs came from
    threads: Optional[int] = None          # ort, torch: intra-op threads
    thread_pool: str = DEFAULT_THREAD_POOL  # ort: "session" | "shared"
    device: Optional[str] = None           # torch: "cpu" (default) | "cuda" | "cuda:N"
    dtype: Optional[str] = None            # torch: "fp32" | "fp16" | "bf16" (None: the manifest's)
    cuda_graphs: bool = False              # trt, torch on CUDA: capture each repeated call once, replay it after


@dataclass(frozen=True)
class BackendEntry:
    name: str
    factory: Callable[[Manifest, BackendOptions], Backend]
    summary: str
    probe: Callable[[], Optional[str]]   # None if usable here, else why not (one line, with the fix)


BACKENDS: dict[str, BackendEntry] = {}


def register_backend(name: str, summary: str, probe: Callable[[], Optional[str]] = lambda: None):
    """Decorator registering ``factory(manifest, options) -> Backend`` under ``name``."""
    def wrap(factory: Callable[[Manifest, BackendOptions], Backend]):
        if name in BACKENDS:
            raise ValueError(f"backend {name!r} is already registered")
        BACKENDS[name] = BackendEntry(name, factory, summary, probe)
        return factory
    return wrap


def backend_names() -> tuple[str, ...]:
    """Registered backend names (the ``--backend`` choices)."""
    return tuple(BACKENDS)


def backend_status() -> dict[str, tuple[bool, Optional[str]]]:
    """name → (usable here, why not) from each backend's probe (no engine is imported)."""
    out = {}
    for name, entry in BACKENDS.items():
        why = entry.probe()
        out[name] = (why is None, why)
    return out


def make_backend(kind: str, manifest: Manifest, providers=None, checkpoint=None, threads=None,
                 thread_pool: str = DEFAULT_THREAD_POOL, device: Optional[str] = None, dtype: Optional[str] = None,
                 cuda_graphs: bool = False) -> Backend:
    """Backend by registered name (``ort`` | ``torch`` | ``trt`` | …). ``thread_pool`` (ort): ``session`` | ``shared``;
    ``device`` / ``dtype`` / ``cuda_graphs``: the torch backend's (see :mod:`.torch_backend`)."""
    if thread_pool not in THREAD_POOLS:
        raise InputError(f"unknown thread pool {thread_pool!r}: choose {' or '.join(THREAD_POOLS)}")
    entry = BACKENDS.get(kind)
    if entry is None:
        raise InputError(f"unknown backend {kind!r}: choose {', '.join(BACKENDS)}")
    if cuda_graphs and kind not in ("trt", "torch"):
        raise InputError(f"--cuda-graphs replays TensorRT engines or torch modules on CUDA: use it with --backend trt "
                         f"or torch, not {kind!r}")
    if kind != "torch" and (dtype is not None or str(device or "cpu") != "cpu"):
        raise InputError(f"device / dtype are options of --backend torch; backend {kind!r} takes its device "
                         "from its execution engine (ort: providers) and its precision from the export")
    return entry.factory(manifest, BackendOptions(providers, checkpoint, threads, thread_pool, device, dtype,
                                                  cuda_graphs))


# ------------------------------------------------------------------ built-ins
def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _probe_ort() -> Optional[str]:
    return None if _installed("onnxruntime") else "needs onnxruntime: pip install 'starflow-trt[cpu]'"


def _probe_trt() -> Optional[str]:
    import torch

    if not torch.cuda.is_available():
        return "needs an NVIDIA GPU (no CUDA device here)"
    if not _installed("tensorrt"):
        return "needs TensorRT: pip install 'starflow-trt[gpu]'"
    return None


@register_backend("ort", "ONNX Runtime: CPU EP by default, CUDA / TensorRT EPs on request", _probe_ort)
def _ort(manifest: Manifest, options: BackendOptions) -> Backend:
    from .ort_backend import OrtBackend, refuse_bf16

    refuse_bf16(manifest.graphs.values())   # before any session: one line naming the fix
    return OrtBackend(providers=options.providers, threads=options.threads,
                      shared_pool=options.thread_pool == "shared")


@register_backend("torch", "the PyTorch export wrappers, given the checkpoint, on the CPU or a CUDA GPU "
                            "(the GPU path without TensorRT)")
def _torch(manifest: Manifest, options: BackendOptions) -> Backend:
    from .torch_backend import TorchBackend

    return TorchBackend(manifest, options.checkpoint, options.device, options.dtype, options.cuda_graphs,
                        options.threads)


@register_backend("trt", "TensorRT engines of `starflow-trt build`, on an NVIDIA GPU", _probe_trt)
def _trt(manifest: Manifest, options: BackendOptions) -> Backend:
    try:
        from .trt_backend import TrtBackend
    except ImportError as exc:
        raise BackendUnavailable(f"backend 'trt' is not available here ({exc}); "
                                 "install 'starflow-trt[gpu]' on a machine with an NVIDIA GPU") from exc
    return TrtBackend(manifest, cuda_graphs=options.cuda_graphs)
