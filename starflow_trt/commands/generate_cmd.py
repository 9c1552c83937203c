"""``starflow-trt generate DIR`` and ``starflow-trt score DIR``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import click
import numpy as np

from ..defaults import DEFAULT_CONTEXT_LENGTH, DEFAULT_JACOBI_BLOCK, DEFAULT_JACOBI_ITERS, DEFAULT_JACOBI_THRESHOLD
from ..sampling import SCHEDULES
from . import options
from .prompt_file import prompt_file_requests, run_prompt_file

def _sha256(path: Optional[str]) -> Optional[dict]:
    if path is None:
        return None
    from ..staging import sha256_file

    return {"path": str(Path(path).resolve()), "sha256": sha256_file(path)}


def cli_record(ctx: click.Context, files: dict[str, Optional[str]], **extra: Any) -> dict:
    """``stats["cli"]``: the verb, every option as given, and the sha256 of every input file."""
    from .. import __version__

    return {"verb": ctx.info_name, "starflow_trt": __version__, "options": dict(ctx.params),
            "inputs": {k: _sha256(v) for k, v in files.items() if v is not None}, **extra}


@click.command("generate")
@click.argument("directory", type=click.Path(exists=True, file_okay=False), callback=options.export_dir)
@click.option("--prompt", "prompts", multiple=True, help="prompt (repeat for a batch; an export with a text encoder, "
                                                        "or the bundled toy)")
@click.option("--prompts", "prompt_file", type=click.Path(exists=True, dir_okay=False),
              help="a text file, one video per line (upstream's --caption FILE): video_<line>.mp4 and "
                   "latents_<line>.npy named by line number; line k (from 0) draws seed + k, so each video equals "
                   "its --prompt run with that seed (rows share a call of the export's max_batch when that cannot "
                   "change them: --autoregressive or --jacobi-threshold 0; else one prompt per call)")
@click.option("--negative-prompt", "negative", multiple=True,
              help="negative prompt, one per --prompt (with --prompts: one, for every line)")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), help="image-to-video: the first frame")
@click.option("--video", "video_in", type=click.Path(exists=True, dir_okay=False), help="video-to-video: the frames to continue")
@click.option("--fps", default=None, type=int,
              help="output fps and the prompt template's  [default: the export's, from its config's vid_size; "
                   "upstream's sampler: 8, its published script: 16]")
@click.option("--aspect", default=None,
              help="frame aspect, e.g. 9:16: one of the export's aspects (the token grid and the prompt template), or "
                   "random: one drawn per video from its seed, as upstream draws from its nine  [default: the "
                   "export's default, 16:9 for VAE configs; upstream's sampler: 1:1]")
@click.option("--text-embeddings", "text", default=None, type=click.Path(exists=True, dir_okay=False),
              help="y.npy [B, L, D] (instead of --prompt)")
@click.option("--uncond", type=click.Path(exists=True, dir_okay=False), help="empty-prompt embeddings [B, L, D]")
@click.option("--noise", type=click.Path(exists=True, dir_okay=False), help="noise.npy [B, T, C, H, W]")
@click.option("--seed", default=0, show_default=True, type=int, help="noise seed (without --noise)")
@click.option("--frames", default=None, type=int,
              help="LATENT frames (default: the export's max; more: a long video through the attention window); "
                   "upstream counts pixel frames: --target-length")
@click.option("--target-length", default=None, type=int,
              help="PIXEL frames, as upstream's --target_length (VAE exports: 1 + 4k pixel frames are 1 + k latent "
                   "frames; 81 → 21, 241 → 61); instead of --frames")
@click.option("--window", default=None, type=int,
              help="long videos: attention window in latent frames (default: the model's local_attn_window, "
                   "else the export's frames, the training length)")
@click.option("--context-length", default=None, type=int,
              help=f"long videos: latent frames re-encoded as context when the window slides (default: "
                   f"{DEFAULT_CONTEXT_LENGTH} as upstream's sampler, window - 1 for a smaller window)")
@click.option("--guidance", default=None, type=float,
              help="classifier-free guidance (default: the export's config cfg with --prompt, the checkpoint's own "
                   "setting; upstream's sampler ignores it for its --cfg 5.0, its published script passes 3.5; "
                   "0 with --text-embeddings)")
@click.option("--jacobi-block", default=DEFAULT_JACOBI_BLOCK, show_default=True, type=int,
              help="Jacobi chunk in tokens (upstream's sampler: 64, its published script: 32)")
@click.option("--jacobi-iters", default=DEFAULT_JACOBI_ITERS, show_default=True, type=int)
@click.option("--jacobi-threshold", default=DEFAULT_JACOBI_THRESHOLD, show_default=True, type=float,
              help="Jacobi stopping bound (upstream's sampler: 0.005, its published script: 0.001)")
@click.option("--schedule", type=click.Choice(SCHEDULES), default=None,
              help="Jacobi schedule (default: the runtime's fastest, predictive; upstream: the upstream schedule)")
@click.option("--autoregressive", is_flag=True, help="token-by-token sampling instead of Jacobi (upstream's sampler "
                                                     "default; its published script uses Jacobi)")
@click.option("--context", type=click.Path(exists=True, dir_okay=False), help="conditioning latents [B, N, C, H, W]")
@click.option("--no-denoise", is_flag=True, help="skip the learnable denoiser (upstream's published script runs it)")
@options.backend_option()
@options.cuda_graphs_option()
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="for --backend torch  [default: the checkpoint the export's manifest records]")
@options.torch_device_options
@options.thread_pool_option()
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False))
@options.force_option()
@click.pass_context
def generate_command(ctx: click.Context, directory, prompts, prompt_file, negative, image, video_in, fps, aspect, text,
                     uncond, noise, seed, frames, target_length, window, context_length, guidance, jacobi_block,
                     jacobi_iters, jacobi_threshold, schedule, autoregressive, context, no_denoise, backend,
                     cuda_graphs, checkpoint, device, torch_dtype, thread_pool, out_dir, force) -> None:
    """Generate from --prompt, --prompts FILE or text embeddings through the graphs in DIRECTORY (video.mp4 with
    VAE graphs).

    Any number of prompts (chunks of the export's max_batch; seeded noise of chunk k from seed + k).
    --frames beyond the export's frames samples a long video as upstream does: a sliding attention
    window (--window) that re-encodes the last --context-length frames.
    """
    from .. import logs
    from ..request import RequestError, build_request
    from ..runtime import Pipeline
    from ..runtime.outputs import write_outputs
    from ..staging import check_output_dir, staged_directory
    from ..summary import ModelSummary

    options.long_video(window, context_length, autoregressive)
    summary = ModelSummary.from_dir(directory)
    frames = _latent_frames(summary, frames, target_length)
    _check_prompt_sources(prompts, prompt_file, text)
    files = {"text_embeddings": text, "uncond": uncond, "noise": noise, "context": context, "checkpoint": checkpoint,
             "image": image, "video": video_in}
    inputs = [directory, *files.values()]
    arrays = dict(text_embeddings=options.load_array(text, "--text-embeddings"),
                  negative_embeddings=options.load_array(uncond, "--uncond"),
                  noise=options.load_array(noise, "--noise"), context_latents=options.load_array(context, "--context"))
    jacobi = None if autoregressive else dict(block_size=jacobi_block, max_iter=jacobi_iters, threshold=jacobi_threshold,
                                              schedule=schedule, window=window, context_length=context_length)
    fields = dict(image=image, video=video_in, frames=frames, fps=fps, guidance=guidance,
                  sampler="autoregressive" if autoregressive else "jacobi", jacobi=jacobi, denoise=not no_denoise,
                  **arrays)
    if prompt_file is not None:
        batch = prompt_file_requests(summary, prompt_file, seed, aspect, list(negative), fields)
    else:
        try:
            req = build_request(summary, prompt=list(prompts) or None, negative_prompt=list(negative) or None,
                                seed=seed, aspect=aspect, **fields)
        except RequestError as exc:
            raise options.option_error(exc) from None
    check_output_dir(out_dir, force, inputs)  # refuse before any work
    pipe = Pipeline.from_dir(directory, backend=backend, checkpoint=checkpoint, thread_pool=thread_pool,
                             cuda_graphs=cuda_graphs, device=device, dtype=torch_dtype)
    if prompt_file is not None:
        with staged_directory(out_dir, force=force, inputs=inputs, kind="generate") as tmp:
            record = cli_record(ctx, {**files, "prompts": prompt_file}, directory=str(Path(directory).resolve()))
            written = run_prompt_file(pipe, batch, tmp, record)
        click.echo(f"{len(written)} videos from {prompt_file}; wrote {Path(out_dir) / 'stats.json'} and "
                   f"{', '.join(str(Path(out_dir) / name) for name in written)}")
        return
    bars: dict = {}  # one bar per stage, created at its first report so input errors print on a clean line

    def on_progress(stage: str, done: int, total: int) -> None:
        # the deep block reports per committed token, so the bar moves even when the denoiser's
        # lookahead holds every frame back until the end; a batch split into chunks restarts the
        # per-chunk stages and reports ("batch", chunks done, chunks)
        if stage not in bars:
            unit = {"deep": "tok", "batch": "chunk"}.get(stage, "frame")
            bars[stage] = logs.progress(total=total, desc=stage, unit=unit, leave=True)
        bar = bars[stage]
        if done < bar.n:
            bar.reset(total=total)
        bar.update(done - bar.n)

    # staged from the start: an unwritable OUT fails before sampling; a failed run leaves nothing
    with staged_directory(out_dir, force=force, inputs=inputs, kind="generate") as tmp:
        writers: dict = {}   # global row -> Mp4Writer
        rows = {"offset": 0, "current": 0}   # a batch beyond max_batch runs (and decodes) chunk after chunk

        def on_video(chunk) -> None:   # decoded frames stream into the mp4 writers as the flow finishes them
            from ..media.io import Mp4Writer

            rows["current"] = chunk.shape[0]
            for i, clip in enumerate(chunk):
                row = rows["offset"] + i
                if row not in writers:
                    name = "video.mp4" if req.batch == 1 else f"video_{row}.mp4"
                    writers[row] = Mp4Writer(tmp / name, req.fps)
                writers[row].write(clip)

        def on_progress_rows(stage: str, done: int, total: int) -> None:
            if stage == "batch":
                rows["offset"] += rows["current"]
            on_progress(stage, done, total)

        try:
            result = pipe.run(req, on_progress=on_progress_rows, on_video=on_video)
        finally:
            for bar in bars.values():
                bar.close()
        for writer in writers.values():
            writer.close()
        result.stats["cli"] = cli_record(ctx, files, directory=str(Path(directory).resolve()),
                                         noise_source="file" if noise else "seed")
        written = write_outputs(result, pipe, tmp, fps=req.fps)
    s = result.stats
    click.echo(f"{s['frames']} frames x batch {s['batch']} in {s['seconds']['total']:.2f} s "
               f"(first frame {s['time_to_first_frame']:.2f} s, {s['total_graph_calls']} graph calls, "
               f"schedule {s['schedule']}); wrote "
               f"{', '.join(str(Path(out_dir) / f.name) for f in [*(w.path for w in writers.values()), *written])}")


def _latent_frames(summary, frames: Optional[int], target_length: Optional[int]) -> Optional[int]:
    """``--frames`` (latent), or ``--target-length`` (pixel frames) as latent frames."""
    if target_length is None:
        return frames
    if frames is not None:
        raise click.UsageError("--frames counts latent frames, --target-length pixel frames: give one of them")
    if target_length < 1:
        raise click.BadParameter(f"must be >= 1 pixel frame, got {target_length}", param_hint="'--target-length'")
    return summary.latent_frames(target_length)


def _check_prompt_sources(prompts: tuple[str, ...], prompt_file: Optional[str], text: Optional[str]) -> None:
    """--prompts FILE alone; a --prompt that names a file is taken for one (upstream's --caption takes files)."""
    import os

    if prompt_file is not None and (prompts or text):
        raise click.UsageError("--prompts FILE gives the prompts, one per line: drop --prompt / --text-embeddings")
    for p in prompts:
        if os.path.isfile(p):
            raise click.BadParameter(f"{p!r} is a file: pass it as --prompts {p} (one video per line)",
                                     param_hint="'--prompt'")


@click.command("score")
@click.argument("directory", type=click.Path(exists=True, file_okay=False), callback=options.export_dir)
@click.option("--video", required=True, type=click.Path(exists=True),
              help="x.npy [B, T, C, H, W], a directory of .npy latents, or a text file listing .npy files "
                   "(one clip [T, C, H, W] or clips [B, T, C, H, W] each; streamed in chunks of max_batch)")
@click.option("--text-embeddings", "text", required=True, type=click.Path(exists=True, dir_okay=False),
              help="y.npy [N, L, D]: one row per clip, in file order")
@options.backend_option()
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="for --backend torch  [default: the checkpoint the export's manifest records]")
@options.torch_device_options
@click.option("-o", "--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="also write scores.json into this directory")
@options.force_option()
@click.pass_context
def score_command(ctx: click.Context, directory, video, text, backend, checkpoint, device, torch_dtype, out_dir,
                  force) -> None:
    """Per-sample NLL (nats/dim) and bits/dim of VIDEO through the forward graphs (JSON on stdout).

    Any number of clips: they are scored in chunks of the export's max_batch (a progress bar
    over chunks); a directory or list of files adds per-file results under "files".
    """
    from .. import logs
    from ..errors import InputError
    from ..runtime import Pipeline
    from ..staging import check_output_dir, staged_directory, write_json_atomic
    from . import latents

    paths = latents.video_files(video)
    single = len(paths) == 1 and Path(video).resolve() == paths[0].resolve()
    files = {"video": video} if single else {f"video[{i}]": str(f) for i, f in enumerate(paths)}
    files.update(text_embeddings=text, checkpoint=checkpoint)
    inputs = [directory, video, *files.values()]
    if out_dir is not None:
        check_output_dir(out_dir, force, inputs)
    x = options.load_array(video, "--video") if single else None
    y = options.load_array(text, "--text-embeddings")
    pipe = Pipeline.from_dir(directory, backend=backend, checkpoint=checkpoint, device=device, dtype=torch_dtype)
    g = pipe.geo
    if single:
        stream = [latents.LatentFile(paths[0], x.shape[0], x.shape[1], False)]
    else:
        stream = [latents.inspect(f, latents.export_geometries(g), g.max_frames) for f in paths]
    total = sum(f.clips for f in stream)
    if y.shape[0] != total:
        raise InputError(f"--text-embeddings has {y.shape[0]} rows but --video holds {total} clips; "
                         "pass one text embedding row per clip, in file order")
    if single:   # chunked here (as Pipeline.score would) so that one bar counts chunks either way
        batches = [(s, x[s:s + g.max_batch]) for s in range(0, total, g.max_batch)]
        n_chunks = len(batches)
    else:
        batches, n_chunks = latents.chunks(stream, g.max_batch), latents.count_chunks(stream, g.max_batch)
    bar = logs.progress(total=n_chunks, desc="score", unit="chunk")
    nlls, bpds = [], []
    try:
        for start, clips in batches:
            nll, bpd = pipe.score(clips, y[start:start + clips.shape[0]])
            nlls += nll.tolist()
            bpds += bpd.tolist()
            bar.update(1)
    finally:
        bar.close()
    if not (np.isfinite(nlls).all() and np.isfinite(bpds).all()):
        bad = next(i for i, v in enumerate(nlls + bpds) if not np.isfinite(v)) % total
        where = video if single else str(_file_of(stream, bad))
        raise InputError(f"the likelihood of {where} is not finite (values far outside the data range?); "
                         "check that VIDEO holds latents of this model")
    scores = {"nll": nlls, "bits_per_dim": bpds, "mean_bits_per_dim": float(np.mean(bpds))}
    if not single:
        scores["files"], i = [], 0
        for f in stream:
            scores["files"].append({"path": str(f.path), "nll": nlls[i:i + f.clips], "bits_per_dim": bpds[i:i + f.clips]})
            i += f.clips
    if out_dir is not None:
        with staged_directory(out_dir, force=force, inputs=inputs, kind="score") as tmp:
            write_json_atomic(tmp / "scores.json", {**scores, "cli": cli_record(ctx, files)}, strict=True)
    click.echo(json.dumps(scores, allow_nan=False))


def _file_of(stream, clip: int):
    for f in stream:
        if clip < f.clips:
            return f.path
        clip -= f.clips
    return None
