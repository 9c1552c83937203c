"""``starflow-trt doctor``: what is installed and usable here, and what each verb can do."""

from __future__ import annotations

import importlib
import platform
import sys
from typing import Any


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
        "demo": (bool(ort_version), why_ort), "bench": (bool(ort_version), why_ort),
    }
    return report


def _find(name: str):
    import importlib.util

    return importlib.util.find_spec(name)


def render(report: dict[str, Any]) -> str:
    lines = [f"python {report['python']} on {report['platform']}",
             f"torch {report['torch']} (CUDA available: {report['cuda_available']})"]
    for g in report["gpus"]:
        lines.append(f"  GPU {g['name']} (compute capability {g['compute_capability']})")
    lines.append(f"onnxruntime {report['onnxruntime'] or 'not installed'} providers: "
                 f"{', '.join(report['onnxruntime_providers']) or '-'}")
    for key in ("onnx", "onnxscript", "onnxconverter_common", "onnxslim", "tensorrt", "polygraphy", "cuda_python"):
        lines.append(f"{key}: {report[key] or 'not installed'}")
    lines.append("backends:")
    for name, b in report["backends"].items():
        lines.append(f"  {name:24} {'yes' if b['usable'] else 'no: ' + b['why']} - {b['summary']}")
    lines.append("verbs:")
    for verb, (ok, why) in report["verbs"].items():
        lines.append(f"  {verb:24} {'yes' if ok else 'no: ' + why}")
    return "\n".join(lines)
