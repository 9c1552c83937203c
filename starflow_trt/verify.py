"""``verify``: per-graph parity of a graph or engine directory against the FP32 ONNX graphs it came from.

    report = verify_directory("graphs_int8")              # reference: the FP32 export calibrate recorded
    report = verify_directory("engines", against="graphs")  # TensorRT engines (GPU) vs FP32 ONNX
    print(report.table()); report.passed

Every graph of DIR runs beside the same-named FP32 ONNX graph of the reference on the same real
inputs, through polygraphy's comparator (``Comparator.run`` with an ONNX Runtime runner for ONNX
graphs or a TensorRT runner for ``.engine`` files; ``SimpleCompareFunc``). Inputs:

* ``inputs=CAPTURE_DIR``: the calls ``calibrate --capture-dir`` kept (``.npz`` shards);
* otherwise the reference pipeline's own sampler runs once (seed 0, guidance 2, Jacobi blocks of 16)
  on the bundled toy prompts (through the ``text_encoder`` graph when the export has one, else on
  seeded random text embeddings), scores its sample, and decodes / re-encodes it when the export has
  VAE graphs; every graph call's inputs are recorded (at most ``max_calls`` per graph, reservoir
  sampled). A graph that was never called gets seeded random inputs at its ``opt`` sizes (marked
  ``random`` in the report).

Pass rule per output (the calibration quality gate's metric): relative L2 error ``||got - ref|| / ||ref||``
over all calls <= ``tol``, checked with polygraphy's ``L2CompareFunc``; ``tol`` from the graph's precision
(:func:`default_tolerance`: the gate's limits for fp16 / int8 / fp8; TensorRT FP32 engines get TF32's
:data:`ENGINE_FP32_TOLERANCE`). polygraphy's max absolute / relative errors are reported beside it.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from .errors import BackendUnavailable, InputError, ManifestError, StarflowError
from .export.manifest import GraphSpec, Manifest, load_manifest
from .staging import MANIFEST_NAME

PathLike = Union[str, os.PathLike]

#: relative L2 error allowed per output of an FP32 ONNX graph
FP32_TOLERANCE = 1e-5
#: TensorRT runs FP32 layers in TF32 by default
ENGINE_FP32_TOLERANCE = 1e-3


def default_tolerance(precision: str, engine: bool = False) -> float:
    """Relative L2 error allowed per output for a graph of ``precision``: fp16 / bf16 / int8 / fp8 take the
    calibration gate's ``max_graph_error`` (:func:`~starflow_trt.calibration.calibrate.default_gate`; fp8's
    0.15 is E4M3's rounding on both GEMM inputs chained through a block, measured 0.04-0.05 on the toy)."""
    from .calibration.calibrate import default_gate

    if precision == "fp32":
        return ENGINE_FP32_TOLERANCE if engine else FP32_TOLERANCE
    return default_gate(precision).max_graph_error if precision in ("fp16", "bf16", "int8", "fp8") else 0.2


@dataclass
class GraphParity:
    """One graph's parity over its calls: worst output, per-output numbers, verdict."""

    name: str
    kind: str
    precision: str
    inputs: str            # "captured" | "sampled" | "random"
    calls: int
    tolerance: float
    max_abs: float
    max_rel: float
    rel_l2: float
    passed: bool
    outputs: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class VerifyReport:
    directory: str
    reference: str
    runner: str            # "onnxruntime" | "tensorrt"
    inputs: str
    graphs: list[GraphParity]

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.graphs)

    def to_dict(self) -> dict[str, Any]:
        return {"directory": self.directory, "reference": self.reference, "runner": self.runner,
                "inputs": self.inputs, "passed": self.passed, "graphs": [asdict(g) for g in self.graphs]}

    def table(self) -> str:
        head = (f"{'graph':20} {'precision':9} {'inputs':8} {'calls':>5} {'max abs':>10} {'max rel':>10} "
                f"{'rel L2':>10} {'tol':>8}  result")
        rows = [head, "-" * len(head)]
        for g in self.graphs:
            rows.append(f"{g.name:20} {g.precision:9} {g.inputs:8} {g.calls:>5} {g.max_abs:>10.3g} {g.max_rel:>10.3g} "
                        f"{g.rel_l2:>10.3g} {g.tolerance:>8.2g}  {'pass' if g.passed else 'FAIL'}")
        failed = [g.name for g in self.graphs if not g.passed]
        rows.append(f"{len(self.graphs) - len(failed)}/{len(self.graphs)} graphs pass"
                    + (f"; failing: {', '.join(failed)}" if failed else ""))
        return "\n".join(rows)


