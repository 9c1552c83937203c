"""``starflow-trt export CONFIG CHECKPOINT -o OUT_DIR``."""

from __future__ import annotations

from typing import Optional

import click


@click.command("export")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="output directory")
@click.option("--graphs", default=None, help="comma-separated subset (default: all graphs)")
@click.option("--opset", default=18, show_default=True, type=int, help="ONNX opset (17-20)")
@click.option("--external-data", type=click.Choice(["auto", "always"]), default="auto", show_default=True,
              help="ONNX external data: only graphs over 2 GB, or always")
@click.option("--simplify/--no-simplify", default=False, show_default=True, help="run onnxslim on every graph")
@click.option("--max-batch", default=4, show_default=True, type=int, help="prompts per call (guidance doubles it)")
@click.option("--max-frames", default=None, type=int, help="latent frames (default: config vid_size / window)")
@click.option("--grid", default=None, help="token grid HxW (default: config geometry)")
@click.option("--aspect", default="16:9", show_default=True, help="frame aspect for VAE configs")
@click.option("--force", is_flag=True, help="replace a non-empty OUT_DIR")
def export_command(config: str, checkpoint: str, out_dir: str, graphs: Optional[str], opset: int, external_data: str,
                   simplify: bool, max_batch: int, max_frames: Optional[int], grid: Optional[str], aspect: str,
                   force: bool) -> None:
    """Export the stage graphs of CHECKPOINT to ONNX with a manifest.json."""
    from tqdm import tqdm

    from ..errors import StarflowError
    from ..export.onnx_export import ExportLimits, export_graphs

    height = width = None
    if grid:
        try:
            height, width = (int(v) for v in grid.lower().split("x"))
        except ValueError as exc:
            raise StarflowError(f"--grid must look like 30x53, got {grid!r}") from exc
    limits = ExportLimits(max_batch=max_batch, max_frames=max_frames, height=height, width=width, aspect=aspect)
    bar = tqdm(desc="export", unit="graph", total=None)

    def progress(msg: str) -> None:
        bar.set_description(msg)
        bar.update(1)

    manifest, rows = export_graphs(config, checkpoint, out_dir, graphs=graphs.split(",") if graphs else None,
                                   opset=opset, external_data=external_data, simplify=simplify, limits=limits,
                                   force=force, progress=progress)
    bar.close()
    click.echo(f"{'graph':18} {'params':>14} {'file MB':>9} {'export s':>9}")
    for r in rows:
        click.echo(f"{r['graph']:18} {r['params']:>14,} {r['bytes'] / 1e6:>9.2f} {r['seconds']:>9.2f}")
    click.echo(f"wrote {len(rows)} graphs + manifest.json to {manifest.root} (opset {opset}, {manifest.exporter})")
