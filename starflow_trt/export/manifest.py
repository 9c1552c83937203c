"""``manifest.json``: the one IO contract between export, calibration, engine build and runtime.

A graph directory holds ``*.onnx`` files (+ external data) and ``manifest.json``::

    {"format": "starflow-trt/graphs", "format_version": 3, "precision": "fp32",
     "config": {...}, "config_hash": "…", "checkpoint": {"file": "…", "sha256": "…"},
     "geometry": {...}, "opset": 18, "exporter": "…", "versions": {...},
     "graphs": {"deep_step": {"file": "deep_step.onnx", "sha256": "…", "kind": "step",
                              "block": 5, "precision": "fp32",
                              "inputs": [{"name": "tokens", "dtype": "float32",
                                          "shape": ["batch", "S", 4]}, …],
                              "outputs": […],
                              "dims": {"batch": {"min": 1, "opt": 2, "max": 8}, …}}, …},
     "content_sha256": "…"}

Symbolic input dims name a key of the graph's ``dims``; the engine builder turns
them into optimisation profiles, the runtime checks its shapes against them
(:meth:`GraphSpec.check_shapes`). Graph and tensor names are those of :mod:`.names`.

``content_sha256`` is the sha256 of the rest of the manifest (canonical JSON): a manifest
edited by hand (a raised ``max_batch``, widened dims, another graph hash) is refused on load,
as an edited graph file is refused by its own sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from ..config import ModelConfig
from ..errors import ManifestError
from ..geometry import Geometry
from ..staging import MANIFEST_FORMAT, MANIFEST_NAME, sha256_file, write_json_atomic

FORMAT_VERSION = 3
CONTENT_HASH = "content_sha256"

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int8": 1, "bool": 1}


def content_hash(data: Mapping[str, Any]) -> str:
    """sha256 of a manifest dict without its ``content_sha256`` (canonical JSON: sorted keys, no spaces)."""
    body = {k: v for k, v in data.items() if k != CONTENT_HASH}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


@dataclass(frozen=True)
class DimRange:
    """min / opt / max of one symbolic dimension (one optimisation-profile axis)."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not (0 <= self.min <= self.opt <= self.max):
            raise ManifestError(f"bad dim range min={self.min} opt={self.opt} max={self.max}: need 0 <= min <= opt <= max")

    def to_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}


@dataclass(frozen=True)
class TensorInfo:
    """A graph input or output: name, dtype name, shape (ints and symbolic dim names)."""

    name: str
    dtype: str
    shape: tuple[Union[int, str], ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TensorInfo":
        return cls(d["name"], d["dtype"], tuple(d["shape"]))

    def concrete(self, sizes: Mapping[str, int]) -> tuple[int, ...]:
        """Shape with symbolic dims replaced by ``sizes`` (KeyError names the missing dim)."""
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.shape)


