"""``starflow-trt bench``: run the benchmarks; write ``<out>/latest.{json,md}`` + charts (default ./bench_out)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click


@click.command("bench")
@click.option("--quick", is_flag=True,
              help="smoke run: one run, a small bench config, no toy, no INT8 unless --int8 (< 3 min on 2 cores)")
@click.option("--runs", default=None, type=int, help="timed runs per measurement, median reported [default: 5; 1 with --quick]")
@click.option("--int8/--no-int8", "int8", default=None,
              help="INT8 calibration and rows [default: on; off with --quick]")
@click.option("-o", "--out", "out_dir", default="bench_out", show_default=True, type=click.Path(file_okay=False),
              help="results directory (latest.json, latest.md, *.png); the cache goes in OUT/.cache")
@click.option("--cache", "cache_dir", default=None, type=click.Path(file_okay=False),
              help="checkpoints, exports and calibrations kept between runs [default: OUT/.cache]")
@click.option("--upstream", "upstream", default=None, type=click.Path(exists=True, file_okay=False),
              help="a checkout of apple/ml-starflow (not vendored): adds rows running its sampler on the same "
                   "checkpoint and noise")
@click.option("--compile/--no-compile", "compile_peer", default=None,
              help="a row for the reference sampler under torch.compile (compile time reported as s_first) "
                   "[default: on; off with --quick]")
def bench_command(quick: bool, runs: Optional[int], int8: Optional[bool], out_dir: str,
                  cache_dir: Optional[str], upstream: Optional[str], compile_peer: Optional[bool]) -> None:
    """Per-graph and end-to-end benchmarks (bench config + toy), roofline, 7B GPU projections."""
    from ..bench.paths import BenchPaths
    from ..bench.run import bench_plan, run_benchmarks
    from ..doctor import require_bench

    plan = bench_plan(quick, runs, int8)   # validates --runs before any work
    paths = BenchPaths.under(out_dir, cache_dir)
    require_bench(paths, int8=plan.int8, toy=plan.toy)
    result = run_benchmarks(paths.out, paths.cache, runs=plan.runs, int8=plan.int8, log=click.echo, quick=quick,
                            upstream=upstream, compile_peer=compile_peer)
    click.echo(f"wrote {Path(out_dir) / 'latest.md'} ({result['seconds']:.0f} s)")
