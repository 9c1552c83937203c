"""Benchmark workloads: per-graph timings with roofline fractions, end-to-end schedules/backends."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch

from ..config import load_config
from ..costs import denoiser_cost, step_cost
from ..reference.rope import rope_table
from ..reference.sampler import JacobiConfig
from .machine import timed

BENCH_CONFIG = Path(__file__).resolve().parents[2] / "benchmarks" / "configs" / "bench.yaml"


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


def _step_inputs(spec, geo, batch: int, s: int, p: int, dev) -> tuple[dict, dict]:
    k0 = spec.input("past_k_0").shape
    heads, hd = k0[2], k0[3]
    cos, sin = rope_table(geo["head_dim"], 1, 1, p + s, 0, geo["pt_seq_len"])
    c = geo["token_channels"]
    inputs = {"tokens": torch.randn(batch, s, c), "rope_cos": cos[p:].contiguous(), "rope_sin": sin[p:].contiguous()}
    outputs = {"scale": torch.empty(batch, s, c), "shift": torch.empty(batch, s, c)}
    for t in spec.inputs:
        if t.name.startswith("past_"):
            inputs[t.name] = torch.randn(p, batch, heads, hd)
    for t in spec.outputs:
        if t.name.startswith("new_"):
            outputs[t.name] = torch.empty(s, batch, heads, hd)
    return inputs, outputs


def per_graph(pipe, runs: int, peak_flops: float, bandwidth: float, label: str) -> list[dict]:
    """deep_step at S = 1, 16, 64 × several past lengths; shallow_step, forward_i, denoiser."""
    g, cfg = pipe.geo, pipe.cfg
    L, F, T = g["text_length"], g["tokens_per_frame"], g["max_frames"]
    N = T * F
    bp = 2 * min(1, g["max_batch"])  # one prompt with guidance
    rows = []

    def add(name, inputs, outputs, cost, shape):
        runner = pipe.runner(name)
        t = timed(lambda: runner.run(inputs, outputs), runs=runs)
        achieved = cost.flops / t["median"]
        rows.append({"workload": label, "graph": name, "shape": shape, "ms": round(t["median"] * 1000, 3),
                     **{f"s_{k}": v for k, v in t.items()},
                     "gflops": cost.flops / 1e9, "mbytes": cost.bytes / 1e6, "achieved_gflops": achieved / 1e9,
                     "fraction_of_peak_gemm": achieved / peak_flops,
                     "roofline_bound_s": max(cost.flops / peak_flops, cost.bytes / bandwidth)})

    spec = pipe.manifest.graph("deep_step")
    for s in (1, 16, 64):
        for p in sorted({L, L + N // 2, L + N - s}):
            ins, outs = _step_inputs(spec, g, bp, s, p, None)
            add("deep_step", ins, outs, step_cost(cfg, g["top_index"], bp, s, p), f"B={bp} S={s} P={p}")
    for k in g["shallow_blocks"][:1]:
        spec = pipe.manifest.graph(f"shallow_step_{k}")
        for s in (16, F):
            ins, outs = _step_inputs(spec, g, T, min(s, F), 0, None)
            add(f"shallow_step_{k}", ins, outs, step_cost(cfg, k, T, min(s, F), 0), f"B={T} S={min(s, F)} P=0")
    h, w, c = g["h"], g["w"], g["token_channels"]
    for k in (g["shallow_blocks"][:1] + [g["top_index"]]):
        top = k == g["top_index"]
        cos, sin = rope_table(g["head_dim"], T if top else 1, h, w, L if top else 0, g["pt_seq_len"])
        ins = {"x": torch.randn(1, T, h, w, c), "rope_cos": cos, "rope_sin": sin}
        if top:
            ins["text"] = torch.randn(1, L, g["text_width"])
        outs = {"z": torch.empty(1, T, h, w, c),
                "logdet": torch.empty((1, T * F, c) if top or not g["frame_local"] else (1, T, F, c))}
        n = T * F + (L if top else 0)
        cost = step_cost(cfg, k, 1 if top else T, n if top else F, 0)
        add(f"forward_{k}", ins, outs, cost, f"B=1 T={T}")
    if "denoiser" in pipe.manifest.graphs:
        cos, sin = rope_table(g["head_dim"], T, h, w, L, g["pt_seq_len"])
        ins = {"x": torch.randn(1, T, h, w, c), "text": torch.randn(1, L, g["text_width"]),
               "rope_cos": cos, "rope_sin": sin}
        add("denoiser", ins, {"d": torch.empty(1, T, h, w, c)}, denoiser_cost(cfg, 1, T, F), f"B=1 T={T}")
    return rows


def end_to_end(ref, pipe, y, u, noise, runs: int, guidance: float = 2.0, block: int = 16, threshold: float = 1e-3,
               label: str = "", extra_pipes: Optional[dict] = None) -> list[dict]:
    """AR, upstream-exact Jacobi and the default schedule: seconds, calls, tokens, distance to AR."""
    ar = ref.sample(noise, y, u, guidance=guidance)
    dist = lambda v: float((v - ar).norm() / ar.norm())
    up = JacobiConfig(block_size=block, max_iter=32, threshold=threshold, schedule="upstream")
    default = JacobiConfig(block_size=block, max_iter=32, threshold=threshold)
    rows = []
    out = {}
    t = timed(lambda: out.__setitem__("v", ref.sample(noise, y, u, guidance=guidance, jacobi=up)), runs=runs)
    rows.append({"workload": label, "backend": "torch reference", "precision": "fp32", "schedule": "upstream",
                 **{f"s_{k}": v for k, v in t.items()}, "deep_calls": ref.last_trace[0].steps,
                 "calls": sum(tr.steps for tr in ref.last_trace), "dist_to_ar": dist(out["v"])})
    pipes = {"ORT": pipe, **(extra_pipes or {})}
    for name, p in pipes.items():
        for schedule, jac in (("autoregressive", None), ("upstream", up), ("sliding (default)", default)):
            res = {}
            t = timed(lambda: res.__setitem__("r", p.generate(y, u, noise=noise, guidance=guidance, jacobi=jac,
                                                             denoise=False)), runs=runs)
            st = res["r"].stats
            tokens = sum(j["tokens"] for j in st["jacobi"] if j["block"] == "deep_step")
            rows.append({"workload": label, "backend": name, "precision": p.manifest.precision, "schedule": schedule,
                         **{f"s_{k}": v for k, v in t.items()}, "deep_calls": st["graph_calls"]["deep_step"],
                         "deep_tokens": tokens, "calls": st["total_graph_calls"], "dist_to_ar": dist(res["r"].raw)})
    base = rows[0]["s_median"]
    for r in rows:
        r["speedup_vs_reference_upstream"] = base / r["s_median"]
    return rows
