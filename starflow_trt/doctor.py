"""``starflow-trt doctor``: what is installed and usable here, and what each verb can do."""

from __future__ import annotations

import importlib
import platform
import sys
from pathlib import Path
from typing import Any, Optional, Union


def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except Exception:  # noqa: BLE001 - any import failure means "not usable"
        return None
    return str(getattr(mod, "__version__", "installed"))


def doctor_report() -> dict[str, Any]:
    """Installed packages, devices and per-verb availability (never imports TensorRT eagerly)."""
    import torch

    report: dict[str, Any] = {"python": sys.version.split()[0], "platform": platform.platform(),
                              "torch": torch.__version__, "cuda_available": torch.cuda.is_available(), "gpus": []}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            report["gpus"].append({"name": torch.cuda.get_device_name(i), "compute_capability": f"{major}.{minor}"})
    from .cpu import cpu_features, cpu_flags, cpu_modes

    flags = cpu_flags()
    report["cpu"] = {"features": cpu_features(flags),
                     "modes": [{"name": m.name, "native": m.native, "kernel": m.kernel} for m in cpu_modes(flags)]}
    ort_version = _version("onnxruntime")
    providers: list[str] = []
    if ort_version:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    report.update({"onnxruntime": ort_version, "onnxruntime_providers": providers,
                   "onnx": _version("onnx"), "onnxscript": _version("onnxscript"),
                   "onnxconverter_common": _version("onnxconverter_common"), "onnxslim": _version("onnxslim")})
    trt = _version("tensorrt") if report["cuda_available"] else None
    report.update({"tensorrt": trt or ("not installed" if _find("tensorrt") is None else "installed, no GPU"),
                   "polygraphy": _version("polygraphy"), "cuda_python": "installed" if _find("cuda") else None})
    gpu = bool(report["gpus"]) and trt is not None
    why_gpu = None if gpu else "needs an NVIDIA GPU with TensorRT ('pip install starflow-trt[gpu]')"
    from .runtime.backends.registry import BACKENDS, backend_status

    report["backends"] = {name: {"usable": ok, "why": why, "summary": BACKENDS[name].summary}
                          for name, (ok, why) in backend_status().items()}
    why_ort = None if ort_version else "needs onnxruntime ('pip install starflow-trt[cpu]')"
    report["verbs"] = {
        "inspect": (True, None), "export": (True, None),
        "generate": (bool(ort_version), why_ort), "score": (bool(ort_version), why_ort),
        "calibrate": (bool(ort_version) and report["onnxconverter_common"] is not None,
                      why_ort or (None if report["onnxconverter_common"] else "fp16 needs onnxconverter-common")),
        "build": (gpu, why_gpu),
        **{f"generate --backend {name}": (b["usable"], b["why"]) for name, b in report["backends"].items()
           if name != "ort"},
        "demo": (bool(ort_version), why_ort),
    }
    report["bench"] = bench_checks()
    failed = [why for name, (ok, why) in report["bench"].items() if not ok and name in _BENCH_REQUIRED]
    report["verbs"]["bench"] = (not failed, "; ".join(failed) or None)
    return report


#: checks every ``bench`` run needs; the others are needed by some runs (INT8, the toy) or optional (charts)
_BENCH_REQUIRED = ("onnxruntime", "bench configs", "output directory")


def bench_checks(out: Union[str, Path, None] = None, cache: Union[str, Path, None] = None
                 ) -> dict[str, tuple[bool, Optional[str]]]:
    """What ``starflow-trt bench -o OUT`` needs: check → (usable, why not / what is lost)."""
    from .bench.paths import BENCH_CONFIGS, BenchPaths, bench_config, model_config_7b, writable_dir
    from .errors import StarflowError

    checks: dict[str, tuple[bool, Optional[str]]] = {}
    ort = _find("onnxruntime") is not None
    checks["onnxruntime"] = (ort, None if ort else "needs onnxruntime ('pip install starflow-trt[cpu]')")
    try:
        for name in BENCH_CONFIGS:
            bench_config(name)
        model_config_7b()
        checks["bench configs"] = (True, None)
    except StarflowError as exc:
        checks["bench configs"] = (False, str(exc))
    paths = BenchPaths.under(out, cache)
    why = writable_dir(paths.out) or writable_dir(paths.cache)
    checks["output directory"] = (why is None, why and f"cannot write results: {why} (choose another with -o)")
    quant = ort and _find("onnxruntime.quantization") is not None
    checks["int8"] = (quant, None if quant else "INT8 rows need onnxruntime.quantization (run with --no-int8)")
    try:
        from .toy import load_bundled

        load_bundled()
        checks["toy model"] = (True, None)
    except StarflowError as exc:
        checks["toy model"] = (False, f"{exc} (or run --quick, which skips the toy)")
    cv2 = _find("cv2") is not None
    checks["charts"] = (cv2, None if cv2 else "PNG charts need opencv-python-headless; JSON + markdown only")
    return checks


def require_bench(paths, int8: bool, toy: bool = True) -> None:
    """Raise :class:`StarflowError` (one line) if ``bench`` cannot run with these paths and options."""
    from .errors import StarflowError

    checks = bench_checks(paths.out, paths.cache)
    needed = [*_BENCH_REQUIRED, *(["int8"] if int8 else []), *(["toy model"] if toy else [])]
    for name in needed:
        ok, why = checks[name]
        if not ok:
            raise StarflowError(f"bench cannot run: {why}")


def _find(name: str):
    import importlib.util

    return importlib.util.find_spec(name)


def render(report: dict[str, Any]) -> str:
    lines = [f"python {report['python']} on {report['platform']}",
             f"torch {report['torch']} (CUDA available: {report['cuda_available']})"]
    for g in report["gpus"]:
        lines.append(f"  GPU {g['name']} (compute capability {g['compute_capability']})")
    lines.append(f"cpu: {', '.join(report['cpu']['features']) or 'no SIMD flags read'}")
    for m in report["cpu"]["modes"]:
        lines.append(f"  {m['name']:24} {'fast' if m['native'] else 'slow'}: {m['kernel']}")
    lines.append(f"onnxruntime {report['onnxruntime'] or 'not installed'} providers: "
                 f"{', '.join(report['onnxruntime_providers']) or '-'}")
    for key in ("onnx", "onnxscript", "onnxconverter_common", "onnxslim", "tensorrt", "polygraphy", "cuda_python"):
        lines.append(f"{key}: {report[key] or 'not installed'}")
    lines.append("backends:")
    for name, b in report["backends"].items():
        lines.append(f"  {name:24} {'yes' if b['usable'] else 'no: ' + b['why']} - {b['summary']}")
    lines.append("bench needs (output ./bench_out):")
    for check, (ok, why) in report["bench"].items():
        lines.append(f"  {check:24} {'yes' if ok else 'no: ' + why}")
    lines.append("verbs:")
    for verb, (ok, why) in report["verbs"].items():
        lines.append(f"  {verb:24} {'yes' if ok else 'no: ' + why}")
    return "\n".join(lines)