# ----------------------------------------------------------------------- reference
def recorded_reference(manifest: Manifest) -> Optional[Path]:
    """The FP32 ONNX export ``manifest``'s graphs came from, following build → calibrate records; None if unknown."""
    root, seen = manifest, set()
    while True:
        source = (root.extra.get("engines") or {}).get("source") or (root.extra.get("calibration") or {}).get("source")
        if not source or source in seen:
            return None
        seen.add(source)
        path = Path(source)
        if not path.is_absolute() and not (path / MANIFEST_NAME).is_file():   # recorded relative to another cwd
            path = root.root.parent / path.name
        if not (path / MANIFEST_NAME).is_file():
            return None
        root = load_manifest(path)
        if _is_fp32_onnx(root):
            return path


def _is_fp32_onnx(m: Manifest) -> bool:
    return m.precision == "fp32" and not m.extra.get("engines") and all(
        s.file.endswith(".onnx") for s in m.graphs.values())


def _polygraphy():
    try:
        from polygraphy.backend.onnxrt import OnnxrtRunner
        from polygraphy.comparator import Comparator
    except ImportError as exc:
        raise BackendUnavailable("verify needs polygraphy: pip install polygraphy (or pip install "
                                 "'starflow-trt[gpu]')") from exc
    try:
        from polygraphy.comparator import SimpleCompareFunc
    except ImportError:  # polygraphy < 0.50: only the factory
        from polygraphy.comparator import CompareFunc

        SimpleCompareFunc = CompareFunc.simple
    return Comparator, SimpleCompareFunc, OnnxrtRunner


def _runner(spec: GraphSpec, name: str):
    """A polygraphy runner for one graph: ONNX Runtime (CPU) for ONNX, TensorRT for ``.engine`` files."""
    _, _, OnnxrtRunner = _polygraphy()
    if spec.file.endswith(".engine"):
        try:
            from polygraphy.backend.common import BytesFromPath
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner
            import tensorrt  # noqa: F401
        except ImportError as exc:
            raise BackendUnavailable("verifying TensorRT engines needs TensorRT and a GPU: pip install "
                                     "'starflow-trt[gpu]' on a machine with an NVIDIA GPU") from exc
        return TrtRunner(EngineFromBytes(BytesFromPath(str(spec.path))), name=name)
    return OnnxrtRunner(partial(cpu_session, spec.path), name=name)


def cpu_session(path: Path):
    """An ONNX Runtime CPU session of ``path`` with the runtime's session options (a polygraphy loader: the
    runner calls it; its own ``SessionFromOnnx`` takes no session options)."""
    import onnxruntime as ort

    from .runtime.backends.ort_backend import session_options

    return ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])


# ------------------------------------------------------------------------- inputs
def sample_calls(reference: Manifest, max_calls: int = 4, seed: int = 0) -> dict[str, list[dict[str, np.ndarray]]]:
    """Run the reference pipeline's sampler once and record every graph's inputs (see module docstring)."""
    import torch

    from .calibration.capture import CallReservoir, CaptureBackend
    from .export import names as n
    from .reference.sampler import JacobiConfig
    from .runtime.backends import make_backend
    from .runtime.pipeline import Pipeline
    from .toy import PROMPTS

    geo = reference.geometry
    reservoir = CallReservoir(max_calls, seed)
    prompts = [PROMPTS[(7 * i) % len(PROMPTS)] for i in range(geo.max_batch)]
    options = dict(guidance=2.0, seed=seed, jacobi=JacobiConfig())
    with make_backend("ort", reference) as backend:
        pipe = Pipeline(reference, CaptureBackend(backend, reservoir))
        if n.TEXT_ENCODER in reference.graphs:
            y, u = pipe.encode_text(prompts)
        else:
            g = torch.Generator().manual_seed(seed)
            y = torch.randn(geo.max_batch, geo.text_length, geo.text_width, generator=g)
            u = torch.zeros_like(y)
        result = pipe.generate(y, u, **options)
        pipe.score(result.raw, y)
        if result.video is not None and n.VAE_ENCODE_FIRST in reference.graphs:
            clip = pipe.decode(result.latents).clamp(-1, 1)
            pipe.encode_video(clip)
            pipe.encode_video(clip[:, :1])
    return reservoir.calls


