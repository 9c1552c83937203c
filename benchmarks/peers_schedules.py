"""Bench-config peers and schedules (issue 17): ``python benchmarks/peers_schedules.py [--runs 3] [--upstream PATH]``.

End to end on the bench config (guidance 2, Jacobi block 16, threshold 1e-3, same noise), rows timed
interleaved: reference sampler, reference under torch.compile, the upstream checkout (if given),
ORT FP32 and ORT INT8 with AR and every schedule; then every schedule over 8 prompts (distance to
AR, deep calls, deep tokens). Writes ``results/peers_schedules.json``. ``--int8-extra DIR``: one
more INT8 export (e.g. another calibration) as its own rows.
"""

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch

from starflow_trt.bench.paths import BenchPaths
from starflow_trt.bench.run import FULL, _peers, _prepare
from starflow_trt.bench.workloads import end_to_end, schedule_quality

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--upstream", default=None)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--int8-extra", action="append", default=[], help="LABEL=DIR of another INT8 export")
    ap.add_argument("--no-quality", action="store_true", help="end to end only (no schedules over 8 prompts)")
    ap.add_argument("--no-int8", action="store_true", help="no INT8 rows")
    ap.add_argument("--cache", type=Path, default=HERE / ".cache")
    ap.add_argument("-o", "--out", type=Path, default=HERE / "results" / "peers_schedules.json")
    args = ap.parse_args()
    from starflow_trt.reference import load_reference
    from starflow_trt.runtime import Pipeline

    plan = replace(FULL, toy=False, runs=args.runs)
    paths = BenchPaths.under(args.out.parent, args.cache)
    dirs = _prepare(plan, paths, print)
    extra = {} if args.no_int8 else {"ORT INT8": Pipeline.from_dir(dirs["int8"], precision="int8",
                                                                   thread_pool="session")}
    for item in args.int8_extra:
        label, d = item.split("=", 1)
        extra[label] = Pipeline.from_dir(d, precision="int8", thread_pool="session")
    peers = _peers(dirs, args.upstream, not args.no_compile, print)
    ref = load_reference(dirs["config"], dirs["ckpt"])
    pipe = Pipeline.from_dir(dirs["graphs"], thread_pool="session")
    geo = pipe.geo
    g = torch.Generator().manual_seed(1)   # the bench's own noise and text (run.py)
    y = torch.randn(1, geo.text_length, geo.text_width, generator=g)
    u = torch.zeros_like(y)
    noise = torch.randn(1, geo.max_frames, geo.channel_size, geo.height, geo.width, generator=g)
    result = {"runs": args.runs, "ort_thread_pool": "session (the default)"}
    result["end_to_end"] = end_to_end(ref, pipe, y, u, noise, args.runs, label="bench", peers=peers, extra_pipes=extra)
    gq = torch.Generator().manual_seed(3)
    texts = torch.randn(plan.samples, geo.text_length, geo.text_width, generator=gq)
    result["schedule_quality"] = {} if args.no_quality else {name: schedule_quality(p, texts, torch.zeros_like(texts), tuple(noise.shape), 2.0,
                                                         "bench " + name)
                                  for name, p in {"ORT FP32": pipe, **extra}.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    for r in result["end_to_end"]:
        print({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items() if k != "workload"})
    for name, q in result["schedule_quality"].items():
        for r in q["rows"]:
            print(name, {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in r.items() if k != "workload"})
