"""Run the benchmark workloads and write ``<out>/latest.{json,md}`` + PNG charts.

Configs come from the package (:mod:`.paths`); results, checkpoints and exports go under the
output directory only. :data:`FULL` is the published benchmark (about 10 minutes on 2 cores);
:data:`QUICK` is a smoke run of the same code path at small shapes (one run, a small bench
config, no toy, no INT8 unless asked; under 3 minutes on 2 cores). Its figures are not the
published ones.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from ..config import load_config
from ..errors import StarflowError
from ..sampling import JacobiConfig
from ..staging import MANIFEST_NAME
from .machine import machine_info, memory_bandwidth, peak_rates
from .paths import BenchPaths, bench_config, model_config_7b
from .projection import ScheduleWork, projection_table, stage_projection_table
from .report import write
from .workloads import cpu_modes, end_to_end, make_bench_checkpoint, op_profile, per_graph, schedule_quality


@dataclass(frozen=True)
class BenchPlan:
    """What one run measures: the bench config workload, optionally the toy, optionally INT8."""

    runs: int = 5                 # timed runs per measurement (median reported)
    int8: bool = True             # INT8 calibration + per-graph INT8 rows (+ toy INT8 end to end)
    config: str = "bench.yaml"    # packaged bench config (starflow_trt/bench/configs)
    label: str = "bench config"   # its name in the result tables
    samples: int = 8              # schedule-quality samples on the bench config
    toy: bool = True              # the bundled toy model workloads
    toy_samples: int = 16         # schedule-quality prompts on the toy
    quick: bool = False
    compile_peer: bool = True     # a reference row under torch.compile (bench config)
    upstream: Optional[str] = None   # a user's apple/ml-starflow checkout: upstream rows (bench config)

    @property
    def int8_label(self) -> str:
        return "bench int8" if self.label == "bench config" else f"{self.label} int8"


FULL = BenchPlan()
QUICK = BenchPlan(runs=1, int8=False, config="bench_quick.yaml", label="bench quick", samples=2, toy=False,
                  toy_samples=0, quick=True, compile_peer=False)


def bench_plan(quick: bool = False, runs: Optional[int] = None, int8: Optional[bool] = None) -> BenchPlan:
    """:data:`QUICK` or :data:`FULL` with ``runs`` / ``int8`` overridden where given."""
    base = QUICK if quick else FULL
    plan = replace(base, runs=base.runs if runs is None else runs, int8=base.int8 if int8 is None else int8)
    if plan.runs < 1:
        raise StarflowError(f"--runs must be at least 1, got {plan.runs}")
    return plan


def run_benchmarks(out_dir: Union[str, Path, None] = None, cache: Union[str, Path, None] = None,
                   runs: Optional[int] = None, int8: Optional[bool] = None, log: Callable[[str], None] = print,
                   quick: bool = False, upstream: Union[str, Path, None] = None,
                   compile_peer: Optional[bool] = None) -> dict:
    """Run the plan (:func:`bench_plan`) and write its results under ``out_dir`` (default ``./bench_out``).

    ``upstream``: a user's apple/ml-starflow checkout; its sampler gets rows on the bench config
    (:mod:`.peers`). ``compile_peer``: a row for the reference sampler under ``torch.compile``
    (default: on, off for ``quick``: compiling takes about a minute on 2 cores).

    ``cache`` (default ``out_dir/.cache``) keeps the random checkpoint, exports and calibrations
    between runs; delete it after changing the exporter or the calibration.
    """
    plan = bench_plan(quick, runs, int8)
    plan = replace(plan, upstream=None if upstream is None else str(upstream),
                   compile_peer=plan.compile_peer if compile_peer is None else compile_peer)
    paths = BenchPaths.under(out_dir, cache)
    start = time.perf_counter()
    paths.cache.mkdir(parents=True, exist_ok=True)
    log("probing peak GEMM (fp32, bf16, int8) and bandwidth")
    peaks, bw = peak_rates(1024 if plan.quick else 2048), memory_bandwidth()
    peak = peaks["fp32"]
    result = {"machine": machine_info(), "runs": plan.runs, "plan": asdict(plan),
              "roofline": {"peak_gemm_gflops": peak / 1e9, "bandwidth_gbs": bw / 1e9,
                           "peak_gops": {k: v / 1e9 for k, v in peaks.items()}},
              "end_to_end": {}, "schedule_quality": {}, "per_graph": {}, "quality": {}, "cpu_modes": {}}
    dirs = _prepare(plan, paths, log)
    schedules = _bench_workloads(plan, dirs, result, peak, bw, peaks, log)
    if plan.toy:
        _toy_workloads(plan, dirs, result, peak, bw, log)
    cfg7b = load_config(model_config_7b())
    result["projection_schedules"] = [asdict(w) for w in schedules]
    result["projection"] = projection_table(cfg7b, schedules)
    result["stage_projection"] = _stage_projection(cfg7b, schedules, log)
    result["seconds"] = time.perf_counter() - start
    write(result, paths.out)
    return result


def _prepare(plan: BenchPlan, paths: BenchPaths, log) -> dict[str, Path]:
    """Random checkpoint, exports and INT8 calibrations (cached); returns their directories."""
    from ..export.manifest import load_manifest
    from ..export.onnx_export import ExportLimits, export_graphs

    config = bench_config(plan.config)
    stem = Path(plan.config).stem
    dirs = {"config": config, "ckpt": make_bench_checkpoint(config, paths.cache / f"{stem}_model.pth"),
            "graphs": paths.cache / f"{stem}_graphs", "int8": paths.cache / f"{stem}_int8"}
    if not (dirs["graphs"] / MANIFEST_NAME).exists():
        log(f"exporting the {plan.label}")
        export_graphs(config, dirs["ckpt"], dirs["graphs"], limits=ExportLimits(max_batch=1), force=True)
    if plan.toy:
        from ..toy import load_bundled

        toy = load_bundled()
        dirs.update(toy_graphs=paths.cache / "toy_graphs", toy_int8=paths.cache / "toy_int8")
        if not (dirs["toy_graphs"] / MANIFEST_NAME).exists():
            log("exporting the toy model")
            export_graphs(toy.config_path, toy.checkpoint_path, dirs["toy_graphs"],
                          limits=ExportLimits(max_batch=8), force=True)
    if plan.int8:
        from ..calibration import calibrate_directory
        from ..toy.calibration import toy_calibration_set

        geo = load_manifest(dirs["graphs"]).geometry
        if not (dirs["int8"] / MANIFEST_NAME).exists():
            log(f"calibrating the {plan.label} to INT8 (random prompts; random weights are no quality target)")
            gc = torch.Generator().manual_seed(7)
            calib_y = torch.randn(4, geo.text_length, geo.text_width, generator=gc)
            calibrate_directory(dirs["graphs"], dirs["int8"], "int8", text=calib_y, uncond=torch.zeros_like(calib_y),
                                guidance=2.0, force=True, overwrite=True, log=lambda m: None)
        if plan.toy and not (dirs["toy_int8"] / MANIFEST_NAME).exists():
            log("calibrating the toy model to INT8")
            text, uncond, clips = toy_calibration_set(load_manifest(dirs["toy_graphs"]), samples=16)
            calibrate_directory(dirs["toy_graphs"], dirs["toy_int8"], "int8", text=text, uncond=uncond,
                                eval_clips=clips, overwrite=True, log=lambda m: None)
    return dirs


def _peers(dirs: dict, upstream: Union[str, Path, None], compile_peer: bool, log) -> dict:
    """Peer rows for :func:`.workloads.end_to_end`: reference under torch.compile, the user's upstream checkout."""
    from ..reference import load_reference
    from .peers import compile_reference, load_upstream

    peers = {}
    if compile_peer:
        ref_c = compile_reference(load_reference(dirs["config"], dirs["ckpt"]))

        def compiled(noise, y, u, guidance, block, threshold):
            jac = JacobiConfig(block_size=block, max_iter=32, threshold=threshold, schedule="upstream")
            return ref_c.sample(noise, y, u, guidance=guidance, jacobi=jac), ref_c.last_trace
        peers["torch reference + torch.compile"] = compiled
    if upstream is not None:
        log(f"upstream sampler from {upstream} (not vendored; the user's checkout)")
        model = load_upstream(upstream, load_reference(dirs["config"], dirs["ckpt"]).cfg, dirs["ckpt"])
        peers["upstream (apple/ml-starflow)"] = lambda noise, y, u, guidance, block, threshold: model.sample(
            noise, y, u, guidance, block, threshold)
    return peers