def _random_call(spec: GraphSpec, reference: Manifest) -> Optional[dict[str, np.ndarray]]:
    from .export.registry import find_graph_kind

    kind = find_graph_kind(spec.kind)
    if kind is None:
        return None
    sizes = {k: r.opt for k, r in spec.dims.items()}
    tensors = kind.example_inputs(spec.inputs, sizes, reference.geometry, seed=0)
    return {t.name: v.numpy() for t, v in zip(spec.inputs, tensors)}


# ------------------------------------------------------------------------ compare
def _l2_verdicts(test_iters, ref_iters, outs: Sequence[str], tolerance: float) -> dict[str, tuple[float, bool]]:
    """Output → (relative L2 error pooled over all calls, passed): polygraphy's ``L2CompareFunc`` on the
    calls' outputs flattened and concatenated, threshold ``tolerance * ||ref||``."""
    pooled_test = {o: np.concatenate([it[o].astype(np.float64).ravel() for it in test_iters]) for o in outs}
    pooled_ref = {o: np.concatenate([it[o].astype(np.float64).ravel() for it in ref_iters]) for o in outs}
    norms = {o: float(np.linalg.norm(pooled_ref[o])) for o in outs}
    try:
        from polygraphy.comparator import L2CompareFunc
        from polygraphy.comparator.struct import IterationResult
    except ImportError:  # older polygraphy: the same check in numpy
        out = {}
        for o in outs:
            d = float(np.linalg.norm(pooled_test[o] - pooled_ref[o]))
            out[o] = (d / norms[o] if norms[o] > 0 else (0.0 if d == 0 else math.inf), d <= tolerance * norms[o])
        return out
    func = L2CompareFunc(l2_threshold={o: tolerance * norms[o] for o in outs})
    verdicts = func(IterationResult(pooled_test, runner_name="test"), IterationResult(pooled_ref, runner_name="ref"))
    out = {}
    for o in outs:
        r = verdicts.get(o, False)
        d = float(r.l2_norm) if not isinstance(r, bool) else math.nan
        out[o] = (d / norms[o] if norms[o] > 0 else (0.0 if d == 0 else math.inf), bool(r))
    return out


def compare_graph(spec: GraphSpec, ref: GraphSpec, calls: Sequence[dict[str, np.ndarray]], tolerance: float,
                  inputs: str, runner_kind: str = "onnxruntime") -> GraphParity:
    """Run ``spec`` and the FP32 ``ref`` on ``calls`` with polygraphy and compare every output.

    Verdict: relative L2 error (all calls pooled) <= ``tolerance``, per output (the calibration gate's
    metric); max abs / max rel (polygraphy's max statistics over the calls) are reported beside it.
    """
    Comparator, SimpleCompareFunc, _ = _polygraphy()
    names = [t.name for t in ref.inputs]
    feeds = [{k: np.ascontiguousarray(c[k]) for k in names if k in c} for c in calls]
    missing = [k for k in names if feeds and k not in feeds[0]]
    if missing:
        raise InputError(f"captured calls of graph {spec.name} lack input(s) {', '.join(missing)}; "
                         "pass the capture directory written for this export (or omit --inputs)")
    from polygraphy.logger import G_LOGGER

    test_name, ref_name = f"{runner_kind}:{spec.name}", f"fp32-onnx:{spec.name}"
    outs = [t.name for t in ref.outputs]
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):   # its per-output log lines: the report says it all
        results = Comparator.run([_runner(spec, test_name), _runner(ref, ref_name)], data_loader=feeds)
        test_iters, ref_iters = results[0][1], results[1][1]
        # max statistics only (the verdict is the L2 check below): tolerances that never fail
        stats = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(
            check_error_stat="max", atol=math.inf, rtol=math.inf))
        l2 = _l2_verdicts(test_iters, ref_iters, outs, tolerance)
    # polygraphy >= 0.53 returns one AccuracyResult per compare function (AccuracyResults); older, the result
    stats = stats if hasattr(stats, "values") else stats[0]
    per_iter = next(iter(stats.values()))
    per_out: dict[str, dict[str, Any]] = {}
    for o in outs:
        got = [it[o] for it in per_iter if o in it and not isinstance(it[o], bool)]
        per_out[o] = {"max_abs": max((r.max_absdiff for r in got), default=math.nan),
                      "max_rel": max((r.max_reldiff for r in got), default=math.nan),
                      "rel_l2": l2[o][0], "passed": l2[o][1] and len(got) == len(per_iter)}
    worst = lambda key: max((v[key] for v in per_out.values()), default=0.0)   # noqa: E731
    return GraphParity(name=spec.name, kind=spec.kind, precision=spec.precision, inputs=inputs, calls=len(feeds),
                       tolerance=tolerance, max_abs=worst("max_abs"), max_rel=worst("max_rel"),
                       rel_l2=worst("rel_l2"), passed=all(v["passed"] for v in per_out.values()), outputs=per_out)