@dataclass
class GraphSpec:
    """One exported graph as recorded in the manifest."""

    name: str
    file: str
    sha256: str
    kind: str
    block: Optional[int]
    precision: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    dims: dict[str, DimRange]
    external_data: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    root: Optional[Path] = None
    #: ORT-only optimised copy of this graph (contrib-op fusions, :mod:`.ort_optimize`): ``{"file", "sha256",
    #: "fusions", "external_data", "onnxruntime"}``; same IO contract, loaded by the ``ort`` backend only
    ort_variant: Optional[dict[str, Any]] = None
    #: the same graph in TensorRT's fused-attention form (:mod:`.trt_variant`): ``{"file", "sha256", "form",
    #: "external_data"}``; same IO contract, parsed by ``build`` instead of ``file``
    trt_variant: Optional[dict[str, Any]] = None

    @property
    def path(self) -> Path:
        if self.root is None:
            raise ManifestError(f"graph {self.name!r} is not attached to a directory")
        return self.root / self.file

    @property
    def ort_path(self) -> Optional[Path]:
        """Path of the ORT variant (None without one); its sha256 is checked like the graph's."""
        return self._variant_path("ORT", self.ort_variant, "re-run `starflow-trt export` (or write_ort_variants)")

    @property
    def trt_path(self) -> Optional[Path]:
        """Path of the TensorRT variant (None without one); its sha256 is checked like the graph's."""
        return self._variant_path("TensorRT", self.trt_variant, "re-run `starflow-trt export --trt-variants`")

    def _variant_path(self, label: str, variant: Optional[dict[str, Any]], remedy: str) -> Optional[Path]:
        if not variant:
            return None
        path = self.path.parent / variant["file"]
        if not path.exists():
            raise ManifestError(f"{label} variant {path} of graph {self.name!r} is missing; {remedy} or restore it")
        if sha256_file(path) != variant["sha256"]:
            raise ManifestError(f"{label} variant {path} of graph {self.name!r} was modified after it was written "
                                "(sha256 mismatch); re-create it")
        return path

    def input(self, name: str) -> TensorInfo:
        for t in self.inputs:
            if t.name == name:
                return t
        raise KeyError(f"graph {self.name!r} has no input {name!r}")

    def verify(self) -> None:
        """Raise ManifestError if the graph file is missing or differs from the exported one."""
        path = self.path
        if not path.exists():
            raise ManifestError(f"graph file {path} is missing; re-run `starflow-trt export`")
        if sha256_file(path) != self.sha256:
            raise ManifestError(f"graph file {path} was modified after export (sha256 mismatch); "
                                "re-export it or restore the original")
        for extra in self.external_data:
            if not (self.root / extra).exists():
                raise ManifestError(f"external data file {self.root / extra} of graph {self.name!r} is missing")
        self.ort_path   # the variants, when recorded, must be there and unmodified
        self.trt_path

    def profile(self, overrides: Optional[Mapping[str, Mapping[str, int]]] = None
                ) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
        """Input name → (min, opt, max) shapes from ``dims`` (``overrides`` replace dims by name)."""
        dims = dict(self.dims)
        for name, value in (overrides or {}).items():
            if name in dims:
                merged = {**dims[name].to_dict(), **dict(value)}
                dims[name] = DimRange(merged["min"], merged["opt"], merged["max"])
        out = {}
        for t in self.inputs:
            try:
                shapes = tuple(t.concrete({k: getattr(v, which) for k, v in dims.items()})
                               for which in ("min", "opt", "max"))
            except KeyError as exc:
                raise ManifestError(f"graph {self.name!r} input {t.name!r} uses dim {exc} with no range") from exc
            out[t.name] = shapes
        return out

    def check_shapes(self, shapes: Mapping[str, tuple[int, ...]],
                     outputs: Optional[Mapping[str, tuple[int, ...]]] = None) -> None:
        """Raise ManifestError if concrete shapes break the recorded contract.

        ``shapes``: every input by name; they must have the recorded ranks and fixed sizes, each
        symbolic dim one size per call within its exported range. ``outputs`` (optional): every
        output, checked the same way against the dims the inputs bound.
        """
        bound: dict[str, int] = {}
        self._check_group("input", self.inputs, shapes, bound, ranges=True)
        if outputs is not None:
            self._check_group("output", self.outputs, outputs, bound, ranges=False)

    def _check_group(self, what: str, infos: list[TensorInfo], shapes: Mapping[str, tuple[int, ...]],
                     bound: dict[str, int], ranges: bool) -> None:
        known = {t.name for t in infos}
        extra = [name for name in shapes if name not in known]
        if extra:
            raise ManifestError(f"graph {self.name!r} has no {what} {extra[0]!r} "
                                f"({what}s: {', '.join(t.name for t in infos)})")
        for t in infos:
            if t.name not in shapes:
                raise ManifestError(f"graph {self.name!r}: {what} {t.name!r} not given")
            got = tuple(shapes[t.name])
            if len(got) != len(t.shape):
                raise ManifestError(f"graph {self.name!r}: {what} {t.name!r} has rank {len(got)}, expected {len(t.shape)}")
            for want, size in zip(t.shape, got):
                if isinstance(want, int):
                    if want != size:
                        raise ManifestError(f"graph {self.name!r}: {what} {t.name!r} shape {got} != {t.shape}")
                    continue
                if bound.setdefault(want, size) != size:
                    raise ManifestError(f"graph {self.name!r}: dim {want!r} is {bound[want]} and {size} in one call")
                r = self.dims.get(want) if ranges else None
                if r is not None and not r.min <= size <= r.max:
                    raise ManifestError(f"graph {self.name!r}: dim {want}={size} outside the exported range "
                                        f"[{r.min}, {r.max}]; re-export with a larger limit")

    def derive(self, **changes: Any) -> "GraphSpec":
        """A copy with ``changes`` (e.g. ``root``, ``file``, ``sha256``, ``precision``, ``extra``).

        A copy with another ``file`` or ``sha256`` (calibrated graph, engine) drops the ORT and TensorRT
        variants, which were made from this graph, unless ``ort_variant`` / ``trt_variant`` is given too.
        """
        if "file" in changes or "sha256" in changes:
            for variant in ("ort_variant", "trt_variant"):
                changes.setdefault(variant, None)
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "sha256": self.sha256, "kind": self.kind, "block": self.block,
                "precision": self.precision, "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs],
                "dims": {k: v.to_dict() for k, v in self.dims.items()},
                "external_data": list(self.external_data), **self.extra,
                **({"ort_variant": self.ort_variant} if self.ort_variant else {}),
                **({"trt_variant": self.trt_variant} if self.trt_variant else {})}

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any], root: Optional[Path]) -> "GraphSpec":
        known = {"file", "sha256", "kind", "block", "precision", "inputs", "outputs", "dims", "external_data",
                 "ort_variant", "trt_variant"}
        try:
            return cls(name=name, file=d["file"], sha256=d["sha256"], kind=d["kind"], block=d.get("block"),
                       precision=d.get("precision", "fp32"),
                       inputs=[TensorInfo.from_dict(t) for t in d["inputs"]],
                       outputs=[TensorInfo.from_dict(t) for t in d["outputs"]],
                       dims={k: DimRange(**v) for k, v in d.get("dims", {}).items()},
                       external_data=list(d.get("external_data", [])),
                       extra={k: v for k, v in d.items() if k not in known}, root=root,
                       ort_variant=d.get("ort_variant"), trt_variant=d.get("trt_variant"))
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"manifest entry for graph {name!r} is malformed ({exc}); re-export") from exc


