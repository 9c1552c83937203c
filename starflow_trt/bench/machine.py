"""Machine description and the two roofline probes: peak fp32 GEMM rate and copy bandwidth."""

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


def peak_gemm_flops(n: int = 2048, repeats: int = 10) -> float:
    """Best fp32 FLOP/s of an n×n×n torch matmul (the machine's practical GEMM peak)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * n ** 3 / best


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
