"""Machine description and the roofline probes: peak GEMM rate per dtype (fp32, bf16, int8) and copy bandwidth."""

from __future__ import annotations

import os
import platform
import time

import torch


def machine_info() -> dict:
    """CPU model, cores, library versions, threads (recorded in every benchmark result)."""
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "platform": platform.platform()}
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
    except ImportError:
        pass
    return info


def _best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def peak_gemm_flops(n: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """Best FLOP/s of an n×n×n ``torch.nn.functional.linear`` in ``dtype``: the machine's practical GEMM peak
    for the op a Linear runs (bf16 on oneDNN's AMX / AVX-512 BF16 kernels where the CPU has them; measured
    on an AVX2 CPU at n = 1024, a bf16 ``a @ b`` reached 0.8 GFLOP/s where ``linear`` reached 10.9)."""
    a, w = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2.0 * n ** 3 / _best_seconds(lambda: torch.nn.functional.linear(a, w), repeats)


def peak_int8_gemm_ops(n: int = 2048, repeats: int = 10) -> float:
    """Best int8 OP/s of an n×n×n ONNX Runtime ``MatMulInteger`` (uint8 × int8 → int32) on the session options
    the INT8 graphs run with: MLAS's int8 GEMM (AMX-INT8 / VNNI kernels where the CPU has them)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from ..runtime.backends.ort_backend import session_options

    graph = helper.make_graph([helper.make_node("MatMulInteger", ["a", "b"], ["y"])], "int8_gemm_probe",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n]),
                               helper.make_tensor_value_info("b", TensorProto.INT8, [n, n])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    session = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {"a": rng.integers(0, 255, (n, n), dtype=np.uint8), "b": rng.integers(-127, 127, (n, n), dtype=np.int8)}
    return 2.0 * n ** 3 / _best_seconds(lambda: session.run(None, feed), repeats)


def _grown(probe, n_max: int, budget_s: float = 0.25, n: int = 256) -> float:
    """``probe(n)`` at the largest power-of-two n ≤ ``n_max`` whose call fits ``budget_s`` (a CPU without
    native bf16 runs a 2048³ bf16 matmul for over a minute; a native one is at its peak well before that)."""
    rate = probe(n)
    while 2 * n <= n_max and 2.0 * (2 * n) ** 3 / rate < budget_s:
        n *= 2
        rate = probe(n)
    return rate


def peak_rates(n_max: int = 2048, repeats: int = 5) -> dict[str, float]:
    """The GEMM peak of each dtype a CPU mode runs in (OP/s): ``fp32`` and ``bf16`` (torch ``linear``), ``int8``
    (ONNX Runtime's int8 GEMM), each at the largest size up to ``n_max`` that a call runs in a quarter second."""
    rates = {"fp32": _grown(lambda n: peak_gemm_flops(n, repeats), n_max),
             "bf16": _grown(lambda n: peak_gemm_flops(n, repeats, torch.bfloat16), n_max)}
    try:
        rates["int8"] = _grown(lambda n: peak_int8_gemm_ops(n, repeats), n_max)
    except ImportError:   # no onnxruntime: no INT8 rows either
        pass
    return rates


def memory_bandwidth(mbytes: int = 256, repeats: int = 5) -> float:
    """Best bytes/s of a large tensor copy (read + write counted)."""
    src = torch.empty(mbytes * (1 << 20) // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2.0 * src.numel() * 4 / best


def timed(fn, runs: int = 5, warmup: int = 1) -> dict:
    """Median / min / max seconds of ``fn()`` after warm-up."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    samples.sort()
    return {"median": samples[len(samples) // 2], "min": samples[0], "max": samples[-1], "runs": runs}