@dataclass
class Manifest:
    """The parsed ``manifest.json`` of a graph (or engine) directory."""

    root: Path
    precision: str
    config: ModelConfig
    config_hash: str
    checkpoint: dict[str, Any]
    geometry: Geometry
    opset: int
    exporter: str
    versions: dict[str, str]
    graphs: dict[str, GraphSpec]
    extra: dict[str, Any] = field(default_factory=dict)

    def graph(self, name: str) -> GraphSpec:
        if name not in self.graphs:
            raise ManifestError(f"graph {name!r} is not in {self.root / MANIFEST_NAME} "
                                f"(has: {', '.join(sorted(self.graphs))}); export it with --graphs")
        return self.graphs[name]

    @property
    def residual_floor(self) -> float:
        """The Jacobi residual floor calibration measured and recorded (0.0 for float exports and older
        calibrations): the stopping bound below which sweeps of these graphs stop improving."""
        return float(self.extra.get("calibration", {}).get("residual_floor", {}).get("value", 0.0))

    def derive(self, root: Union[str, os.PathLike], precision: Optional[str] = None,
               graphs: Optional[Mapping[str, GraphSpec]] = None, extra: Optional[Mapping[str, Any]] = None
               ) -> "Manifest":
        """The manifest of a directory made from this one (calibrated graphs, engines).

        Same config, geometry, checkpoint and export facts; ``root`` and ``precision`` replaced,
        ``graphs`` (default: none yet), ``extra`` merged over a copy of this one's.
        """
        return replace(self, root=Path(root), precision=precision or self.precision,
                       graphs=dict(graphs or {}), extra={**self.extra, **(extra or {})},
                       checkpoint=dict(self.checkpoint), versions=dict(self.versions))

    def relocate(self, root: Union[str, os.PathLike]) -> "Manifest":
        """Point this manifest and its graphs at ``root`` (after a staged directory was renamed)."""
        self.root = Path(root)
        for spec in self.graphs.values():
            spec.root = self.root
        return self

    def to_dict(self) -> dict[str, Any]:
        data = {"format": MANIFEST_FORMAT, "format_version": FORMAT_VERSION, "precision": self.precision,
                "config": self.config.to_dict(), "config_hash": self.config_hash,
                "checkpoint": self.checkpoint, "geometry": self.geometry.to_dict(), "opset": self.opset,
                "exporter": self.exporter, "versions": self.versions,
                "graphs": {k: g.to_dict() for k, g in self.graphs.items()}, **self.extra}
        data[CONTENT_HASH] = content_hash(data)
        return data

    def save(self, root: Optional[Union[str, os.PathLike]] = None) -> Path:
        """Write ``manifest.json`` atomically into ``root`` (default: this manifest's root)."""
        root = Path(root) if root is not None else self.root
        return write_json_atomic(root / MANIFEST_NAME, self.to_dict())


