"""Benchmark workloads: per-graph timings with roofline fractions, end-to-end schedules/backends."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch

from ..config import load_config
from ..costs import Cost
from ..defaults import DEFAULT_JACOBI_BLOCK, DEFAULT_JACOBI_THRESHOLD
from ..export import names
from ..export.dtypes import TORCH_DTYPES
from ..export.registry import graph_kind
from ..reference.sampler import JacobiConfig
from .kinds import find_kind_bench, kind_bench
from .machine import timed


def make_bench_checkpoint(config: Path, out: Path, seed: int = 0) -> Path:
    """Random, well-conditioned weights for ``config`` (the flow is not the identity)."""
    from ..checkpoint import save_state_dict
    from ..reference import build_model

    if out.exists():
        return out
    torch.manual_seed(seed)
    model = build_model(load_config(config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, (0.02 if "proj_out" in name else 0.5) / math.sqrt(p.shape[-1]))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_state_dict(model.state_dict(), out)
    return out


def graph_tensors(pipe, spec, sizes: dict[str, int], seed: int = 0) -> tuple[dict, dict]:
    """Random inputs and empty outputs of graph ``spec`` at ``sizes`` (every dim of its IO), from its kind."""
    kind = graph_kind(spec.kind)
    geo = pipe.manifest.geometry
    inputs = dict(zip((t.name for t in spec.inputs), kind.example_inputs(spec.inputs, sizes, geo, seed)))
    outputs = {t.name: torch.empty(t.concrete(sizes), dtype=TORCH_DTYPES[t.dtype]) for t in spec.outputs}
    return inputs, outputs


def per_graph(pipe, runs: int, peak_flops: float, bandwidth: float, label: str) -> list[dict]:
    """Every graph at the sizes its kind benchmarks (deep_step at S = 1, 16, 64 × several past lengths,
    the first shallow_step and forward_k, the top forward_k, the denoiser), with roofline fractions."""
    rows = []
    manifest = pipe.manifest
    for spec in manifest.graphs.values():
        bench = find_kind_bench(spec.kind)
        if bench is None:
            continue
        for sizes in bench.cases(spec, manifest.geometry):
            t, cost = _timed_call(pipe, spec.name, sizes, runs)
            achieved = cost.flops / t["median"]
            dims = bench.label_dims or tuple(sizes)
            shape = " ".join(f"{'B' if d == 'batch' else d}={sizes[d]}" for d in dims)
            rows.append({"workload": label, "graph": spec.name, "shape": shape, "ms": round(t["median"] * 1000, 3),
                         **{f"s_{k}": v for k, v in t.items()},
                         "gflops": cost.flops / 1e9, "mbytes": cost.bytes / 1e6, "achieved_gflops": achieved / 1e9,
                         "fraction_of_peak_gemm": achieved / peak_flops,
                         "roofline_bound_s": max(cost.flops / peak_flops, cost.bytes / bandwidth)})
    return rows


def _timed_call(pipe, name: str, sizes: dict[str, int], runs: int) -> tuple[dict, Cost]:
    """Graph ``name`` called on random inputs at ``sizes``, in the IO dtypes its runner takes (the torch
    backend's bf16 mode keeps K/V in bf16): its :func:`.machine.timed` seconds and its cost per call."""
    runner = pipe.runner(name)
    inputs, outputs = graph_tensors(pipe, runner.spec, sizes)
    inputs, outputs = ({k: t.to(runner.io_dtype(k) or t.dtype) for k, t in io.items()} for io in (inputs, outputs))
    t = timed(lambda: runner.run(inputs, outputs), runs=runs)
    return t, kind_bench(runner.spec.kind).cost(pipe.manifest.config, runner.spec.block, sizes)


def _work(stats: dict) -> dict:
    """Deep-block calls and tokens evaluated, and all graph calls, of one ``generate`` result."""
    return {"deep_calls": stats["graph_calls"][names.DEEP_STEP],
            "deep_tokens": sum(j["tokens"] for j in stats["jacobi"] if j["block"] == names.DEEP_STEP),
            "calls": stats["total_graph_calls"]}


def _schedules(block: int, threshold: float) -> list[tuple[str, Optional[JacobiConfig]]]:
    """(row label, config) of AR and every Jacobi schedule; the runtime default is labelled."""
    from ..runtime.pipeline import DEFAULT_SCHEDULE
    from ..sampling import SCHEDULES

    rows: list[tuple[str, Optional[JacobiConfig]]] = [("autoregressive", None)]
    for name in SCHEDULES:
        label = f"{name} (default)" if name == DEFAULT_SCHEDULE else name
        rows.append((label, JacobiConfig(block_size=block, max_iter=32, threshold=threshold, schedule=name)))
    return rows


def end_to_end(ref, pipe, y, u, noise, runs: int, guidance: float = 2.0, block: int = DEFAULT_JACOBI_BLOCK, threshold: float = DEFAULT_JACOBI_THRESHOLD,
               label: str = "", extra_pipes: Optional[dict] = None, peers: Optional[dict] = None) -> list[dict]:
    """AR and every Jacobi schedule per pipeline, the reference, and peers: seconds, calls, tokens, distance to AR.

    Rows are timed interleaved (one run of every row per round, ``runs`` rounds after a warm-up
    round), so a slow phase of a shared machine hits every row alike and the ratios hold.
    ``peers``: row name → ``fn(noise, y, u, guidance, block, threshold)`` returning latents, or
    ``(latents, trace)`` with the reference's ``last_trace``; its warm-up run (``s_first``: compile
    time included) is recorded, and a peer that raises is kept as a row with its ``error``.
    """
    ar = ref.sample(noise, y, u, guidance=guidance)

    def dist(v: torch.Tensor) -> float:
        return float((v - ar).norm() / ar.norm())

    up = JacobiConfig(block_size=block, max_iter=32, threshold=threshold, schedule="upstream")

    def ref_run():
        return ref.sample(noise, y, u, guidance=guidance, jacobi=up), ref.last_trace
    variants = [("torch reference", "fp32", "upstream", ref_run)]
    for name, fn in (peers or {}).items():
        variants.append((name, "fp32", "upstream",
                         lambda fn=fn: fn(noise, y, u, guidance=guidance, block=block, threshold=threshold)))
    for name, p in {"ORT": pipe, **(extra_pipes or {})}.items():
        for schedule, jac in _schedules(block, threshold):
            variants.append((name, p.manifest.precision, schedule,
                             lambda p=p, jac=jac: p.generate(y, u, noise=noise, guidance=guidance, jacobi=jac,
                                                             denoise=False)))
    outputs, first, errors = [], [], {}
    for i, (*_, fn) in enumerate(variants):   # warm-up round (torch.compile compiles here)
        start = time.perf_counter()
        try:
            outputs.append(fn())
        except Exception as e:   # a peer that cannot run is reported, not hidden
            if not 1 <= i <= len(peers or {}):
                raise
            outputs.append(None)
            errors[i] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        first.append(time.perf_counter() - start)
    samples = [[] for _ in variants]
    for _ in range(runs):
        for i, (*_, fn) in enumerate(variants):
            if i in errors:
                continue
            start = time.perf_counter()
            outputs[i] = fn()
            samples[i].append(time.perf_counter() - start)
    rows = []
    for i, ((backend, precision, schedule, _), out, t) in enumerate(zip(variants, outputs, samples)):
        row = {"workload": label, "backend": backend, "precision": precision, "schedule": schedule,
               "s_first": first[i], "s_runs": runs}
        if i in errors:
            row.update(error=errors[i], s_median=None)
            rows.append(row)
            continue
        t = sorted(t)
        row.update(s_median=t[len(t) // 2], s_min=t[0], s_max=t[-1])
        if isinstance(out, tuple):      # the reference (eager or compiled): its own trace
            out, trace = out
            row.update(deep_calls=trace[0].steps, deep_tokens=trace[0].tokens, calls=sum(tr.steps for tr in trace))
        elif isinstance(out, torch.Tensor):   # an opaque peer: only its result is seen
            row.update(deep_calls=None, deep_tokens=None, calls=None)
        else:
            row.update(**_work(out.stats))
            out = out.raw
        row["dist_to_ar"] = dist(out)
        rows.append(row)
    base = rows[0]["s_median"]
    for r in rows:
        r["speedup_vs_reference_upstream"] = base / r["s_median"] if r["s_median"] else None
    return rows


def deep_step_case(geo) -> dict[str, int]:
    """The deep step of a Jacobi chunk: one prompt with guidance (B = 2), S = 64 tokens after half the video."""
    tokens = geo.max_frames * geo.tokens_per_frame
    s = min(64, tokens - tokens // 2)
    return {"batch": 2 * min(1, geo.max_batch), "S": s, "P": geo.text_length + tokens // 2}


def cpu_modes(ref, modes: dict, y, u, noise, runs: int, peaks: dict[str, float], guidance: float = 2.0,
              block: int = DEFAULT_JACOBI_BLOCK, threshold: float = DEFAULT_JACOBI_THRESHOLD, label: str = "",
              peers: Optional[dict] = None) -> list[dict]:
    """Every CPU mode end to end on the default schedule, timed interleaved, with its quality and its rate.

    ``modes``: row name → ``(pipeline, dtype, kernel)``, the first the FP32 baseline; ``dtype`` ("fp32", "bf16",
    "int8") picks the peak in ``peaks`` (OP/s per dtype, :func:`.machine.peak_rates`); ``kernel`` says what
    runs it here (:mod:`starflow_trt.cpu`). ``peers``: row name → ``fn(noise, y, u, guidance, block,
    threshold)`` returning latents (upstream's sampler: the ratio's base when given, else the reference).

    Per row: seconds (median of ``runs`` after a warm-up round), deep calls, relative L2 distance to the
    autoregressive result, the bits/dim change of that result scored by the mode against the baseline's,
    and one deep step (:func:`deep_step_case`) in ms, GOP/s and as a fraction of its dtype's peak.
    """
    ar = ref.sample(noise, y, u, guidance=guidance)
    jac = JacobiConfig(block_size=block, threshold=threshold)   # the default schedule
    up = JacobiConfig(block_size=block, max_iter=32, threshold=threshold, schedule="upstream")
    calls = {"torch reference": lambda: ref.sample(noise, y, u, guidance=guidance, jacobi=up)}
    for name, fn in (peers or {}).items():
        calls[name] = lambda fn=fn: fn(noise, y, u, guidance=guidance, block=block, threshold=threshold)
    for name, (pipe, _, _) in modes.items():
        calls[name] = lambda pipe=pipe: pipe.generate(y, u, noise=noise, guidance=guidance, jacobi=jac, denoise=False)
    outputs = {name: fn() for name, fn in calls.items()}   # warm-up round
    samples = {name: [] for name in calls}
    for _ in range(runs):
        for name, fn in calls.items():
            start = time.perf_counter()
            outputs[name] = fn()
            samples[name].append(time.perf_counter() - start)
    base_name = next(iter(peers)) if peers else "torch reference"
    seconds = {name: sorted(t)[len(t) // 2] for name, t in samples.items()}
    rows, bpd0 = [], None
    for name in calls:
        out = outputs[name]
        row = {"workload": label, "mode": name, "s_median": seconds[name], "s_min": min(samples[name]),
               "s_max": max(samples[name]), "speedup": seconds[base_name] / seconds[name], "base": base_name}
        if name in modes:
            pipe, dtype, kernel = modes[name]
            row.update(dtype=dtype, kernel=kernel, **_work(out.stats))
            out = out.raw
            bpd = float(pipe.score(ar, y)[1].mean())
            bpd0 = bpd if bpd0 is None else bpd0
            row["bpd_change"] = bpd - bpd0
            row.update(_deep_step_rate(pipe, peaks.get(dtype), runs))
        row["dist_to_ar"] = float((out - ar).norm() / ar.norm())
        rows.append(row)
    return rows


def _deep_step_rate(pipe, peak: Optional[float], runs: int) -> dict:
    t, cost = _timed_call(pipe, names.DEEP_STEP, deep_step_case(pipe.manifest.geometry), max(3, runs))
    rate = cost.flops / t["median"]
    return {"deep_step_ms": t["median"] * 1000, "deep_step_gops": rate / 1e9,
            "peak_gops": peak / 1e9 if peak else None, "fraction_of_peak": rate / peak if peak else None}


def schedule_quality(pipe, texts: torch.Tensor, uncond: torch.Tensor, noise_shape: tuple, guidance: float,
                     label: str, block: int = DEFAULT_JACOBI_BLOCK, threshold: float = DEFAULT_JACOBI_THRESHOLD, seed: int = 100) -> dict:
    """Every Jacobi schedule over several samples: distance to AR (median/mean/max) and work.

    One sample is not enough on these models: an early token 1e-3 off can move a later
    frame by 1e-1, so per-sample distances scatter over two decades. texts [n, L, D];
    sample i uses texts[i] and noise seeded ``seed + i``.
    """
    jac = {k: v for k, v in _schedules(block, threshold) if v is not None}
    dists = {k: [] for k in jac}
    work = {k: {"deep_calls": 0, "deep_tokens": 0, "calls": 0} for k in jac}
    for i in range(texts.shape[0]):
        y, u = texts[i : i + 1], uncond[i : i + 1]
        noise = torch.randn(noise_shape, generator=torch.Generator().manual_seed(seed + i))
        ar = pipe.generate(y, u, noise=noise, guidance=guidance, denoise=False).raw
        for name, cfg in jac.items():
            r = pipe.generate(y, u, noise=noise, guidance=guidance, jacobi=cfg, denoise=False)
            dists[name].append(float((r.raw - ar).norm() / ar.norm()))
            for key, value in _work(r.stats).items():
                work[name][key] += value
    rows = []
    for name, d in dists.items():
        d = sorted(d)
        rows.append({"workload": label, "schedule": name, "samples": len(d), "dist_median": d[len(d) // 2],
                     "dist_mean": sum(d) / len(d), "dist_max": d[-1], **work[name]})
    return {"pipeline": f"{pipe.backend.name.upper()} {pipe.manifest.precision.upper()}", "guidance": guidance,
            "block": block, "threshold": threshold, "rows": rows}


#: ONNX Runtime ops that multiply by a weight matrix (when its weight is a constant)
WEIGHT_OPS = ("MatMul", "FusedMatMul", "Gemm", "FusedGemm", "MatMulInteger", "DynamicQuantizeMatMul",
              "MatMulIntegerToFloat", "QLinearMatMul")


def profile_ops(path, options, feed: dict, runs: int = 10) -> dict:
    """Kernel milliseconds per call by op type: ONNX Runtime's per-node profile of ``runs`` calls.

    Per node the median over the calls (a call preempted by another process does not skew the
    shares); MatMul-like nodes split into weight and activation products. ``options`` is an
    ``onnxruntime.SessionOptions`` (profiling is switched on here). Returns wall_ms, kernel_ms
    and ``ops`` rows {op, ms, nodes, share}, largest first.
    """
    import json
    import os
    import tempfile

    import onnxruntime as ort

    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="sftrt-prof.") as tmp:
        options.profile_file_prefix = os.path.join(tmp, "step")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        session.run(None, feed)
        start = time.perf_counter()
        for _ in range(runs):
            session.run(None, feed)
        wall = (time.perf_counter() - start) / runs
        with open(session.end_profiling(), encoding="utf-8") as fh:
            events = json.load(fh)
    per_node: dict[str, list[float]] = {}
    node_op: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            if op in WEIGHT_OPS:
                # prepacked / constant weights are not listed among the node's runtime inputs
                shapes = e["args"].get("input_type_shape", [])
                op += " (weights)" if len(shapes) == 1 or op in ("MatMulIntegerToFloat", "QLinearMatMul",
                                                                 "Gemm", "FusedGemm") else " (activations)"
            per_node.setdefault(e["name"], []).append(e["dur"] / 1e3)
            node_op[e["name"]] = op
    by_op: dict[str, float] = {}
    count: dict[str, int] = {}
    for name, durs in per_node.items():
        op = node_op[name]
        by_op[op] = by_op.get(op, 0.0) + sorted(durs)[len(durs) // 2]
        count[op] = count.get(op, 0) + 1
    total = sum(by_op.values())
    rows = [{"op": op, "ms": ms, "nodes": count[op], "share": ms / total}
            for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])]
    return {"wall_ms": wall * 1e3, "kernel_ms": total, "ops": rows}


def op_profile(pipe, s: int = 64, p: Optional[int] = None, runs: int = 10) -> dict:
    """Where a ``deep_step`` call's time goes (:func:`profile_ops` with the pipeline's ORT options).

    The kernel times add up to a little more than the call (profiling overhead); shares are what matter.
    """
    g = pipe.geo
    p = g.text_length + g.max_frames * g.tokens_per_frame // 2 if p is None else p
    spec = pipe.manifest.graph(names.DEEP_STEP)
    inputs, _ = graph_tensors(pipe, spec, {"batch": 2, "S": s, "P": p})
    feed = {k: v.numpy() for k, v in inputs.items()}
    prof = profile_ops(spec.path, pipe.backend.session_options(), feed, runs)   # the pipeline's threading
    rows, wall = prof["ops"], prof["wall_ms"] / 1e3
    weight_ms = sum(r["ms"] for r in rows if r["op"].endswith("(weights)"))
    # fp32 weight bytes / 4 = parameters; one multiply-add per parameter and row
    cost = kind_bench(spec.kind).cost(pipe.manifest.config, spec.block, {"batch": 2, "S": s, "P": p})
    weight_flops = 2 * 2 * s * cost.weight_bytes / 4
    return {"shape": f"B=2 S={s} P={p}", "wall_ms": wall * 1e3, "ops": rows,
            "weight_gemm_gflops": weight_flops / (weight_ms / 1e3) / 1e9 if weight_ms else None}
