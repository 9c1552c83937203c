"""``starflow-trt verify DIR [--against REF_DIR]``: per-graph parity against the FP32 ONNX graphs."""

from __future__ import annotations

import json
from typing import Optional

import click

from . import options


@click.command("verify")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--against", type=click.Path(exists=True, file_okay=False),
              help="the FP32 ONNX export (default: the one DIRECTORY was calibrated / built from)")
@click.option("--inputs", type=click.Path(exists=True, file_okay=False),
              help="captured graph inputs (calibrate --capture-dir); default: sample once with the reference")
@click.option("--graphs", default=None, callback=options.graph_list, help="comma-separated subset")
@click.option("--calls", default=4, show_default=True, type=options.POSITIVE_INT, help="max calls per graph")
@click.option("--tol", type=options.POSITIVE_FLOAT, default=None,
              help="relative L2 error allowed per output (default by precision: fp32 1e-5, fp16 0.01, int8 0.1)")
@click.option("--json", "as_json", is_flag=True, help="print the JSON report instead of the table")
@click.option("--report", type=click.Path(dir_okay=False), help="also write the JSON report here (atomically)")
@click.pass_context
def verify_command(ctx: click.Context, directory: str, against: Optional[str], inputs: Optional[str],
                   graphs: Optional[list[str]], calls: int, tol: Optional[float], as_json: bool,
                   report: Optional[str]) -> None:
    """Compare every graph (or TensorRT engine) of DIRECTORY with the FP32 ONNX graph it came from, on real
    inputs, with polygraphy. Exit 0: all pass; 1: a graph fails its tolerance; 2: bad input."""
    from .. import logs
    from ..staging import finite_json, write_json_atomic
    from ..verify import verify_directory

    with logs.captured():   # ORT / polygraphy chatter unless --verbose
        result = verify_directory(directory, against=against, inputs=inputs, graphs=graphs, max_calls=calls,
                                  tolerance=tol, log=logs.echo if logs.verbose() else (lambda _: None))
    data = result.to_dict()
    if report:
        write_json_atomic(report, data, strict=True)
    click.echo(json.dumps(finite_json(data), indent=1, allow_nan=False) if as_json else result.table())
    if not result.passed:
        ctx.exit(1)
