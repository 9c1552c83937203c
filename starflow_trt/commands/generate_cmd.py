"""``starflow-trt generate DIR`` and ``starflow-trt score DIR``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import click
import numpy as np

from ..defaults import DEFAULT_JACOBI_BLOCK, DEFAULT_JACOBI_ITERS, DEFAULT_JACOBI_THRESHOLD
from ..sampling import SCHEDULES
from . import options

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


#: the request field each ``generate`` option sets (errors name the option)
OPTION_OF = {"prompt": "--prompt", "negative_prompt": "--negative-prompt", "text_embeddings": "--text-embeddings",
             "negative_embeddings": "--uncond", "image": "--image", "video": "--video", "context_latents": "--context",
             "noise": "--noise", "seed": "--seed", "frames": "--frames", "aspect": "--aspect", "fps": "--fps",
             "guidance": "--guidance", "sampler": "--autoregressive", "jacobi": "--autoregressive",
             "jacobi.block_size": "--jacobi-block", "jacobi.max_iter": "--jacobi-iters",
             "jacobi.threshold": "--jacobi-threshold", "jacobi.schedule": "--schedule", "jacobi.window": "--window",
             "jacobi.context_length": "--context-length", "denoise": "--no-denoise"}


def option_error(exc) -> click.BadParameter:
    """A :class:`~starflow_trt.request.RequestError` as the option's usage error (exit 2, the validator's reason)."""
    return click.BadParameter(exc.reason, param_hint=f"'{OPTION_OF.get(exc.field, exc.field)}'")


@click.command("generate")
@click.argument("directory", type=click.Path(exists=True, file_okay=False), callback=options.export_dir)
@click.option("--prompt", "prompts", multiple=True, help="prompt (repeat for a batch; needs a text_encoder graph)")
@click.option("--negative-prompt", "negative", multiple=True, help="negative prompt, one per --prompt")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), help="image-to-video: the first frame")
@click.option("--video", "video_in", type=click.Path(exists=True, dir_okay=False), help="video-to-video: the frames to continue")
@click.option("--fps", default=None, type=int,
              help="output fps and the prompt template's  [default: the export's, from its config's vid_size]")
@click.option("--aspect", default=None,
              help="frame aspect, e.g. 9:16: one of the export's aspects (the token grid and the prompt template; "
                   "default: the export's default, 16:9 for VAE configs)")
@click.option("--text-embeddings", "text", default=None, type=click.Path(exists=True, dir_okay=False),
              help="y.npy [B, L, D] (instead of --prompt)")
@click.option("--uncond", type=click.Path(exists=True, dir_okay=False), help="empty-prompt embeddings [B, L, D]")
@click.option("--noise", type=click.Path(exists=True, dir_okay=False), help="noise.npy [B, T, C, H, W]")
@click.option("--seed", default=0, show_default=True, type=int, help="noise seed (without --noise)")
@click.option("--frames", default=None, type=int,
              help="latent frames (default: the export's max; more: a long video through the attention window)")
@click.option("--window", default=None, type=int,
              help="long videos: attention window in latent frames (default: the model's local_attn_window, "
                   "else the export's frames, the training length)")
@click.option("--context-length", default=None, type=int,
              help="long videos: frames re-encoded as context when the window slides (default: window - 1)")
@click.option("--guidance", default=None, type=float,
              help="classifier-free guidance (default: the export's cfg with --prompt, 0 with --text-embeddings)")
@click.option("--jacobi-block", default=DEFAULT_JACOBI_BLOCK, show_default=True, type=int)
@click.option("--jacobi-iters", default=DEFAULT_JACOBI_ITERS, show_default=True, type=int)
@click.option("--jacobi-threshold", default=DEFAULT_JACOBI_THRESHOLD, show_default=True, type=float)
@click.option("--schedule", type=click.Choice(SCHEDULES), default=None,
              help="Jacobi schedule (default: the runtime's fastest, predictive)")
@click.option("--autoregressive", is_flag=True, help="token-by-token sampling instead of Jacobi")
@click.option("--context", type=click.Path(exists=True, dir_okay=False), help="conditioning latents [B, N, C, H, W]")
@click.option("--no-denoise", is_flag=True, help="skip the learnable denoiser")
@options.backend_option()
@options.cuda_graphs_option()
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), help="for --backend torch")
@options.torch_device_options
@options.thread_pool_option()
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False))
@options.force_option()
@click.pass_context
def generate_command(ctx: click.Context, directory, prompts, negative, image, video_in, fps, aspect, text, uncond,
                     noise, seed, frames, window, context_length, guidance, jacobi_block, jacobi_iters,
                     jacobi_threshold, schedule, autoregressive, context, no_denoise, backend, cuda_graphs, checkpoint,
                     device, torch_dtype, thread_pool, out_dir, force) -> None:
    """Generate from --prompt or text embeddings through the graphs in DIRECTORY (video.mp4 with VAE graphs).

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
    files = {"text_embeddings": text, "uncond": uncond, "noise": noise, "context": context, "checkpoint": checkpoint,
             "image": image, "video": video_in}
    inputs = [directory, *files.values()]
    arrays = dict(text_embeddings=options.load_array(text, "--text-embeddings"),
                  negative_embeddings=options.load_array(uncond, "--uncond"),
                  noise=options.load_array(noise, "--noise"), context_latents=options.load_array(context, "--context"))
    jacobi = None if autoregressive else dict(block_size=jacobi_block, max_iter=jacobi_iters, threshold=jacobi_threshold,
                                              schedule=schedule, window=window, context_length=context_length)
    try:
        req = build_request(ModelSummary.from_dir(directory), prompt=list(prompts) or None, negative_prompt=list(negative) or None,
                            image=image, video=video_in, seed=seed, frames=frames, aspect=aspect, fps=fps,
                            guidance=guidance, sampler="autoregressive" if autoregressive else "jacobi",
                            jacobi=jacobi, denoise=not no_denoise, **arrays)
    except RequestError as exc:
        raise option_error(exc) from None
    check_output_dir(out_dir, force, inputs)  # refuse before any work
    pipe = Pipeline.from_dir(directory, backend=backend, checkpoint=checkpoint, thread_pool=thread_pool,
                             cuda_graphs=cuda_graphs, device=device, dtype=torch_dtype)
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


@click.command("score")
@click.argument("directory", type=click.Path(exists=True, file_okay=False), callback=options.export_dir)
@click.option("--video", required=True, type=click.Path(exists=True),
              help="x.npy [B, T, C, H, W], a directory of .npy latents, or a text file listing .npy files "
                   "(one clip [T, C, H, W] or clips [B, T, C, H, W] each; streamed in chunks of max_batch)")
@click.option("--text-embeddings", "text", required=True, type=click.Path(exists=True, dir_okay=False),
              help="y.npy [N, L, D]: one row per clip, in file order")
@options.backend_option()
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False), help="for --backend torch")
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
