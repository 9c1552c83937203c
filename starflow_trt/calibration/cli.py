"""``starflow-trt calibrate DIR --precision int8|fp16 -o OUT``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import click


@click.command("calibrate")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--precision", type=click.Choice(["int8", "fp16"]), required=True)
@click.option("--method", type=click.Choice(["entropy", "percentile", "minmax"]), default="entropy", show_default=True)
@click.option("--samples", default=16, show_default=True, type=int, help="calibration prompts (videos)")
@click.option("--text-embeddings", "text", type=click.Path(exists=True, dir_okay=False),
              help="calibration prompts y.npy [N, L, D] (default: the bundled toy's prompts for toy exports)")
@click.option("--uncond", type=click.Path(exists=True, dir_okay=False), help="empty-prompt embeddings [N, L, D]")
@click.option("--guidance", default=3.0, show_default=True, type=float)
@click.option("--exclude", multiple=True, help="regex of MatMul module paths kept in float (repeatable; "
              "default: proj_out and attention)")
@click.option("--trt-version", default="10.3.0", show_default=True, help="header of the TensorRT calibration cache")
@click.option("--force", is_flag=True, help="write graphs that fail the quality gate")
@click.option("--capture-dir", type=click.Path(file_okay=False), help="also keep the captured graph inputs here "
              "(size-bounded .npz shards)")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False))
def calibrate_command(directory: str, precision: str, method: str, samples: int, text: Optional[str],
                      uncond: Optional[str], guidance: float, exclude: tuple, trt_version: str, force: bool,
                      capture_dir: Optional[str], out_dir: str) -> None:
    """Calibrate the FP32 graphs of DIRECTORY into INT8 (Q/DQ) or FP16 graphs in OUT, gated on quality."""
    import numpy as np
    import torch

    from .calibrate import calibrate_directory
    from .int8 import DEFAULT_EXCLUDE

    y = torch.from_numpy(np.load(text, allow_pickle=False)).float() if text else None
    u = torch.from_numpy(np.load(uncond, allow_pickle=False)).float() if uncond else None
    manifest = calibrate_directory(Path(directory), Path(out_dir), precision, method, samples, y, u, guidance,
                                   exclude=exclude or DEFAULT_EXCLUDE, trt_version=trt_version, force=force,
                                   capture_dir=Path(capture_dir) if capture_dir else None, log=click.echo)
    q = manifest.extra["quality"]
    click.echo(f"{'graph':18} {'rel L2 (worst output)':>22}")
    for name, g in q["graphs"].items():
        click.echo(f"{name:18} {max(g['rel_l2'].values()):>22.4g}")
    click.echo(f"bits/dim {q['bpd_fp32']:.4f} -> {q['bpd']:.4f} ({q['bpd_increase']:+.4f}); latent PSNR vs FP32 "
               f"{q['latent_psnr_db']:.1f} dB; gate {'passed' if q['gate']['passed'] else 'FAILED (forced)'}")
    click.echo(f"wrote {precision} graphs + manifest.json to {out_dir}")
