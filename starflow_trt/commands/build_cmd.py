"""``starflow-trt build`` and ``starflow-trt doctor``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import click

from . import options


@click.command("build")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), help="engine directory")
@click.option("--dry-run", is_flag=True, help="print the build plan (profiles, flags) without TensorRT")
@click.option("--shape", "shapes", multiple=True, help="override a profile dim: DIM=MIN:OPT:MAX (repeatable)")
@click.option("--graphs", default=None, callback=options.graph_list, help="comma-separated subset")
@click.option("--opt-level", default=3, show_default=True, type=options.OPT_LEVEL, help="builder optimisation level (0-5)")
@click.option("--workspace-gb", default=8.0, show_default=True, type=options.POSITIVE_FLOAT)
@click.option("--timing-cache", type=click.Path(dir_okay=False), help="timing cache to reuse and update")
@click.option("--fp16-flag", is_flag=True, help="legacy BuilderFlag.FP16 on FP32 graphs (TensorRT <= 10)")
@click.option("--trt-version", default="10", show_default=True, callback=options.trt_major,
              help="target for --dry-run (10 or 11)")
@options.force_option("replace OUT_DIR if it is a starflow-trt engine directory (never other files)")
def build_command(directory: str, out_dir: Optional[str], dry_run: bool, shapes: tuple, graphs: Optional[list[str]],
                  opt_level: int, workspace_gb: float, timing_cache: Optional[str], fp16_flag: bool, trt_version: str,
                  force: bool) -> None:
    """Build TensorRT engines for the graphs in DIRECTORY (needs an NVIDIA GPU)."""
    from ..engine.build import BuildOptions, build_engines, build_plan
    from ..engine.profiles import parse_shape_override
    from ..errors import StarflowError
    from ..staging import check_output_dir

    overrides = dict(parse_shape_override(s) for s in shapes)
    build_options = BuildOptions(opt_level=opt_level, workspace_gb=workspace_gb,
                                 timing_cache=Path(timing_cache) if timing_cache else None,
                                 legacy_fp16_flag=fp16_flag, overrides=overrides, graphs=graphs)
    if dry_run:
        click.echo(json.dumps(build_plan(Path(directory), build_options, trt_version), indent=1))
        return
    if not out_dir:
        raise StarflowError("build needs -o OUT_DIR (or --dry-run)")
    check_output_dir(out_dir, force, inputs=[directory, timing_cache])  # refuse before any work
    manifest = build_engines(Path(directory), Path(out_dir), build_options, log=click.echo)
    click.echo(f"wrote {len(manifest.graphs)} engines + manifest.json to {out_dir}")


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def doctor_command(as_json: bool) -> None:
    """What is installed and usable here, and what each verb can therefore do."""
    from ..doctor import doctor_report, render

    report = doctor_report()
    click.echo(json.dumps(report, indent=1) if as_json else render(report))
