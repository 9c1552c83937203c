"""ONNX Runtime backend: CPU EP by default, CUDA / TensorRT EPs when available; IO binding."""

from __future__ import annotations

import os
import warnings
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ...defaults import default_threads
from ...errors import BackendUnavailable
from ...export.manifest import GraphSpec
from .base import Backend, GraphRunner

NP_DTYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
             torch.int32: np.int32, torch.int8: np.int8, torch.bool: np.bool_}
PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
#: intra-op size of the process-wide ORT thread pool once this module has set it (0: ORT's default)
_SHARED_POOL: Optional[int] = None


def _shared_pool(threads: Optional[int]) -> bool:
    """Create (once per process) the global intra-op pool that CPU sessions share; False if unsupported.

    One pipeline runs a dozen sessions one after another; one shared pool serves them all without a
    second set of threads. Per-session pools come close (:meth:`OrtBackend.session_options`).
    ORT's rule: once the global pool exists, every later session of the process must use it
    (``onnxruntime.quantization`` does not, so calibrate before creating a shared-pool backend).
    """
    global _SHARED_POOL
    import onnxruntime as ort

    if not hasattr(ort, "set_global_thread_pool_sizes"):   # onnxruntime < 1.23
        return False
    if _SHARED_POOL is None:
        ort.set_global_thread_pool_sizes(threads or 0, 1)
        _SHARED_POOL = threads or 0
    elif threads and threads != _SHARED_POOL:
        warnings.warn(f"the process-wide ORT thread pool has {_SHARED_POOL or 'default'} threads; "
                      f"threads={threads} is ignored", stacklevel=3)
    return True


def session_options():
    """The ``onnxruntime.SessionOptions`` every ONNX Runtime session of the project starts from (the backend,
    verify, calibration's range probes): full graph optimisation, warnings off, exact int8 GEMMs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # ORT's default U8S8 int8 GEMM saturates its 16-bit intermediate on x86-64 without VNNI (AVX2, AVX-512F):
    # measured on an AVX2 EPYC, the toy's INT8 deep_prefill drifts to rel L2 0.150 against FP32, 0.019 with this
    # entry (= the Q/DQ maths run unfused). It selects the exact U8U8 kernel there and is a no-op on VNNI/AMX
    # CPUs (onnxruntime/core/session/onnxruntime_session_options_config_keys.h, kOrtSessionOptionsAvx2PrecisionMode).
    options.add_session_config_entry("session.x64quantprecision", "1")
    return options


def choose_providers(requested: Optional[Sequence] = None) -> list:
    """Providers to use: ``requested`` (checked against what is installed) or CPU.

    GPU providers are only taken when asked for (``providers=[...]`` or ``"auto"``):
    the default stays on the CPU EP so results are reproducible across machines.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested is None:
        return ["CPUExecutionProvider"]
    if requested == "auto":
        return [p for p in PREFERENCE if p in available]
    names = [p[0] if isinstance(p, (tuple, list)) else p for p in requested]
    missing = [n for n in names if n not in available]
    if missing:
        raise BackendUnavailable(f"ONNX Runtime providers {missing} are not available here "
                                 f"(available: {available}); install onnxruntime-gpu or choose others")
    return list(requested)


def refuse_bf16(specs) -> None:
    """One line naming the fix when a graph of ``specs`` is BF16 or has a BF16 body (``calibrate
    --high-precision-dtype bf16``): ONNX Runtime's CPU EP has no BF16 MatMul (NOT_IMPLEMENTED at session
    creation) and numpy, which its IO binding speaks, has no bfloat16."""
    specs = list(specs)
    names = [s.name for s in specs if s.precision == "bf16"]
    if names:
        raise BackendUnavailable(f"{len(names)} graph(s) of this export are bf16 ({', '.join(names[:3])}"
                                 f"{', ...' if len(names) > 3 else ''}), which ONNX Runtime cannot run (its CPU EP has "
                                 "no BF16 MatMul); use --backend torch (with --checkpoint) or trt, or re-export with "
                                 "--dtype fp16 or fp32 for --backend ort")
    bodies = [s.name for s in specs if s.extra.get("conversion", {}).get("body") == "bf16"]
    if bodies:
        raise BackendUnavailable(f"{len(bodies)} graph(s) of this directory have a bf16 body ({', '.join(bodies[:3])}"
                                 f"{', ...' if len(bodies) > 3 else ''}), which ONNX Runtime cannot run (its CPU EP "
                                 "has no BF16 MatMul); build it for --backend trt, or calibrate with "
                                 "--high-precision-dtype fp16 for --backend ort")


class OrtRunner(GraphRunner):
    def __init__(self, spec: GraphSpec, session, device_type: str):
        super().__init__(spec)
        self.session = session
        self.device_type = device_type
        self.binding = session.io_binding()

    def infer_impl(self, inputs: Mapping[str, torch.Tensor], outputs: Mapping[str, torch.Tensor]) -> None:
        binding = self.binding
        binding.clear_binding_inputs()
        binding.clear_binding_outputs()
        for name, t in inputs.items():
            if t.numel() == 0:  # an empty past (P = 0) has no address to bind
                binding.bind_cpu_input(name, np.empty(tuple(t.shape), dtype=NP_DTYPES[t.dtype]))
            else:
                binding.bind_input(name, self.device_type, t.device.index or 0, NP_DTYPES[t.dtype],
                                   tuple(t.shape), t.data_ptr())
        for name, t in outputs.items():
            binding.bind_output(name, self.device_type, t.device.index or 0, NP_DTYPES[t.dtype],
                                tuple(t.shape), t.data_ptr())
        self.session.run_with_iobinding(binding)

    def close(self) -> None:
        super().close()
        self.binding = self.session = None   # the session's memory goes with its last reference


