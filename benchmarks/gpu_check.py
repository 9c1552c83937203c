"""The GPU check: one script for one device call, the torch backend on CUDA (no TensorRT needed).

    python benchmarks/gpu_check.py --out DIR [--device cuda|cpu] [--quick] [--only SECTION ...]

Sections, in order (one that fails is recorded with its error and the next runs):

* ``env``: python, torch, CUDA, GPU name, driver, SMs, memory, installed engines.
* ``ceilings``: measured bf16 matmul TFLOP/s and device-to-device copy GB/s (the roofline's two ceilings).
* ``goldens``: the goldens through ``Pipeline`` (backend torch, fp32, TF32 off) on the device with every
  schedule: AR, upstream / sliding / predictive Jacobi, I2V, denoising; each against its golden tolerance.
* ``toy``: the bundled toy end to end on the device (8 prompts, guidance 3, the default schedule):
  seconds and its colour / direction accuracy.
* ``bench``: the bench config (random weights) through the torch backend (fp32 every schedule, bf16,
  CUDA graphs) beside the eager reference sampler (upstream Jacobi): seconds, deep calls, distance to AR.
* ``deep_step``: the 7B-shaped deep step (random bf16 weights, batch 2 = one guided prompt) at
  S = 1 / 16 / 64 and P = 256 / 4k / 16.6k: the exported two-part form eager, the torch backend's
  SDPA over the cache prefix, and that replayed from CUDA graphs; ms, TFLOP/s, GB/s, % of the roofline.

Every section records its wall seconds and peak memory (CUDA: ``max_memory_allocated``; CPU: the
process's peak RSS). Timings are medians of several runs after warm-up, CUDA events on a GPU.
Writes DIR/gpu_check.json and DIR/gpu_check.md. ``--quick``: tiny sizes and single runs (on the CPU, a
check that the script works, well under 3 minutes); no figure of a quick run is a measurement.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from gpu_torch import random_module, timed  # noqa: E402

from starflow_trt.costs import step_cost  # noqa: E402
from starflow_trt.export.limits import ExportLimits  # noqa: E402
from starflow_trt.export.onnx_export import graphless_manifest  # noqa: E402
from starflow_trt.reference import JacobiConfig  # noqa: E402
from starflow_trt.runtime.backends.torch_backend import TorchBackend  # noqa: E402
from starflow_trt.runtime.pipeline import Pipeline  # noqa: E402

SCHEDULES = ("upstream", "sliding", "predictive")


@dataclass
class Check:
    """What the sections share: the device, the mode, the results, the measured ceilings."""

    device: torch.device
    quick: bool
    out: Path
    sections: dict = field(default_factory=dict)
    ceilings: dict = field(default_factory=dict)
    scratch: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="gpu_check_")))

    @property
    def threads(self) -> Optional[int]:
        return 1 if self.device.type == "cpu" else None   # tiny CPU models: one thread, no pool contention

    def runs(self, full: int) -> int:
        return 1 if self.quick else full

    def run(self, name: str, fn: Callable[["Check"], dict]) -> None:
        """Run one section; its rows, seconds and peak memory (or its error) go into :attr:`sections`."""
        print(f"# {name} ...", flush=True)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        t = time.perf_counter()
        entry: dict = {}
        try:
            entry.update(fn(self))
        except Exception as e:   # one failing section must not lose the others
            entry["error"] = f"{type(e).__name__}: {e}"[:2000]
            entry["trace"] = traceback.format_exc()[-3000:]
        entry["seconds"] = round(time.perf_counter() - t, 3)
        if cuda:
            torch.cuda.synchronize(self.device)
            entry["peak_mem_gib"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 3)
        else:
            entry["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
        self.sections[name] = entry
        print(f"# {name}: {entry['seconds']:.1f} s" + (f"  ERROR {entry['error']}" if "error" in entry else ""),
              flush=True)

    def pipeline(self, manifest, dtype: Optional[str] = None, cuda_graphs: bool = False) -> Pipeline:
        return Pipeline(manifest, TorchBackend(manifest, device=self.device, dtype=dtype, cuda_graphs=cuda_graphs,
                                               threads=self.threads))

    def seconds(self, fn: Callable[[], object], runs: int) -> tuple[float, object]:
        """(median wall seconds of ``runs`` runs after one warm-up, the last result)."""
        out = fn()
        times = []
        for _ in range(runs):
            self.sync()
            t = time.perf_counter()
            out = fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times), out

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


# ---------------------------------------------------------------- sections
def env(ck: Check) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(ck.device),
            "quick": ck.quick, "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    if ck.device.type == "cuda":
        p = torch.cuda.get_device_properties(ck.device)
        info.update(gpu=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                    capability=f"{p.major}.{p.minor}", cudnn=torch.backends.cudnn.version())
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            info["driver"] = f"unknown ({type(e).__name__})"
    else:
        info["cpu_threads"] = torch.get_num_threads()
    for mod in ("tensorrt", "onnxruntime", "onnx"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "present")
        except Exception as e:
            info[mod] = f"absent ({type(e).__name__})"
    return info


def ceilings(ck: Check) -> dict:
    dev = ck.device
    n = 512 if ck.quick else 8192
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    mm = timed(lambda: a @ b, dev, warmup=2, iters=ck.runs(9))
    x = torch.empty(2 ** (22 if ck.quick else 30), dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    cp = timed(lambda: y.copy_(x), dev, warmup=2, iters=ck.runs(9))
    ck.ceilings = {"tflops": 2 * n ** 3 / mm / 1e9, "gbs": 2 * x.numel() / cp / 1e6}
    return {"matmul_bf16": {"n": n, "ms": mm, "tflops": ck.ceilings["tflops"]},
            "copy": {"bytes": x.numel(), "ms": cp, "gbs": ck.ceilings["gbs"]}}


def goldens(ck: Check) -> dict:
    from tests.conftest import GOLDENS, golden_error
    from tests.test_torch_backend import TH, golden_runs

    cases = torch.load(GOLDENS / "cases.pt", weights_only=True)
    manifest = graphless_manifest(GOLDENS / "config.yaml", GOLDENS / "model.pth",
                                  ExportLimits(height=6, width=4, max_frames=3, max_batch=4))
    rows = []
    with ck.pipeline(manifest) as pipe:
        for label, (golden, kwargs) in golden_runs(cases).items():
            t = time.perf_counter()
            result = pipe.generate(cases["y"], noise=cases["noise"], **kwargs)
            err, bound = golden_error(result.latents, cases[golden], golden)
            rows.append({"run": label, "golden": golden, "max_err": err, "bound": bound, "ok": err <= bound,
                         "calls": result.stats["total_graph_calls"], "s": round(time.perf_counter() - t, 3)})
        for s in ("sliding", "predictive"):   # thresholded: no upstream golden; their distance to AR
            result = pipe.generate(cases["y"], cases["y_uncond"], noise=cases["noise"], guidance=2.0, jacobi=TH[s],
                                   denoise=False)
            err, _ = golden_error(result.latents, cases["reverse.g2"], "jacobi.th")
            rows.append({"run": f"{s}.th", "golden": "reverse.g2 (distance only)", "max_err": err,
                         "calls": result.stats["total_graph_calls"]})
    return {"rows": rows, "ok": all(r.get("ok", True) for r in rows)}


def toy(ck: Check) -> dict:
    from starflow_trt.toy import PROMPTS, load_bundled, score_clips

    bundle = load_bundled()
    manifest = graphless_manifest(bundle.config_path, bundle.checkpoint_path, ExportLimits(max_batch=8))
    prompts = PROMPTS[:2] if ck.quick else [PROMPTS[i % len(PROMPTS)] for i in range(8)]
    y, u = bundle.encode(prompts), bundle.encode([""] * len(prompts))
    rows = []
    for dtype in (None, "bf16"):
        with ck.pipeline(manifest, dtype) as pipe:
            sec, result = ck.seconds(lambda: pipe.generate(y, u, guidance=3.0, seed=0,
                                                           jacobi=JacobiConfig(block_size=16)), ck.runs(3))
        scores = score_clips(result.latents.clamp(-1, 1), prompts)
        rows.append({"dtype": dtype or "fp32", "prompts": len(prompts), "s": sec, "schedule": result.stats["schedule"],
                     "calls": result.stats["total_graph_calls"],
                     **{k: v for k, v in scores.items() if k.endswith("accuracy")}})
    return {"rows": rows}


def bench(ck: Check) -> dict:
    from starflow_trt.bench.paths import bench_config
    from starflow_trt.bench.workloads import make_bench_checkpoint
    from starflow_trt.reference import load_reference

    cfg = bench_config("bench_quick.yaml" if ck.quick else "bench.yaml")
    ckpt = make_bench_checkpoint(cfg, ck.scratch / f"{cfg.stem}_model.pth")
    manifest = graphless_manifest(cfg, ckpt, ExportLimits(max_batch=1))
    g = manifest.geometry
    gen = torch.Generator().manual_seed(2)
    noise = torch.randn(1, g.max_frames, g.channel_size, g.height, g.width, generator=gen)
    y = torch.randn(1, g.text_length, g.text_width, generator=gen)
    u = torch.zeros_like(y)
    ref = load_reference(cfg, ckpt, device=ck.device)
    dev = lambda t: t.to(ck.device)
    ar = ref.sample(dev(noise), dev(y), dev(u), guidance=2.0).cpu()
    dist = lambda v: float((v.cpu() - ar).norm() / ar.norm())
    runs = ck.runs(3)
    up = JacobiConfig(block_size=16, max_iter=32, threshold=1e-3, schedule="upstream")
    sec, out = ck.seconds(lambda: ref.sample(dev(noise), dev(y), dev(u), guidance=2.0, jacobi=up), runs)
    rows = [{"run": "eager reference sampler", "dtype": "fp32", "schedule": "upstream", "s": sec,
             "deep_calls": ref.last_trace[0].steps,   # top block first
             "dist_to_ar": dist(out)}]
    variants = [(None, False, s) for s in SCHEDULES] + [("bf16", False, "predictive")]
    if ck.device.type == "cuda":
        variants += [(None, True, "upstream"), (None, True, "predictive")]
    for dtype, graphs, schedule in variants:
        jac = replace(up, schedule=schedule)
        with ck.pipeline(manifest, dtype, graphs) as pipe:
            sec, result = ck.seconds(lambda: pipe.generate(y, u, noise=noise, guidance=2.0, jacobi=jac, denoise=False),
                                     runs)
        rows.append({"run": "torch backend" + (" + CUDA graphs" if graphs else ""), "dtype": dtype or "fp32",
                     "schedule": schedule, "s": sec, "deep_calls": result.stats["graph_calls"].get("deep_step"),
                     "dist_to_ar": dist(result.latents)})
    return {"config": cfg.name, "rows": rows}


def deep_step(ck: Check) -> dict:
    """The 7B deep block's step (random weights) through the exported form and the torch backend's runner."""
    from starflow_trt.config import load_config
    from starflow_trt.export.graphs import CachedStepGraph, StepGraph
    from starflow_trt.export.manifest import GraphSpec, TensorInfo
    from starflow_trt.export.names import NEW, PAST, ROPE_COS, ROPE_SIN, SCALE, SHIFT, TOKENS, kv_names
    from starflow_trt.reference.flow import FlowBlock
    from starflow_trt.runtime.backends.torch_backend import TorchStepRunner

    dev = ck.device
    cfg = load_config(ROOT / "starflow_trt/configs/starflow_v_7b.yaml")
    k = cfg.num_blocks - 1
    if ck.quick:
        cfg = replace(cfg, layers_per_block=tuple(cfg.layers[:-1]) + (1,), top_block_channels=256)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    block = random_module(lambda: FlowBlock(cfg, k), dev, dtype)
    heads, hd, layers, c = cfg.block_heads(k), cfg.head_dim, cfg.layers[k], cfg.token_channels
    L, bp = cfg.txt_size, 2
    ps = (L, L + 32, L + 128) if ck.quick else (L, 4096, 16640)
    ss = (1, 16, 64)
    buf = torch.randn(layers, 2, max(ps) + max(ss), bp, heads, hd, device=dev, dtype=dtype)
    names = kv_names(layers, PAST), kv_names(layers, NEW)
    dt = {torch.bfloat16: "bfloat16", torch.float32: "float32"}[dtype]
    spec = GraphSpec("deep_step", "", "", "step", k, dt, [TensorInfo(TOKENS, "float32", ()),
                     *(TensorInfo(n, dt, ()) for n in names[0])], [], {})
    paths = {"eager two-part": None, "torch backend": False}
    if dev.type == "cuda":
        paths["torch backend + CUDA graphs"] = True
    runners = {p: TorchStepRunner(spec, StepGraph(block), CachedStepGraph(block), None, g)
               for p, g in paths.items() if g is not None}
    tf, gb = ck.ceilings.get("tflops"), ck.ceilings.get("gbs")
    rows = []
    for s in ss:
        tokens = torch.randn(bp, s, c, device=dev)
        cos, sin = torch.randn(2, s, hd, device=dev)
        for p in ps:
            past = [buf[l, i, :p] for l in range(layers) for i in range(2)]
            inputs = {TOKENS: tokens, ROPE_COS: cos, ROPE_SIN: sin, **dict(zip(names[0], past))}
            outputs = {SCALE: torch.empty(bp, s, c, device=dev), SHIFT: torch.empty(bp, s, c, device=dev),
                       **dict(zip(names[1], (buf[l, i, p:p + s] for l in range(layers) for i in range(2))))}
            cost = step_cost(cfg, k, bp, s, p, dtype_bytes=torch.finfo(dtype).bits // 8)
            roof = max(cost.flops / tf / 1e9, cost.bytes / gb / 1e6) if tf and gb else None
            for path in paths:
                with torch.no_grad():
                    if path == "eager two-part":
                        graph = StepGraph(block)
                        fn = lambda: graph(tokens, cos, sin, *past)
                    else:
                        fn = lambda r=runners[path]: r.infer_impl(inputs, outputs)
                    ms = timed(fn, dev, warmup=3, iters=ck.runs(7))
                rows.append({"path": path, "S": s, "P": p, "ms": ms, "tflops": cost.flops / ms / 1e9,
                             "gbs": cost.bytes / ms / 1e6, "roofline_ms": roof,
                             "pct_roofline": None if roof is None else 100 * roof / ms})
    for r in runners.values():
        r.close()
    return {"dtype": str(dtype), "batch": bp, "layers": layers, "width": cfg.block_width(k),
            "params": sum(q.numel() for q in block.parameters()), "rows": rows}


SECTIONS: dict[str, Callable[[Check], dict]] = {"env": env, "ceilings": ceilings, "goldens": goldens, "toy": toy,
                                                "bench": bench, "deep_step": deep_step}


# ---------------------------------------------------------------- report
def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown(result: dict) -> str:
    lines = ["# gpu_check", "", f"device: {result['device']}, quick: {result['quick']}, "
             f"total {result['seconds']:.1f} s" + (" (quick run: no figure here is a measurement)" if result["quick"]
                                                     else ""), ""]
    for name, sec in result["sections"].items():
        mem = sec.get("peak_mem_gib", sec.get("peak_rss_gib"))
        lines += [f"## {name}", "", f"{sec['seconds']:.1f} s, peak memory {mem} GiB"
                  + (" (CUDA allocated)" if "peak_mem_gib" in sec else " (process RSS)"), ""]
        if "error" in sec:
            lines += ["**error**: `" + sec["error"].splitlines()[0] + "`", ""]
        rows = sec.get("rows")
        if isinstance(rows, list) and rows:
            keys = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
        else:
            lines += [f"- {k}: {_fmt(v)}" for k, v in sec.items() if k not in ("seconds", "trace", "error",
                                                                               "peak_mem_gib", "peak_rss_gib")]
        lines.append("")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for gpu_check.json and gpu_check.md")
    ap.add_argument("--device", default=None, help="cuda (default when there is one) or cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, single runs (a check that the script works)")
    ap.add_argument("--only", nargs="*", choices=list(SECTIONS), default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda needs a CUDA GPU and this machine has none; use --device cpu", file=sys.stderr)
        return 2
    if device.type == "cpu" and args.quick:
        torch.set_num_threads(1)   # tiny sizes: pool threads only contend
    ck = Check(device, args.quick, args.out)
    t = time.perf_counter()
    for name, fn in SECTIONS.items():
        if args.only is None or name in args.only or name == "env":
            ck.run(name, fn)
    result = {"device": str(device), "quick": args.quick, "seconds": round(time.perf_counter() - t, 3),
              "ok": all("error" not in s and s.get("ok", True) for s in ck.sections.values()),
              "sections": ck.sections}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    (args.out / "gpu_check.md").write_text(markdown(result))
    print(f"wrote {args.out / 'gpu_check.json'} and gpu_check.md in {result['seconds']:.0f} s; ok={result['ok']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
