"""``starflow-trt generate DIR`` and ``starflow-trt score DIR``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import click
import numpy as np


def _load_npy(path: Optional[str], name: str):
    if path is None:
        return None
    from ..errors import InputError

    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(f"{name} {path!r} is not a readable .npy array ({exc}); save it with numpy.save") from exc


@click.command("generate")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--text-embeddings", "text", required=True, type=click.Path(exists=True, dir_okay=False),
              help="y.npy [B, L, D]")
@click.option("--uncond", type=click.Path(exists=True, dir_okay=False), help="empty-prompt embeddings [B, L, D]")
@click.option("--noise", type=click.Path(exists=True, dir_okay=False), help="noise.npy [B, T, C, H, W]")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--frames", default=None, type=int, help="latent frames (default: the export's max)")
@click.option("--guidance", default=0.0, show_default=True, type=float)
@click.option("--jacobi-block", default=16, show_default=True, type=int)
@click.option("--jacobi-iters", default=32, show_default=True, type=int)
@click.option("--jacobi-threshold", default=1e-3, show_default=True, type=float)
@click.option("--schedule", type=click.Choice(["sliding", "upstream"]), default=None,
              help="Jacobi schedule (default: the runtime's fastest, sliding)")
@click.option("--autoregressive", is_flag=True, help="token-by-token sampling instead of Jacobi")
@click.option("--context", type=click.Path(exists=True, dir_okay=False), help="conditioning latents [B, N, C, H, W]")
@click.option("--no-denoise", is_flag=True, help="skip the learnable denoiser")
@click.option("--backend", type=click.Choice(["ort", "torch", "trt"]), default="ort", show_default=True)
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), help="for --backend torch")
@click.option("--thread-pool", type=click.Choice(["shared", "session"]), default="shared", show_default=True,
              help="ORT CPU threads: one pool shared by all graphs, or a pool per graph")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False))
def generate_command(directory, text, uncond, noise, seed, frames, guidance, jacobi_block, jacobi_iters,
                     jacobi_threshold, schedule, autoregressive, context, no_denoise, backend, checkpoint,
                     thread_pool, out_dir) -> None:
    """Generate latents from text embeddings through the graphs (or engines) in DIRECTORY."""
    from tqdm import tqdm

    from ..runtime import JacobiConfig, Pipeline
    from ..runtime.outputs import write_outputs

    pipe = Pipeline.from_dir(directory, backend=backend, checkpoint=checkpoint, thread_pool=thread_pool)
    y = _load_npy(text, "--text-embeddings")
    jacobi = None if autoregressive else JacobiConfig(block_size=jacobi_block, max_iter=jacobi_iters,
                                                      threshold=jacobi_threshold, schedule=schedule)
    total = frames or (np.load(noise, mmap_mode="r").shape[1] if noise else pipe.geo.max_frames)
    bars = []  # created at the first final frame, so input errors print on a clean line

    def on_frame(index, frame) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc="frames", unit="frame"))
        bars[0].update(1)

    result = pipe.generate(y, y_uncond=_load_npy(uncond, "--uncond"), noise=_load_npy(noise, "--noise"), seed=seed,
                           num_frames=frames, guidance=guidance, jacobi=jacobi, context=_load_npy(context, "--context"),
                           denoise=not no_denoise, on_frame=on_frame)
    for bar in bars:
        bar.close()
    files = write_outputs(result, pipe, Path(out_dir))
    s = result.stats
    click.echo(f"{s['frames']} frames x batch {s['batch']} in {s['seconds']['total']:.2f} s "
               f"(first frame {s['time_to_first_frame']:.2f} s, {s['total_graph_calls']} graph calls, "
               f"schedule {s['schedule']}); wrote {', '.join(str(f) for f in files)}")


@click.command("score")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--video", required=True, type=click.Path(exists=True, dir_okay=False), help="x.npy [B, T, C, H, W]")
@click.option("--text-embeddings", "text", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--backend", type=click.Choice(["ort", "torch", "trt"]), default="ort", show_default=True)
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), help="for --backend torch")
def score_command(directory, video, text, backend, checkpoint) -> None:
    """Per-sample NLL (nats/dim) and bits/dim of VIDEO through the forward graphs."""
    from ..runtime import Pipeline

    pipe = Pipeline.from_dir(directory, backend=backend, checkpoint=checkpoint)
    nll, bpd = pipe.score(_load_npy(video, "--video"), _load_npy(text, "--text-embeddings"))
    click.echo(json.dumps({"nll": nll.tolist(), "bits_per_dim": bpd.tolist(),
                           "mean_bits_per_dim": float(bpd.mean())}))