def load_manifest(directory: Union[str, os.PathLike], verify: bool = False) -> Manifest:
    """Read ``DIR/manifest.json``; ``verify`` also checks every graph file's sha256."""
    root = Path(directory)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise ManifestError(f"{root} is not a directory; pass the OUT_DIR written by `starflow-trt export`")
    if not path.exists():
        raise ManifestError(f"{path} not found: {root} is not an export/engine directory "
                            "(an interrupted export leaves none); re-run `starflow-trt export`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path} is not valid JSON ({exc}); re-export") from exc
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise ManifestError(f"{path} is not a starflow-trt manifest (no format {MANIFEST_FORMAT!r}); "
                            "pass a directory written by `starflow-trt export`")
    if data.get("format_version") != FORMAT_VERSION:
        raise ManifestError(f"{path} has format_version {data.get('format_version')}, this starflow-trt reads "
                            f"{FORMAT_VERSION}; re-export with this version")
    if data.get(CONTENT_HASH) != content_hash(data):
        raise ManifestError(f"{path} was edited after it was written (content hash mismatch): "
                            "re-export (or re-run calibrate / build), or restore the original manifest")
    known = {"format", "format_version", "precision", "config", "config_hash", "checkpoint", "geometry",
             "opset", "exporter", "versions", "graphs", CONTENT_HASH}
    try:
        config = ModelConfig.from_dict(data["config"])
        manifest = Manifest(
            root=root, precision=data["precision"], config=config, config_hash=data["config_hash"],
            checkpoint=data["checkpoint"], geometry=Geometry.from_dict(data["geometry"]), opset=int(data["opset"]),
            exporter=data["exporter"], versions=data["versions"],
            graphs={k: GraphSpec.from_dict(k, v, root) for k, v in data["graphs"].items()},
            extra={k: v for k, v in data.items() if k not in known})
    except KeyError as exc:
        raise ManifestError(f"{path} lacks field {exc}; re-export") from exc
    if config.hash() != manifest.config_hash:
        raise ManifestError(f"{path}: config does not match its config_hash (manifest edited?); re-export")
    if verify:
        for g in manifest.graphs.values():
            g.verify()
    return manifest
