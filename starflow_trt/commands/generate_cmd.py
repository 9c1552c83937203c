"""``starflow-trt generate DIR`` and ``starflow-trt score DIR``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import click
import numpy as np

from . import options

def _sha256(path: Optional[str]) -> Optional[dict]:
    if path is None:
        return None
    from ..checkpoint import sha256_file

    return {"path": str(Path(path).resolve()), "sha256": sha256_file(path)}


def cli_record(ctx: click.Context, files: dict[str, Optional[str]], **extra: Any) -> dict:
    """``stats["cli"]``: the verb, every option as given, and the sha256 of every input file."""
    from .. import __version__

    return {"verb": ctx.info_name, "starflow_trt": __version__, "options": dict(ctx.params),
            "inputs": {k: _sha256(v) for k, v in files.items() if v is not None}, **extra}


@click.command("generate")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--prompt", "prompts", multiple=True, help="prompt (repeat for a batch; needs a text_encoder graph)")
@click.option("--negative-prompt", "negative", multiple=True, help="negative prompt, one per --prompt")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), help="image-to-video: the first frame")
@click.option("--video", "video_in", type=click.Path(exists=True, dir_okay=False), help="video-to-video: the frames to continue")
@click.option("--fps", default=16, show_default=True, type=options.POSITIVE_INT, help="output fps (and the fps template)")
@click.option("--aspect", default="16:9", show_default=True, callback=options.aspect, help="aspect template")
@click.option("--text-embeddings", "text", default=None, type=click.Path(exists=True, dir_okay=False),
              help="y.npy [B, L, D] (instead of --prompt)")
@click.option("--uncond", type=click.Path(exists=True, dir_okay=False), help="empty-prompt embeddings [B, L, D]")
@click.option("--noise", type=click.Path(exists=True, dir_okay=False), help="noise.npy [B, T, C, H, W]")
@click.option("--seed", default=0, show_default=True, type=options.NON_NEGATIVE_INT, help="noise seed (without --noise)")
@click.option("--frames", default=None, type=options.POSITIVE_INT, help="latent frames (default: the export's max)")
@click.option("--guidance", default=0.0, show_default=True, type=options.NON_NEGATIVE_FLOAT)
@click.option("--jacobi-block", default=16, show_default=True, type=options.POSITIVE_INT)
@click.option("--jacobi-iters", default=32, show_default=True, type=options.POSITIVE_INT)
@click.option("--jacobi-threshold", default=1e-3, show_default=True, type=options.NON_NEGATIVE_FLOAT)
@click.option("--schedule", type=click.Choice(["sliding", "upstream"]), default=None,
              help="Jacobi schedule (default: the runtime's fastest, sliding)")
@click.option("--autoregressive", is_flag=True, help="token-by-token sampling instead of Jacobi")
@click.option("--context", type=click.Path(exists=True, dir_okay=False), help="conditioning latents [B, N, C, H, W]")
@click.option("--no-denoise", is_flag=True, help="skip the learnable denoiser")
@options.backend_option()
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), help="for --backend torch")
@click.option("--thread-pool", type=click.Choice(["shared", "session"]), default="shared", show_default=True,
              help="ORT CPU threads: one pool shared by all graphs, or a pool per graph")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False))
@options.force_option()
@click.pass_context
def generate_command(ctx: click.Context, directory, prompts, negative, image, video_in, fps, aspect, text, uncond,
                     noise, seed, frames, guidance, jacobi_block, jacobi_iters, jacobi_threshold, schedule,
                     autoregressive, context, no_denoise, backend, checkpoint, thread_pool, out_dir, force) -> None:
    """Generate from --prompt (video.mp4 with VAE graphs) or text embeddings through the graphs in DIRECTORY."""
    from .. import logs
    from ..runtime import JacobiConfig, Pipeline
    from ..runtime.outputs import write_outputs
    from ..staging import check_output_dir, staged_directory

    files = {"text_embeddings": text, "uncond": uncond, "noise": noise, "context": context, "checkpoint": checkpoint,
             "image": image, "video": video_in}
    inputs = [directory, *files.values()]
    options.prompt_or_embeddings(list(prompts), list(negative), text, uncond, image, video_in, context)
    check_output_dir(out_dir, force, inputs)  # refuse before any work
    y = options.load_array(text, "--text-embeddings")
    y_uncond = options.load_array(uncond, "--uncond")
    z = options.load_array(noise, "--noise")
    ctx_latents = options.load_array(context, "--context")
    pipe = Pipeline.from_dir(directory, backend=backend, checkpoint=checkpoint, thread_pool=thread_pool)
    jacobi = None if autoregressive else JacobiConfig(block_size=jacobi_block, max_iter=jacobi_iters,
                                                      threshold=jacobi_threshold, schedule=schedule)
    total = frames or (z.shape[1] if z is not None else pipe.geo.max_frames)
    bars = []  # created at the first final frame, so input errors print on a clean line

    def on_frame(index, frame) -> None:
        if not bars:
            bars.append(logs.progress(total=total, desc="frames", unit="frame", leave=True))
        bars[0].update(1)

    # staged from the start: an unwritable OUT fails before sampling; a failed run leaves nothing
    with staged_directory(out_dir, force=force, inputs=inputs, kind="generate") as tmp:
        writers = []

        def on_video(chunk) -> None:   # decoded frames stream into the mp4 writers as the flow finishes them
            from ..media.io import Mp4Writer

            if not writers:
                names = ["video.mp4"] if chunk.shape[0] == 1 else [f"video_{i}.mp4" for i in range(chunk.shape[0])]
                writers.extend(Mp4Writer(tmp / name, fps) for name in names)
            for writer, clip in zip(writers, chunk):
                writer.write(clip)

        media = dict(prompt=list(prompts), negative_prompt=list(negative) or None, image=image, video=video_in,
                     fps=fps, aspect=aspect, on_video=on_video) if prompts else {}
        try:
            result = pipe.generate(y, y_uncond=y_uncond, noise=z, seed=seed, num_frames=frames, guidance=guidance,
                                   jacobi=jacobi, context=ctx_latents, denoise=not no_denoise, on_frame=on_frame,
                                   **media)
        finally:
            for bar in bars:
                bar.close()
        for writer in writers:
            writer.close()
        result.stats["cli"] = cli_record(ctx, files, directory=str(Path(directory).resolve()),
                                         noise_source="file" if noise else "seed")
        written = write_outputs(result, pipe, tmp)
    s = result.stats
    click.echo(f"{s['frames']} frames x batch {s['batch']} in {s['seconds']['total']:.2f} s "
               f"(first frame {s['time_to_first_frame']:.2f} s, {s['total_graph_calls']} graph calls, "
               f"schedule {s['schedule']}); wrote "
               f"{', '.join(str(Path(out_dir) / f.name) for f in [*(w.path for w in writers), *written])}")


@click.command("score")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--video", required=True, type=click.Path(exists=True, dir_okay=False), help="x.npy [B, T, C, H, W]")
@click.option("--text-embeddings", "text", required=True, type=click.Path(exists=True, dir_okay=False))
@options.backend_option()
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), help="for --backend torch")
@click.option("-o", "--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="also write scores.json into this directory")
@options.force_option()
@click.pass_context
def score_command(ctx: click.Context, directory, video, text, backend, checkpoint, out_dir, force) -> None:
    """Per-sample NLL (nats/dim) and bits/dim of VIDEO through the forward graphs (JSON on stdout)."""
    from ..errors import InputError
    from ..runtime import Pipeline
    from ..staging import check_output_dir, staged_directory, write_json_atomic

    files = {"video": video, "text_embeddings": text, "checkpoint": checkpoint}
    inputs = [directory, *files.values()]
    if out_dir is not None:
        check_output_dir(out_dir, force, inputs)
    x = options.load_array(video, "--video")
    y = options.load_array(text, "--text-embeddings")
    pipe = Pipeline.from_dir(directory, backend=backend, checkpoint=checkpoint)
    nll, bpd = pipe.score(x, y)
    if not (np.isfinite(nll.numpy()).all() and np.isfinite(bpd.numpy()).all()):
        raise InputError(f"the likelihood of {video} is not finite (values far outside the data range?); "
                         "check that VIDEO holds latents of this model")
    scores = {"nll": nll.tolist(), "bits_per_dim": bpd.tolist(), "mean_bits_per_dim": float(bpd.mean())}
    if out_dir is not None:
        with staged_directory(out_dir, force=force, inputs=inputs, kind="score") as tmp:
            write_json_atomic(tmp / "scores.json", {**scores, "cli": cli_record(ctx, files)}, strict=True)
    click.echo(json.dumps(scores, allow_nan=False))
