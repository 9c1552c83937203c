"""Where a ``deep_step`` call's time goes on ONNX Runtime (CPU), and its rate against the machine's peak GEMM.

    PYTHONPATH=. python benchmarks/profile_step.py --graphs DIR [--int8 DIR] [--s 64] [--rounds 5] [--json OUT]

For every graph directory given (FP32 export, INT8 calibration) it times ``deep_step`` at B = 2 (one prompt
with guidance), S new tokens over P cached slots (default: half the video), both as the portable graph and,
when the manifest records one, as its ORT-optimised variant (``ort_variant``). Timings are interleaved: each
round times every variant (``--runs`` calls, median) and the peak-GEMM probes, so a slow phase of a shared
machine hits every row alike; the table gives medians over ``--rounds`` rounds. Peak GEMM is measured in the
same run two ways: an n x n x n fp32 MatMul through ORT on the same threads (``ort``) and a torch matmul
(``torch``, the probe of ``starflow-trt bench``); the percentages use the higher of the two.

Then one ORT profile per variant (``SessionOptions.enable_profiling``): kernel time summed by op type.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from starflow_trt.bench.kinds import kind_bench  # noqa: E402
from starflow_trt.bench.machine import machine_info, peak_gemm_flops  # noqa: E402
from starflow_trt.bench.workloads import graph_tensors  # noqa: E402
from starflow_trt.export import names  # noqa: E402
from starflow_trt.export.manifest import load_manifest  # noqa: E402
from starflow_trt.staging import MANIFEST_NAME  # noqa: E402


def session_options(threads: int, profile_prefix: str | None = None):
    from starflow_trt.runtime.backends.ort_backend import session_options as runtime_options

    options = runtime_options()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return options


def ort_gemm_session(n: int, threads: int):
    """An ORT session of one fp32 [n, n] x [n, n] MatMul (weights as an initializer, like the graphs)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    session = ort.InferenceSession(model.SerializeToString(), session_options(threads),
                                   providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    return lambda: session.run(None, {"x": x})


def median_seconds(fn, runs: int) -> float:
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def step_variants(directory: Path, precision: str, threads: int, s: int, p: int | None) -> list[dict]:
    """The portable ``deep_step`` of ``directory`` and its ORT variant (if any): runnable feeds and costs."""
    import onnxruntime as ort

    manifest = load_manifest(directory)
    pipe = SimpleNamespace(manifest=manifest)   # what graph_tensors reads
    geo = manifest.geometry
    p = geo.text_length + geo.max_frames * geo.tokens_per_frame // 2 if p is None else p
    spec = manifest.graph(names.DEEP_STEP)
    spec.verify()   # this graph (and its ORT variant) only: the others need not be there
    sizes = {"batch": 2, "S": s, "P": p}
    inputs, _ = graph_tensors(pipe, spec, sizes)
    feed = {k: v.numpy() for k, v in inputs.items()}
    cost = kind_bench(spec.kind).cost(manifest.config, spec.block, sizes)
    paths = {"portable": spec.path}
    if spec.ort_path is not None:
        paths["ort variant"] = spec.ort_path
    out = []
    for label, path in paths.items():
        session = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
        out.append({"name": f"{precision} {label}", "path": path, "feed": feed, "flops": cost.flops,
                    "shape": f"B=2 S={s} P={p}", "run": lambda session=session, feed=feed: session.run(None, feed)})
    return out


def end_to_end(directories: dict[str, Path], threads: int, rounds: int) -> list[dict]:
    """``generate`` on the bench config (one prompt, guidance 2, default schedule, block 16, threshold 1e-3,
    same noise) with portable graphs vs ORT variants, per directory; rows timed interleaved, medians."""
    from starflow_trt.reference.sampler import JacobiConfig
    from starflow_trt.runtime import Pipeline
    from starflow_trt.runtime.backends.ort_backend import OrtBackend

    pipes = {}
    for label, directory in directories.items():
        manifest = load_manifest(directory, verify=True)
        for variants in (False, True):
            if variants and not any(s.ort_variant for s in manifest.graphs.values()):
                continue
            backend = OrtBackend(threads=threads, spin=True, ort_variants=variants)
            pipes[f"{label} {'ort variant' if variants else 'portable'}"] = Pipeline(manifest, backend)
    geo = next(iter(pipes.values())).geo
    g = torch.Generator().manual_seed(1)
    y = torch.randn(1, geo.text_length, geo.text_width, generator=g)
    u = torch.zeros_like(y)
    noise = torch.randn(1, geo.max_frames, geo.channel_size, geo.height, geo.width, generator=g)
    jacobi = JacobiConfig(block_size=16, max_iter=32, threshold=1e-3)

    def run(p):
        return p.generate(y, u, noise=noise, guidance=2.0, jacobi=jacobi, denoise=False)

    results = {k: run(p) for k, p in pipes.items()}   # warm-up (sessions created here)
    times: dict[str, list[float]] = {k: [] for k in pipes}
    for _ in range(rounds):
        for k, p in pipes.items():
            start = time.perf_counter()
            run(p)
            times[k].append(time.perf_counter() - start)
    rows = []
    for k, t in times.items():
        base = results[k.rsplit(" ", 2)[0] + " portable"].raw if k.endswith("variant") else results[k].raw
        t = sorted(t)
        rows.append({"pipeline": k, "s_median": t[len(t) // 2], "s_min": t[0], "s_max": t[-1],
                     "deep_calls": results[k].stats["graph_calls"][names.DEEP_STEP],
                     "rel_l2_vs_portable": float((results[k].raw - base).norm() / base.norm())})
    for p in pipes.values():
        p.close()
    return rows


def export_bench(graphs: Path, int8: Path | None) -> None:
    """The bench config with the benchmark's random weights, exported (and INT8-calibrated like ``bench``)."""
    from starflow_trt.bench.paths import bench_config
    from starflow_trt.bench.workloads import make_bench_checkpoint
    from starflow_trt.export.onnx_export import ExportLimits, export_graphs

    config = bench_config("bench.yaml")
    ckpt = make_bench_checkpoint(config, graphs.parent / "bench_model.pth")
    if not (graphs / MANIFEST_NAME).exists():
        export_graphs(config, ckpt, graphs, limits=ExportLimits(max_batch=1), force=True)
    if int8 is not None and not (int8 / MANIFEST_NAME).exists():
        from starflow_trt.calibration import calibrate_directory

        geo = load_manifest(graphs).geometry
        gc = torch.Generator().manual_seed(7)
        y = torch.randn(4, geo.text_length, geo.text_width, generator=gc)
        calibrate_directory(graphs, int8, "int8", text=y, uncond=torch.zeros_like(y), guidance=2.0, force=True,
                            overwrite=True, log=lambda m: None)


def op_table(path: Path, feed: dict, threads: int, runs: int) -> dict:
    """Kernel milliseconds per call by op type (per-node medians; MatMul split into weight and activation products)."""
    from starflow_trt.bench.workloads import profile_ops

    return profile_ops(path, session_options(threads), feed, runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--graphs", type=Path, required=True, help="FP32 export directory")
    parser.add_argument("--export", action="store_true",
                        help="first export the bench config (random weights) into --graphs (and calibrate --int8)")
    parser.add_argument("--ort-variants", action="store_true",
                        help="first write the ORT-optimised variants into --graphs (and --int8)")
    parser.add_argument("--int8", type=Path, default=None, help="INT8 calibration directory (optional)")
    parser.add_argument("--s", type=int, default=64)
    parser.add_argument("--p", type=int, default=None, help="cached slots (default: text + half the video)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--runs", type=int, default=10, help="calls per timing (median)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median of the medians)")
    parser.add_argument("--peak-n", type=int, default=2048)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--e2e-rounds", type=int, default=0,
                        help="also time generate end to end (portable vs ORT variants), this many interleaved rounds")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    if args.export:
        export_bench(args.graphs, args.int8)
    if args.ort_variants:
        from starflow_trt.export.ort_optimize import write_ort_variants

        for d in (args.graphs, args.int8):
            if d is not None:
                print(write_ort_variants(d))
    variants = step_variants(args.graphs, "fp32", args.threads, args.s, args.p)
    if args.int8 is not None:
        variants += step_variants(args.int8, "int8", args.threads, args.s, args.p)
    gemm = ort_gemm_session(args.peak_n, args.threads)
    gemm_flops = 2.0 * args.peak_n ** 3
    for v in variants:   # warm-up
        v["run"]()
    gemm()
    times: dict[str, list[float]] = {v["name"]: [] for v in variants}
    peaks: dict[str, list[float]] = {"ort": [], "torch": []}
    for _ in range(args.rounds):
        peaks["ort"].append(gemm_flops / median_seconds(gemm, 5))
        peaks["torch"].append(peak_gemm_flops(args.peak_n, repeats=5))
        for v in variants:
            times[v["name"]].append(median_seconds(v["run"], args.runs))

    def med(xs):
        return sorted(xs)[len(xs) // 2]

    peak = {k: med(v) for k, v in peaks.items()}
    top = max(peak.values())
    rows = []
    for v in variants:
        t = med(times[v["name"]])
        rows.append({"graph": v["name"], "shape": v["shape"], "ms": t * 1e3, "ms_min": min(times[v["name"]]) * 1e3,
                     "ms_max": max(times[v["name"]]) * 1e3, "gflops": v["flops"] / t / 1e9,
                     "of_peak": v["flops"] / t / top, "of_ort_peak": v["flops"] / t / peak["ort"],
                     "of_torch_peak": v["flops"] / t / peak["torch"]})
    profiles = {v["name"]: op_table(v["path"], v["feed"], args.threads, args.runs) for v in variants}
    result = {"machine": {**machine_info(), "threads": args.threads},
              "peak_gemm_gflops": {k: x / 1e9 for k, x in peak.items()}, "rounds": args.rounds, "runs": args.runs,
              "rows": rows, "profiles": profiles}
    print(f"peak fp32 GEMM {args.peak_n}^3: ORT {peak['ort'] / 1e9:.0f} GFLOP/s, "
          f"torch {peak['torch'] / 1e9:.0f} GFLOP/s ({args.threads} threads, {result['machine']['cpu']})")
    print(f"{'graph':22} {'shape':18} {'ms':>8} {'[min-max]':>16} {'GFLOP/s':>8} {'of peak':>8}")
    for r in rows:
        print(f"{r['graph']:22} {r['shape']:18} {r['ms']:8.2f} {r['ms_min']:7.2f}-{r['ms_max']:<8.2f} "
              f"{r['gflops']:8.1f} {r['of_peak']:8.1%}")
    for name, prof in profiles.items():
        print(f"\n{name}: kernels {prof['kernel_ms']:.2f} ms per call (profiled wall {prof['wall_ms']:.2f} ms)")
        for r in prof["ops"]:
            if r["share"] >= 0.002:
                print(f"  {r['op']:34} {r['nodes']:4d} nodes {r['ms']:8.3f} ms {r['share']:6.1%}")
    if args.e2e_rounds:
        dirs = {"fp32": args.graphs, **({"int8": args.int8} if args.int8 is not None else {})}
        result["end_to_end"] = end_to_end(dirs, args.threads, args.e2e_rounds)
        print("\ngenerate, bench config (guidance 2, default schedule, block 16, threshold 1e-3):")
        for r in result["end_to_end"]:
            print(f"  {r['pipeline']:18} {r['s_median']:7.3f} s [{r['s_min']:.3f}-{r['s_max']:.3f}]  deep calls "
                  f"{r['deep_calls']}  rel. L2 vs portable {r['rel_l2_vs_portable']:.1e}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
