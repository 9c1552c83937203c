"""Engine metadata: what an engine was built for, and the refusal of a mismatched engine.

Written as ``<graph>.engine.json`` beside each engine and copied into the engine
directory's manifest. An engine is only valid for the graph bytes, the GPU (compute
capability) and the TensorRT version it was built with.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import StarflowError


@dataclass(frozen=True)
class DeviceInfo:
    name: str
    compute_capability: str  # "8.9"


@dataclass
class EngineMetadata:
    graph: str
    graph_sha256: str
    precision: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str
    profiles: dict[str, Any]
    build_options: dict[str, Any] = field(default_factory=dict)
    engine_sha256: Optional[str] = None
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngineMetadata":
        return cls(**d)

    def save(self, path: Path) -> Path:
        from ..export.manifest import write_json_atomic

        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> "EngineMetadata":
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:
            raise StarflowError(f"engine metadata {path} is missing or unreadable ({exc}); rebuild the engine") from exc


def check_engine_metadata(meta: EngineMetadata, graph_sha256: str, device: DeviceInfo, trt_version: str) -> None:
    """Refuse an engine built for another graph, GPU or TensorRT version (one line each)."""
    if meta.graph_sha256 != graph_sha256:
        raise StarflowError(f"engine {meta.graph!r} was built from a different graph (sha256 "
                            f"{meta.graph_sha256[:12]} != {graph_sha256[:12]}); rebuild with `starflow-trt build`")
    if meta.compute_capability != device.compute_capability:
        raise StarflowError(f"engine {meta.graph!r} was built for a GPU of compute capability "
                            f"{meta.compute_capability} ({meta.gpu_name}), this GPU is {device.compute_capability} "
                            f"({device.name}); rebuild on this GPU")
    if meta.tensorrt_version != trt_version:
        raise StarflowError(f"engine {meta.graph!r} was built with TensorRT {meta.tensorrt_version}, "
                            f"this is TensorRT {trt_version}; rebuild with the installed version")