class OrtBackend(Backend):
    """``ort``: one InferenceSession per graph.

    ``threads``: intra-op threads (None: ``$STARFLOW_TRT_THREADS``, else ORT's default of one per core).
    ``shared_pool``: CPU sessions share ORT's process-wide thread pool (faster for a pipeline of
    many graphs, but process-wide: see :func:`_shared_pool`); default: a pool per session.
    ``spin``: per-session pools spin while their session runs and stop when its run returns (default);
    False: they never spin (a wake-up per op, for hosts that must not burn idle cycles).
    ``ort_variants``: load a graph's ORT-optimised variant (contrib-op fusions, manifest
    ``ort_variant``, :mod:`starflow_trt.export.ort_optimize`) instead of the portable graph when the
    manifest records one; never under the TensorRT EP, which gets the portable graph and fuses on its own.
    """

    name = "ort"

    def __init__(self, providers: Optional[Sequence] = None, threads: Optional[int] = None,
                 cache_dir: Optional[str] = None, spin: bool = True, shared_pool: bool = False,
                 ort_variants: bool = True):
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailable("backend 'ort' needs onnxruntime: pip install 'starflow-trt[cpu]'") from exc
        super().__init__()
        self.providers = choose_providers(providers)
        self.threads = threads if threads is not None else default_threads()
        self.cache_dir = cache_dir
        self.spin = spin              # per-session pools only
        self.shared_pool = shared_pool
        names = [p[0] if isinstance(p, (tuple, list)) else p for p in self.providers]
        self.ort_variants = ort_variants and "TensorrtExecutionProvider" not in names
        first = self.providers[0] if isinstance(self.providers[0], str) else self.providers[0][0]
        on_gpu = first in ("CUDAExecutionProvider", "TensorrtExecutionProvider")
        self.device = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
        self.device_type = "cuda" if on_gpu else "cpu"
        # the pipeline's torch ops between graph calls are tiny: one thread, no pool fighting ORT's
        self.host_threads = None if on_gpu else 1

    def _provider_options(self, spec: GraphSpec) -> list:
        out = []
        for p in self.providers:
            if p == "TensorrtExecutionProvider":
                cache = os.path.join(self.cache_dir or str(spec.root / "ort_trt_cache"), spec.name)
                os.makedirs(cache, exist_ok=True)
                out.append((p, {"trt_engine_cache_enable": True, "trt_engine_cache_path": cache,
                                "trt_timing_cache_enable": True, "trt_timing_cache_path": cache,
                                "trt_fp16_enable": spec.precision == "fp16"}))
            else:
                out.append(p)
        return out

    def session_options(self):
        """:func:`session_options` with this backend's threading: what every session of this backend gets."""
        options = session_options()
        shared = _SHARED_POOL is not None or (self.shared_pool and self.device_type == "cpu")
        if shared and _shared_pool(self.threads):
            options.use_per_session_threads = False
        else:
            if self.threads:
                options.intra_op_num_threads = self.threads
            # A pool that kept spinning after its run would take the cores the next graph's pool needs; one that
            # never spins pays a wake-up per op. Spinning only during a run and stopping when it returns
            # (session.force_spinning_stop, onnxruntime_session_options_config_keys.h) avoids both. Bench config,
            # 2 cores, one video (benchmarks/ort_pools.py): Jacobi 1.035 s never spinning, 1.310 s spinning after
            # runs, 1.014 s this, 1.006 s the shared pool; autoregressive 3.560 / 3.509 / 3.307 / 3.194 s.
            options.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spin else "0")
            options.add_session_config_entry("session.force_spinning_stop", "1")
        return options

    def session(self, path: Union[str, os.PathLike], spec: Optional[GraphSpec] = None):
        """An ``onnxruntime.InferenceSession`` of ``path`` with this backend's options and providers."""
        import onnxruntime as ort

        providers = self._provider_options(spec) if spec is not None else self.providers
        return ort.InferenceSession(str(path), sess_options=self.session_options(), providers=providers)

    def graph_path(self, spec: GraphSpec):
        """The file a session of ``spec`` loads: its ORT variant when recorded and enabled, else the graph."""
        variant = spec.ort_path if self.ort_variants else None   # sha256-checked when recorded
        return variant if variant is not None else spec.path

    def load_impl(self, spec: GraphSpec) -> GraphRunner:
        refuse_bf16([spec])
        return OrtRunner(spec, self.session(self.graph_path(spec), spec), self.device_type)

    def describe(self) -> dict:
        import onnxruntime as ort

        return {"backend": self.name, "device": str(self.device), "onnxruntime": ort.__version__,
                "providers": [p if isinstance(p, str) else p[0] for p in self.providers],
                "thread_pool": "shared" if self.shared_pool and _SHARED_POOL is not None else "per session",
                "ort_variants": self.ort_variants}
