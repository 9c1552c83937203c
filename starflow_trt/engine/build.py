"""Build one TensorRT engine per graph of a graph directory (fp32 / fp16 / int8 graphs).

Precision comes from the ONNX itself (Q/DQ, FP16 tensors): networks are strongly typed
(TensorRT 11 only has strongly typed networks; on 10.x the STRONGLY_TYPED creation flag).
The legacy ``BuilderFlag.FP16`` is only offered for FP32 graphs on TensorRT <= 10 (weakly
typed). Profiles come from the manifest dims (overridable), the timing cache is reused
across graphs and runs, engines are written atomically with their metadata, and the
output directory gets a manifest whose graph entries are the engines, so
``Pipeline.from_dir(OUT, backend="trt")`` runs it.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from ..errors import BackendUnavailable, StarflowError
from ..export.manifest import Manifest, load_manifest
from ..staging import sha256_file, staged_directory
from .metadata import DeviceInfo, EngineMetadata
from .ops import check_graph_ops
from .profiles import graph_profile


@dataclass
class BuildOptions:
    opt_level: int = 3
    workspace_gb: float = 8.0
    timing_cache: Optional[Path] = None
    legacy_fp16_flag: bool = False  # weakly typed FP16 on TensorRT <= 10 (FP32 graphs only)
    bf16_text: bool = False         # with legacy_fp16_flag: BuilderFlag.BF16 for the T5 text encoder (never FP16)
    overrides: dict[str, dict[str, int]] = field(default_factory=dict)
    graphs: Optional[list[str]] = None


def build_plan(graph_dir: Path, options: BuildOptions, trt_version: str = "10") -> dict[str, Any]:
    """The exact build configuration per graph, computed without TensorRT (``--dry-run``)."""
    manifest = load_manifest(graph_dir, verify=True)
    major = int(str(trt_version).split(".")[0])
    legacy = options.legacy_fp16_flag
    if legacy and major >= 11:
        raise StarflowError("--fp16-flag (BuilderFlag.FP16) does not exist in TensorRT 11: calibrate an fp16 "
                            "graph directory (`starflow-trt calibrate --precision fp16`) instead")
    if legacy and manifest.precision != "fp32":
        raise StarflowError("--fp16-flag applies to FP32 graphs only; this directory is " + manifest.precision)
    from ..calibration.policy import builder_flags

    graphs = {}
    for name, spec in manifest.graphs.items():
        if options.graphs and name not in options.graphs:
            continue
        onnx_path = spec.trt_path or spec.path   # the TensorRT fused-attention variant when recorded
        unsupported = check_graph_ops(onnx_path, str(trt_version), strongly_typed=not legacy)
        if unsupported:
            raise StarflowError(f"graph {name} has ops TensorRT {trt_version} cannot parse: {unsupported}")
        graphs[name] = {
            "onnx": str(onnx_path), "attention": spec.trt_variant["form"] if spec.trt_variant else "portable",
            "precision": spec.precision,
            "network": "weakly typed" if legacy else "strongly typed",
            # per-kind precision policy (calibration/policy.py): e.g. no FP16 flag for the T5 text encoder
            "flags": builder_flags(spec.kind, spec.precision, legacy, options.bf16_text),
            "profile": {k: [list(s) for s in v] for k, v in graph_profile(spec, options.overrides).items()},
        }
        graphs[name].update(qdq_plan(spec))
    return {"source": str(graph_dir), "tensorrt_major": major, "builder_optimization_level": options.opt_level,
            "workspace_bytes": int(options.workspace_gb * (1 << 30)),
            "timing_cache": str(options.timing_cache) if options.timing_cache else None,
            "quantization": manifest.extra.get("quantization"), "graphs": graphs}


def qdq_plan(spec) -> dict[str, Any]:
    """What the plan says about a Q/DQ graph (empty for float graphs): its placement and type, and for FP8
    the hardware it needs (TensorRT runs FP8 GEMMs on compute capability >= 8.9: Ada, Hopper)."""
    conv = spec.extra.get("conversion", {})
    if spec.precision not in ("int8", "fp8"):
        return {}
    out = {"qdq": {k: conv.get(k) for k in ("placement", "format", "opset", "quantized_nodes", "body",
                                             "weight_scale", "attention")}}
    if spec.precision == "fp8" and conv.get("weight_scale") == "channel":
        # TensorRT documents per-channel FP8 weight scales for GEMMs on Hopper from 10.6 (release notes)
        out["requires"] = "per-channel FP8 weights: compute capability 9.0 (Hopper) and TensorRT >= 10.6"
    elif spec.precision == "fp8":
        out["requires"] = "FP8 tensor cores: compute capability >= 8.9 (Ada, Hopper)"
    if conv.get("attention") == "fp8":
        # TensorRT 10.6 release notes: FP8 MHA fusion on Ada for sequence lengths <= 3072 and head sizes <= 64;
        # 10.7: larger ones on Ada. Unfused, the BMMs still run in FP8 behind their DQs.
        out["requires"] += ("; FP8 fused attention on Ada: TensorRT >= 10.6 for S_kv <= 3072 and head size <= 64, "
                            ">= 10.7 beyond")
    if conv.get("placement", "ort") == "ort":
        out["note"] = ("Q/DQ placed for ONNX Runtime (GEMM outputs quantized too); `calibrate --placement trt` "
                       "places it where TensorRT fuses it")
    return out


def _tensorrt():
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise BackendUnavailable("building engines needs TensorRT: pip install 'starflow-trt[gpu]' on a machine "
                                 "with an NVIDIA GPU (use --dry-run to print the build plan here)") from exc
    return trt


def cuda_device() -> DeviceInfo:
    """The current CUDA device, or BackendUnavailable."""
    try:
        import torch

        available = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        available = False
    if not available:
        raise BackendUnavailable("no CUDA device here: TensorRT engines need an NVIDIA GPU "
                                 "(use --dry-run to print the build plan; `starflow-trt doctor` shows what is usable)")
    major, minor = torch.cuda.get_device_capability(0)
    return DeviceInfo(torch.cuda.get_device_name(0), f"{major}.{minor}")


def _build_one(trt, onnx_path: Path, profile: Mapping[str, Any], options: BuildOptions, strongly_typed: bool,
               timing_cache_bytes: bytes, flags: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
    """Serialized engine + updated timing cache for one ONNX graph.

    ``flags``: the plan's ``BuilderFlag`` names (weakly typed builds only); the network's creation
    flags are a separate bit mask.
    """
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    network_flags = 0
    if strongly_typed and major < 11:  # always strongly typed in 11 (the flag is deprecated there)
        network_flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data next to the file
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise StarflowError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gb * (1 << 30)))
    config.builder_optimization_level = options.opt_level
    if not strongly_typed:   # the plan's per-kind flags (FP16 / BF16); strongly typed: precision from the ONNX
        for flag in flags:
            config.set_flag(getattr(trt.BuilderFlag, flag))
    prof = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        try:
            prof.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
        except RuntimeError as exc:  # the bindings raise RuntimeError (10.x, 11.x) for an inconsistent min/opt/max
            raise StarflowError(f"profile of {name!r} in {onnx_path.name} is invalid ({lo} / {opt} / {hi}: {exc}); "
                                "fix the --shape overrides (min <= opt <= max)") from exc
    if config.add_optimization_profile(prof) < 0:
        raise StarflowError(f"TensorRT refused the optimisation profile of {onnx_path.name}; check the --shape overrides")
    cache = config.create_timing_cache(timing_cache_bytes)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        raise StarflowError("the timing cache was written by another TensorRT or GPU; delete it or pass "
                            "another --timing-cache")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise StarflowError(f"TensorRT failed to build an engine for {onnx_path} (see the log above)")
    return bytes(serialized), bytes(config.get_timing_cache().serialize())


def build_engines(graph_dir: Path, out_dir: Path, options: BuildOptions, log=print) -> Manifest:
    """Build every graph's engine into ``out_dir`` (atomically); returns the engine manifest."""
    trt = _tensorrt()
    device = cuda_device()
    plan = build_plan(graph_dir, options, trt.__version__)
    source = load_manifest(graph_dir, verify=True)
    out_dir = Path(out_dir)
    # default: the timing cache lives inside the engine directory (a rebuild with --force reuses it)
    cache_path = Path(options.timing_cache) if options.timing_cache else out_dir / "timing.cache"
    cache = cache_path.read_bytes() if cache_path.exists() else b""
    with staged_directory(out_dir, force=True, inputs=[graph_dir]) as tmp:  # CLI checks --force first
        manifest = source.derive(tmp)
        from ..media.text import carry_tokenizer

        carry_tokenizer(source, tmp)   # prompts on the engines need the export's tokenizer
        for name, item in plan["graphs"].items():
            log(f"building {name} ({item['network']}, precision {item['precision']})")
            spec = source.graph(name)
            engine, cache = _build_one(trt, Path(item["onnx"]), graph_profile(spec, options.overrides), options,
                                       not options.legacy_fp16_flag, cache, tuple(item["flags"]))
            engine_path = tmp / f"{name}.engine"
            engine_path.write_bytes(engine)
            meta = EngineMetadata(graph=name, graph_sha256=spec.sha256, precision=spec.precision,
                                  tensorrt_version=trt.__version__, gpu_name=device.name,
                                  compute_capability=device.compute_capability, profiles=item["profile"],
                                  build_options={k: v for k, v in plan.items() if k != "graphs"},
                                  engine_sha256=sha256_file(engine_path))
            meta.save(tmp / f"{name}.engine.json")
            manifest.graphs[name] = spec.derive(root=tmp, file=engine_path.name, sha256=meta.engine_sha256,
                                                extra={**spec.extra, "engine": meta.to_dict()})
        manifest.extra["engines"] = {"tensorrt": trt.__version__, "gpu": device.name,
                                     "compute_capability": device.compute_capability, "source": str(graph_dir)}
        manifest.save(tmp)
        if options.timing_cache is None:
            (tmp / "timing.cache").write_bytes(cache)
        else:  # the user's own cache file: replace it atomically
            fd, tmp_cache = tempfile.mkstemp(dir=cache_path.parent)
            with os.fdopen(fd, "wb") as fh:
                fh.write(cache)
            os.replace(tmp_cache, cache_path)
    return load_manifest(out_dir)
