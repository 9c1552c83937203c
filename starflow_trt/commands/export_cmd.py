"""``starflow-trt export CONFIG CHECKPOINT [--text-encoder DIR] [--vae PATH] -o OUT_DIR``."""

from __future__ import annotations

from typing import Optional

import click

from . import options


@click.command("export")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="output directory")
@click.option("--graphs", default=None, callback=options.graph_list, help="comma-separated subset (default: all graphs)")
@click.option("--opset", default=18, show_default=True, type=options.OPSET, help="ONNX opset (17-20)")
@click.option("--external-data", type=click.Choice(["auto", "always"]), default="auto", show_default=True,
              help="ONNX external data: only graphs over 2 GB, or always")
@click.option("--simplify/--no-simplify", default=False, show_default=True, help="run onnxslim on every graph")
@click.option("--max-batch", default=4, show_default=True, type=options.POSITIVE_INT,
              help="prompts per call (guidance doubles it)")
@click.option("--max-frames", default=None, type=options.POSITIVE_INT,
              help="latent frames (default: config vid_size / window)")
@click.option("--grid", default=None, callback=options.grid, help="token grid HxW (default: config geometry)")
@click.option("--aspect", default=None, callback=options.aspect,
              help="aspect of the default grid (default: 16:9, or the first of --aspects)")
@click.option("--aspects", default="auto", show_default=True, callback=options.aspects,
              help="aspect ratios the graphs cover, e.g. 16:9,9:16,1:1, or all (the nine upstream ratios); "
                   "auto: all for VAE / mix_aspect configs, else the one config grid")
@click.option("--dtype", "dtype", type=click.Choice(["fp32", "fp16", "bf16"]), default="fp32", show_default=True,
              help="graph precision: fp16 / bf16 weights and K/V (half-size files) with FP32 islands "
                   "(norms, softmax, RoPE, affine head); fp32 for verification")
@click.option("--text-encoder", "text_encoder", default=None, callback=options.text_encoder_dir,
              help="local Hugging Face T5 folder: adds the text_encoder graph and copies the tokenizer")
@click.option("--vae", "vae", default=None, callback=options.vae_path,
              help="Wan2.2_VAE.pth or a diffusers VAE folder: adds the vae_decode_first/step and vae_encode graphs")
@click.option("--trt-variants/--no-trt-variants", default=False, show_default=True,
              help="also write the step / prefill graphs in TensorRT's fused-attention form "
                   "(<graph>.trt.onnx: concat(past, new) K/V, one softmax; what `build` parses)")
@options.force_option("replace OUT_DIR if it is a starflow-trt export (never other files)")
def export_command(config: str, checkpoint: str, out_dir: str, graphs: Optional[list[str]], opset: int,
                   external_data: str, simplify: bool, max_batch: int, max_frames: Optional[int],
                   grid: Optional[tuple[int, int]], aspect: Optional[str], aspects, dtype: str,
                   text_encoder: Optional[str], vae: Optional[str], trt_variants: bool,
                   force: bool) -> None:
    """Export the stage graphs of CHECKPOINT to ONNX with a manifest.json."""
    from .. import logs
    from ..config import load_config
    from ..export.onnx_export import ExportLimits, export_graphs
    from ..staging import check_output_dir

    check_output_dir(out_dir, force, inputs=[config, checkpoint, text_encoder, vae])  # refuse before any work
    cfg = load_config(config)  # validated: a bad config stops here, before the checkpoint is read
    height, width = grid or (None, None)
    if grid and aspects == "auto":
        aspects = ()   # an explicit --grid is the one grid
    limits = ExportLimits(max_batch=max_batch, max_frames=max_frames, height=height, width=width, aspect=aspect,
                          aspects=aspects, dtype=dtype)
    with logs.captured():  # exporter chatter hidden unless --verbose; the bar stays on the terminal
        with logs.progress(desc="export", unit="graph") as bar:
            def progress(msg: str) -> None:
                bar.set_description(msg)
                bar.update(1)

            manifest, rows = export_graphs(cfg, checkpoint, out_dir, graphs=graphs, opset=opset,
                                           external_data=external_data, simplify=simplify, limits=limits,
                                           force=force, progress=progress, text_encoder=text_encoder, vae=vae,
                                           trt_variants=trt_variants)
    click.echo(f"{'graph':18} {'params':>14} {'file MB':>9} {'export s':>9}")
    for r in rows:
        click.echo(f"{r['graph']:18} {r['params']:>14,} {r['bytes'] / 1e6:>9.2f} {r['seconds']:>9.2f}")
    g = manifest.geometry
    grids = ", ".join(f"{a.aspect} {a.h}x{a.w}" for a in g.aspects) or f"{g.h}x{g.w}"
    click.echo(f"wrote {len(rows)} graphs + manifest.json to {manifest.root} (opset {opset}, {manifest.precision}, "
               f"{manifest.exporter}); token grids: {grids}")
