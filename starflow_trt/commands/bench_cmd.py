"""``starflow-trt bench``: rerun the benchmarks and write benchmarks/results/latest.{json,md} + charts."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("bench")
@click.option("--runs", default=5, show_default=True, type=int, help="timed runs per measurement (median reported)")
@click.option("--no-int8", is_flag=True, help="skip the INT8 calibration and rows")
@click.option("-o", "--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="results directory (default: benchmarks/results in the repo)")
def bench_command(runs: int, no_int8: bool, out_dir) -> None:
    """Per-graph and end-to-end benchmarks (bench config + toy), roofline, 7B GPU projections."""
    from ..bench.run import REPO, run_benchmarks

    out = Path(out_dir) if out_dir else REPO / "benchmarks" / "results"
    result = run_benchmarks(out, runs=runs, int8=not no_int8, log=click.echo)
    click.echo(f"wrote {out}/latest.md ({result['seconds']:.0f} s)")
