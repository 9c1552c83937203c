"""TensorRT calibration cache (implicit INT8) in TensorRT's own text format.

Line 1: ``TRT-<version>-<Algorithm>`` (e.g. ``TRT-100300-EntropyCalibration2``); then one
``<tensor name>: <hex>`` per tensor, the hex being the big-endian IEEE float32 of
``amax / 127``. (onnxruntime's ``write_calibration_table`` writes ``name amax`` text,
which TensorRT does not read.)

Only TensorRT 8.x-10.x consume it: implicit INT8 (IInt8Calibrator, BuilderFlag.INT8)
is deprecated from 10.1 and removed in 11, where precision must come from Q/DQ graphs.
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path

ALGORITHMS = {"entropy": "EntropyCalibration2", "minmax": "MinMaxCalibration", "percentile": "EntropyCalibration2"}
#: TensorRT releases whose builder still accepts an implicit-INT8 calibration cache
IMPLICIT_INT8_VERSIONS = "8.x, 9.x, 10.x (deprecated from 10.1); removed in 11.0"


def trt_version_tag(version: str) -> int:
    """``"10.3.0"`` → 100300, ``"8.6.1"`` → 8601 (TensorRT's NV_TENSORRT_VERSION encoding)."""
    parts = [int(p) for p in version.split(".")[:3]] + [0, 0]
    major, minor, patch = parts[:3]
    return major * 10000 + minor * 100 + patch if major >= 10 else major * 1000 + minor * 100 + patch


def encode_scale(scale: float) -> str:
    return struct.pack(">f", scale).hex()


def decode_scale(text: str) -> float:
    return struct.unpack(">f", bytes.fromhex(text.strip()))[0]


def write_cache(path: str | os.PathLike, amax: dict[str, float], method: str = "entropy",
                trt_version: str = "10.3.0") -> Path:
    """Write ``name: hex(amax/127)`` lines under the ``TRT-…`` header, atomically."""
    path = Path(path)
    lines = [f"TRT-{trt_version_tag(trt_version)}-{ALGORITHMS.get(method, 'EntropyCalibration2')}"]
    lines += [f"{name}: {encode_scale(max(value, 1e-12) / 127.0)}" for name, value in sorted(amax.items())]
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def read_cache(path: str | os.PathLike) -> tuple[str, dict[str, float]]:
    """(header, {tensor: scale}) of a TensorRT calibration cache."""
    text = Path(path).read_text(encoding="ascii").splitlines()
    if not text or not text[0].startswith("TRT-"):
        raise ValueError(f"{path} is not a TensorRT calibration cache (first line must start with 'TRT-')")
    scales = {}
    for line in text[1:]:
        if line.strip():
            name, _, hexval = line.rpartition(":")
            scales[name.strip()] = decode_scale(hexval)
    return text[0], scales
