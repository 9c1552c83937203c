"""ONNX Runtime's CPU threading on a whole pipeline: ``python benchmarks/ort_pools.py [--graphs DIR] [--runs 5]``.

One prompt on the bench config (guidance 2, default Jacobi), timed interleaved per round, medians:

* per-session pools that never spin (a wake-up per op),
* per-session pools that spin while running and stop when the run returns (the default),
* per-session pools that spin and keep spinning after their run (the next graph's pool fights them): in a
  process of its own, since its spinning threads would also slow whatever row runs after it,
* ORT's process-wide shared pool: in a process of its own, since once it exists no per-session pool may.

``--graphs``: an FP32 export (default: the bench cache, ``benchmarks/.cache/bench_graphs``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _keep_spinning():
    """A backend whose per-session pools spin and keep spinning after their run (this project's old ``spin=True``)."""
    from starflow_trt.runtime.backends.ort_backend import OrtBackend, session_options

    class Backend(OrtBackend):
        def session_options(self):
            options = session_options()
            options.add_session_config_entry("session.intra_op.allow_spinning", "1")
            return options
    return Backend()


def _time(pipes: dict, runs: int) -> dict:
    """``{sampler: {pipeline: {median, min, max}}}`` for the default Jacobi schedule and autoregressive sampling."""
    from starflow_trt.sampling import JacobiConfig

    geo = next(iter(pipes.values())).geo
    g = torch.Generator().manual_seed(1)
    y = torch.randn(1, geo.text_length, geo.text_width, generator=g)
    noise = torch.randn(1, geo.max_frames, geo.channel_size, geo.height, geo.width, generator=g)
    out = {}
    for sampler, jacobi in (("jacobi (default)", JacobiConfig()), ("autoregressive", None)):
        times = {name: [] for name in pipes}
        for r in range(runs + 1):   # round 0 warms up
            for name, pipe in pipes.items():
                start = time.perf_counter()
                pipe.generate(y, torch.zeros_like(y), noise=noise, guidance=2.0, jacobi=jacobi, denoise=False)
                if r:
                    times[name].append(time.perf_counter() - start)
        out[sampler] = {name: {"median": statistics.median(t), "min": min(t), "max": max(t)}
                        for name, t in times.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--graphs", type=Path, default=HERE / ".cache" / "bench_graphs")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--alone", choices=("shared", "after"), help=argparse.SUPPRESS)   # a process of its own
    args = ap.parse_args()
    from starflow_trt.export.manifest import load_manifest
    from starflow_trt.runtime import Pipeline
    from starflow_trt.runtime.backends.ort_backend import OrtBackend

    manifest = load_manifest(args.graphs)
    if args.alone:
        pipe = Pipeline.from_dir(args.graphs, thread_pool="shared") if args.alone == "shared" else \
            Pipeline(manifest, _keep_spinning())
        name = "shared pool" if args.alone == "shared" else "per session, spinning after runs"
        print(json.dumps(_time({name: pipe}, args.runs)))
        return
    rows = _time({"per session, never spinning": Pipeline(manifest, OrtBackend(spin=False)),
                  "per session, spinning while running (default)": Pipeline.from_dir(args.graphs)}, args.runs)
    for alone in ("after", "shared"):
        out = subprocess.run([sys.executable, __file__, "--graphs", str(args.graphs), "--runs", str(args.runs),
                              "--alone", alone], check=True, capture_output=True, text=True).stdout
        for sampler, row in json.loads(out.strip().splitlines()[-1]).items():
            rows[sampler].update(row)
    for sampler, by_pool in rows.items():
        print(sampler)
        for name, t in by_pool.items():
            print(f"  {name:48} {t['median']:.3f} s [{t['min']:.3f}-{t['max']:.3f}]")


if __name__ == "__main__":
    main()
