"""Benchmark workloads: per-graph timings with roofline fractions, end-to-end schedules/backends."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import torch

from ..config import load_config
from ..export import names
from ..export.registry import find_graph_kind, graph_kind
from ..reference.sampler import JacobiConfig
from ..runtime.backends.base import TORCH_DTYPES
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
        kind = find_graph_kind(spec.kind)
        if kind is None:
            continue
        for sizes in kind.bench_cases(spec, manifest.geometry):
            inputs, outputs = graph_tensors(pipe, spec, sizes)
            runner = pipe.runner(spec.name)
            t = timed(lambda: runner.run(inputs, outputs), runs=runs)
            cost = kind.cost(manifest.config, spec.block, sizes)
            achieved = cost.flops / t["median"]
            dims = kind.label_dims or tuple(sizes)
            shape = " ".join(f"{'B' if d == 'batch' else d}={sizes[d]}" for d in dims)
            rows.append({"workload": label, "graph": spec.name, "shape": shape, "ms": round(t["median"] * 1000, 3),
                         **{f"s_{k}": v for k, v in t.items()},
                         "gflops": cost.flops / 1e9, "mbytes": cost.bytes / 1e6, "achieved_gflops": achieved / 1e9,
                         "fraction_of_peak_gemm": achieved / peak_flops,
                         "roofline_bound_s": max(cost.flops / peak_flops, cost.bytes / bandwidth)})
    return rows


def _work(stats: dict) -> dict:
    """Deep-block calls and tokens evaluated, and all graph calls, of one ``generate`` result."""
    return {"deep_calls": stats["graph_calls"][names.DEEP_STEP],
            "deep_tokens": sum(j["tokens"] for j in stats["jacobi"] if j["block"] == names.DEEP_STEP),
            "calls": stats["total_graph_calls"]}


def end_to_end(ref, pipe, y, u, noise, runs: int, guidance: float = 2.0, block: int = 16, threshold: float = 1e-3,
               label: str = "", extra_pipes: Optional[dict] = None) -> list[dict]:
    """AR, upstream-exact Jacobi and the default schedule: seconds, calls, tokens, distance to AR.

    Rows are timed interleaved (one run of every row per round, ``runs`` rounds after a warm-up
    round), so a slow phase of a shared machine hits every row alike and the ratios hold.
    """
    ar = ref.sample(noise, y, u, guidance=guidance)
    dist = lambda v: float((v - ar).norm() / ar.norm())
    up = JacobiConfig(block_size=block, max_iter=32, threshold=threshold, schedule="upstream")
    default = JacobiConfig(block_size=block, max_iter=32, threshold=threshold)
    variants = [("torch reference", "fp32", "upstream",
                 lambda: ref.sample(noise, y, u, guidance=guidance, jacobi=up))]
    for name, p in {"ORT": pipe, **(extra_pipes or {})}.items():
        for schedule, jac in (("autoregressive", None), ("upstream", up), ("sliding (default)", default)):
            variants.append((name, p.manifest.precision, schedule,
                             lambda p=p, jac=jac: p.generate(y, u, noise=noise, guidance=guidance, jacobi=jac,
                                                             denoise=False)))
    outputs = [fn() for *_, fn in variants]   # warm-up round
    samples = [[] for _ in variants]
    for _ in range(runs):
        for i, (*_, fn) in enumerate(variants):
            start = time.perf_counter()
            outputs[i] = fn()
            samples[i].append(time.perf_counter() - start)
    rows = []
    for (backend, precision, schedule, _), out, t in zip(variants, outputs, samples):
        t = sorted(t)
        row = {"workload": label, "backend": backend, "precision": precision, "schedule": schedule,
               "s_median": t[len(t) // 2], "s_min": t[0], "s_max": t[-1], "s_runs": runs}
        if backend == "torch reference":
            row.update(deep_calls=ref.last_trace[0].steps, calls=sum(tr.steps for tr in ref.last_trace),
                       dist_to_ar=dist(out))
        else:
            row.update(**_work(out.stats), dist_to_ar=dist(out.raw))
        rows.append(row)
    base = rows[0]["s_median"]
    for r in rows:
        r["speedup_vs_reference_upstream"] = base / r["s_median"]
    return rows


def schedule_quality(pipe, texts: torch.Tensor, uncond: torch.Tensor, noise_shape: tuple, guidance: float,
                     label: str, block: int = 16, threshold: float = 1e-3, seed: int = 100) -> dict:
    """Upstream vs default schedule over several samples: distance to AR (median/mean/max) and work.

    One sample is not enough on these models: an early token 1e-3 off can move a later
    frame by 1e-1, so per-sample distances scatter over two decades. texts [n, L, D];
    sample i uses texts[i] and noise seeded ``seed + i``.
    """
    jac = {"upstream": JacobiConfig(block_size=block, max_iter=32, threshold=threshold, schedule="upstream"),
           "sliding (default)": JacobiConfig(block_size=block, max_iter=32, threshold=threshold)}
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
    return {"guidance": guidance, "block": block, "threshold": threshold, "rows": rows}


def op_profile(pipe, s: int = 64, p: Optional[int] = None, runs: int = 10) -> dict:
    """Where a ``deep_step`` call's time goes: ONNX Runtime's per-node profile summed by op type.

    A separate profiling session of the same graph with the pipeline's ORT options; the kernel
    times add up to a little more than the call (profiling overhead), shares are what matter.
    """
    import json
    import os
    import tempfile

    import onnxruntime as ort

    g = pipe.geo
    p = g.text_length + g.max_frames * g.tokens_per_frame // 2 if p is None else p
    spec = pipe.manifest.graph(names.DEEP_STEP)
    inputs, _ = graph_tensors(pipe, spec, {"batch": 2, "S": s, "P": p})
    feed = {k: v.numpy() for k, v in inputs.items()}
    options = pipe.backend.session_options()   # the pipeline's ORT backend: same threading
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="sftrt-prof.") as tmp:
        options.profile_file_prefix = os.path.join(tmp, "deep_step")
        session = ort.InferenceSession(str(spec.path), options, providers=["CPUExecutionProvider"])
        session.run(None, feed)
        start = time.perf_counter()
        for _ in range(runs):
            session.run(None, feed)
        wall = (time.perf_counter() - start) / runs
        with open(session.end_profiling(), encoding="utf-8") as fh:
            events = json.load(fh)
    by_op: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            op = e["args"]["op_name"]
            if op in ("MatMul", "FusedMatMul"):   # prepacked weights are not listed as inputs
                op += " (weights)" if len(e["args"].get("input_type_shape", [])) == 1 else " (activations)"
            by_op[op] = by_op.get(op, 0.0) + e["dur"] / 1e3
    total = sum(by_op.values())
    rows = [{"op": op, "ms": ms / (runs + 1), "share": ms / total}
            for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])]
    weight_ms = sum(r["ms"] for r in rows if r["op"].endswith("(weights)"))
    # fp32 weight bytes / 4 = parameters; one multiply-add per parameter and row
    cost = graph_kind(spec.kind).cost(pipe.manifest.config, spec.block, {"batch": 2, "S": s, "P": p})
    weight_flops = 2 * 2 * s * cost.weight_bytes / 4
    return {"shape": f"B=2 S={s} P={p}", "wall_ms": wall * 1e3, "ops": rows,
            "weight_gemm_gflops": weight_flops / (weight_ms / 1e3) / 1e9 if weight_ms else None}