def _stage_projection(cfg, schedules: list[ScheduleWork], log) -> list[dict]:
    """Text / flow / VAE-decode projection with the default schedule; empty without diffusers (VAE FLOPs)."""
    from ..runtime.pipeline import DEFAULT_SCHEDULE

    default = next((w for w in schedules if w.name.split()[0] == DEFAULT_SCHEDULE), schedules[-1])
    try:
        return stage_projection_table(cfg, default)
    except ImportError as exc:   # the VAE FLOP count needs diffusers ([media])
        log(f"stage projection skipped: {exc}")
        return []


def _bench_workloads(plan: BenchPlan, dirs: dict, result: dict, peak: float, bw: float, peaks: dict,
                     log) -> list[ScheduleWork]:
    """Random-weight bench config: end to end (+ peers, + INT8), CPU modes, schedules (+ INT8), per graph
    (+ INT8), op profile. Returns each schedule's measured deep work (the 7B projections' input).
    Every ORT pipeline is what ``Pipeline.from_dir(d)`` gives by default."""
    from ..reference import load_reference
    from ..runtime import Pipeline

    peers = _peers(dirs, plan.upstream, plan.compile_peer, log)
    ref, pipe = load_reference(dirs["config"], dirs["ckpt"]), Pipeline.from_dir(dirs["graphs"])
    pipe8 = Pipeline.from_dir(dirs["int8"], precision="int8") if plan.int8 else None
    geo = pipe.geo
    g = torch.Generator().manual_seed(1)
    y = torch.randn(1, geo.text_length, geo.text_width, generator=g)
    u = torch.zeros_like(y)
    noise = torch.randn(1, geo.max_frames, geo.channel_size, geo.height, geo.width, generator=g)
    log(f"{plan.label}: end to end (guidance 2, block 16, threshold 1e-3)")
    rows = end_to_end(ref, pipe, y, u, noise, plan.runs, label="bench", peers=peers,
                      extra_pipes={"ORT INT8": pipe8} if pipe8 is not None else None)
    result["end_to_end"][plan.label] = rows
    log(f"{plan.label}: CPU modes (ORT FP32, ORT INT8, torch FP32, torch bf16)")
    result["cpu_modes"][plan.label] = cpu_modes(ref, _cpu_mode_pipes(dirs, pipe, pipe8), y, u, noise, plan.runs,
                                                peaks, label="bench", peers={k: v for k, v in peers.items()
                                                                             if k.startswith("upstream")})
    log(f"{plan.label}: schedules over {plan.samples} samples")
    gq = torch.Generator().manual_seed(3)
    texts = torch.randn(plan.samples, geo.text_length, geo.text_width, generator=gq)
    result["schedule_quality"][plan.label] = schedule_quality(pipe, texts, torch.zeros_like(texts),
                                                              tuple(noise.shape), 2.0, "bench")
    if pipe8 is not None:
        result["schedule_quality"][plan.int8_label] = schedule_quality(pipe8, texts, torch.zeros_like(texts),
                                                                       tuple(noise.shape), 2.0, "bench int8")
    log(f"{plan.label}: per graph")
    result["per_graph"][plan.label] = per_graph(pipe, plan.runs, peak, bw, "bench")
    tokens = geo.max_frames * geo.tokens_per_frame
    # the profiled call (S tokens after half the video) must fit the export's context
    result["op_profile"] = op_profile(pipe, s=min(64, tokens - tokens // 2))
    if plan.int8:
        log(f"{plan.label}: per graph INT8")
        result["per_graph"][plan.int8_label] = per_graph(pipe8, plan.runs, peak, bw, "bench int8")
    # the projections' input: deep tokens and calls per generated token of every schedule, over the samples
    return [ScheduleWork.from_counts(r["schedule"], r["deep_tokens"], r["deep_calls"], r["samples"] * tokens)
            for r in result["schedule_quality"][plan.label]["rows"]]


def _cpu_mode_pipes(dirs: dict, pipe, pipe8) -> dict:
    """Row name → (pipeline, dtype, kernel) of every CPU mode: ORT FP32 and INT8 as ``Pipeline.from_dir`` gives
    them, the torch backend in FP32 and bf16 (the checkpoint the export records)."""
    from ..cpu import cpu_flags, cpu_modes as modes_here
    from ..runtime import Pipeline

    kernel = {m.name: m.kernel for m in modes_here(cpu_flags())}
    rows = {"ORT FP32": (pipe, "fp32", kernel["ORT FP32"])}
    if pipe8 is not None:
        rows["ORT INT8"] = (pipe8, "int8", kernel["ORT INT8"])
    rows["torch FP32"] = (Pipeline.from_dir(dirs["graphs"], backend="torch"), "fp32", "oneDNN / MKL fp32")
    rows["torch bf16"] = (Pipeline.from_dir(dirs["graphs"], backend="torch", dtype="bf16"), "bf16",
                          kernel["torch bf16"])
    return rows


def _toy_workloads(plan: BenchPlan, dirs: dict, result: dict, peak: float, bw: float, log) -> None:
    """Bundled toy model: end to end (+ ORT INT8 and its calibration quality), schedules, per graph."""
    from ..reference import load_reference
    from ..runtime import Pipeline
    from ..toy import PROMPTS, load_bundled

    toy = load_bundled()
    toy_pipe = Pipeline.from_dir(dirs["toy_graphs"])
    toy_ref = load_reference(toy.config_path, toy.checkpoint_path)
    extra = {}
    if plan.int8:
        pipe8 = Pipeline.from_dir(dirs["toy_int8"], precision="int8")
        extra["ORT INT8"] = pipe8
        q = pipe8.manifest.extra["quality"]
        result["quality"] = {"bpd_fp32": q["bpd_fp32"], "bpd_int8": q["bpd"], "bpd_increase": q["bpd_increase"],
                             "latent_psnr_db": q["latent_psnr_db"],
                             "graph_rel_l2_worst": {k: max(v["rel_l2"].values()) for k, v in q["graphs"].items()}}
    ty, tu = toy.encode(["a red square moving right"]), toy.encode([""])
    tg = toy_pipe.geo
    tnoise = torch.randn(1, tg.max_frames, 3, tg.height, tg.width, generator=torch.Generator().manual_seed(2))
    log("toy: end to end")
    result["end_to_end"]["toy"] = end_to_end(toy_ref, toy_pipe, ty, tu, tnoise, plan.runs, guidance=3.0, label="toy",
                                             extra_pipes=extra)
    log(f"toy: schedules over {plan.toy_samples} prompts")
    prompts = PROMPTS[:: max(1, len(PROMPTS) // plan.toy_samples)][: plan.toy_samples]
    result["schedule_quality"]["toy"] = schedule_quality(toy_pipe, toy.encode(prompts), toy.encode([""] * len(prompts)),
                                                         tuple(tnoise.shape), 3.0, "toy")
    if plan.int8:
        result["schedule_quality"]["toy int8"] = schedule_quality(extra["ORT INT8"], toy.encode(prompts),
                                                                  toy.encode([""] * len(prompts)), tuple(tnoise.shape),
                                                                  3.0, "toy int8")
    log("toy: per graph (FP32" + (", INT8)" if plan.int8 else ")"))
    result["per_graph"]["toy fp32"] = per_graph(toy_pipe, plan.runs, peak, bw, "toy fp32")
    if plan.int8:
        result["per_graph"]["toy int8"] = per_graph(extra["ORT INT8"], plan.runs, peak, bw, "toy int8")