def verify_directory(directory: PathLike, against: Optional[PathLike] = None, inputs: Optional[PathLike] = None,
                     graphs: Optional[Sequence[str]] = None, max_calls: int = 4, tolerance: Optional[float] = None,
                     log: Callable[[str], None] = lambda _: None) -> VerifyReport:
    """Per-graph parity of ``directory`` (ONNX graphs of any precision, or TensorRT engines) against the
    FP32 ONNX graphs of ``against`` (default: the export ``directory`` was calibrated / built from)."""
    _polygraphy()   # fail fast, before any sampling
    if max_calls < 1:
        raise InputError(f"max_calls must be >= 1, got {max_calls}")
    manifest = load_manifest(directory, verify=True)
    if against is None:
        ref_dir = recorded_reference(manifest)
        if ref_dir is None:
            raise ManifestError(f"{directory} records no FP32 export it came from; pass --against REF_DIR "
                                "(the FP32 ONNX export)")
    else:
        ref_dir = Path(against)
    reference = load_manifest(ref_dir, verify=True)
    if not _is_fp32_onnx(reference):
        raise ManifestError(f"{ref_dir} is not an FP32 ONNX export (precision {reference.precision}); pass the "
                            "directory `starflow-trt export` wrote as --against")
    if Path(ref_dir).resolve() == Path(directory).resolve():
        raise InputError(f"{directory} is its own reference; pass a calibrated or engine directory, or --against")
    if reference.config_hash != manifest.config_hash:
        raise ManifestError(f"{directory} and {ref_dir} hold different models (config hashes differ); pass the "
                            "FP32 export of the same model as --against")
    names = list(graphs) if graphs else list(manifest.graphs)
    for name in names:
        if name not in manifest.graphs:
            raise InputError(f"graph {name!r} is not in {directory} (it has: {', '.join(manifest.graphs)})")
        if name not in reference.graphs:
            raise ManifestError(f"graph {name!r} of {directory} is not in the reference {ref_dir}; pass the FP32 "
                                "export it came from as --against")
    engines = any(manifest.graph(k).file.endswith(".engine") for k in names)
    if inputs is not None:
        from .calibration.capture import CaptureSet

        if not (Path(inputs) / "index.json").is_file():
            raise InputError(f"{inputs} is not a capture directory (no index.json); pass the --capture-dir of "
                             "`starflow-trt calibrate`, or omit --inputs to sample inputs")
        captured = {k: v[:max_calls] for k, v in CaptureSet.load(Path(inputs)).calls.items()}
        source = "captured"
    else:
        log("sampling graph inputs with the reference pipeline (one generate + score)")
        captured, source = sample_calls(reference, max_calls), "sampled"
    results = []
    for name in names:
        spec, ref = manifest.graph(name), reference.graph(name)
        calls, how = captured.get(name) or [], source
        if not calls:
            random_call = _random_call(ref, reference)
            calls, how = ([random_call] if random_call is not None else []), "random"
        if not calls:
            raise StarflowError(f"no inputs for graph {name!r} (kind {spec.kind} is not registered here)")
        is_engine = spec.file.endswith(".engine")
        tol = tolerance if tolerance is not None else default_tolerance(spec.precision, is_engine)
        log(f"  {name}: {len(calls)} {how} call(s)")
        results.append(compare_graph(spec, ref, calls, tol, how, "tensorrt" if is_engine else "onnxruntime"))
    return VerifyReport(directory=str(directory), reference=str(ref_dir),
                        runner="tensorrt" if engines else "onnxruntime", inputs=source, graphs=results)
