"""``starflow-trt calibrate DIR --precision int8|fp8|fp16 -o OUT``."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import click

from . import options

if TYPE_CHECKING:
    from ..calibration.prompts import PromptSet
    from ..export.manifest import Manifest

#: calibration prompts of a toy export when --samples is not given
TOY_SAMPLES = 16


@click.command("calibrate")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--precision", type=click.Choice(["int8", "fp8", "fp16", "bf16"]), required=True,
              help="fp8: E4M3 Q/DQ for Hopper / Ada (TensorRT placement, opset 19); fp16 / bf16: 16-bit graphs "
                   "with FP32 islands (bf16 for TensorRT: ORT cannot run it, its gate is simulated)")
@click.option("--method", type=click.Choice(["entropy", "percentile", "minmax"]), default=None,
              help="activation ranges [default: entropy for int8, minmax (amax) for fp8; fp8 takes minmax or "
                   "percentile]")
@click.option("--placement", type=click.Choice(["ort", "trt"]), default="ort", show_default=True,
              help="INT8 Q/DQ placed for ONNX Runtime's quantizer or by TensorRT's explicit-quantization rules "
                   "(use trt for `build`; fp8 is always trt)")
@click.option("--high-precision-dtype", type=click.Choice(["fp16", "bf16", "fp32"]), default=None,
              help="body dtype of int8/fp8 Q/DQ graphs: fp16 or bf16 (FP32 only in the precision policy's islands; "
                   "Q/DQ scales in the body dtype; a bf16 body runs on TensorRT, its gate on ORT is simulated) or "
                   "fp32 [default: fp16 for fp8 and --placement trt, fp32 for --placement ort]")
@click.option("--fp8-weights", type=click.Choice(["per-tensor", "per-channel"]), default="per-tensor",
              show_default=True, help="FP8 weight scales: per-tensor runs on Ada and Hopper; per-channel needs "
                                      "Hopper (sm_90) and TensorRT >= 10.6")
@click.option("--quantize-attention", is_flag=True,
              help="with --precision fp8: FP8 attention (Q/DQ on Q·Kᵀ and P·V as TensorRT's fused FP8 MHA takes "
                   "them, softmax output at scale 1/448), gated like the rest [default: attention in the body dtype]")
@click.option("--kv-dtype", type=click.Choice(["fp8"]), default=None,
              help="with --precision fp8: K/V rounded to E4M3 when written to the cache (quality simulated on ORT)")
@click.option("--prompts", "prompts_file", type=click.Path(exists=True, dir_okay=False),
              help="calibration prompts as text, one a line (blank lines skipped), encoded by the export's text "
                   "encoder with upstream's templates; guidance uses the empty prompt [default with a text "
                   "encoder: the package's set of varied video prompts (calibration/prompts.txt); the toy's own "
                   "prompts for a word-vocabulary encoder]")
@click.option("--samples", default=None, type=options.POSITIVE_INT,
              help="calibration prompts (videos): the first N of --prompts / the default set / --text-embeddings "
                   "rows (default: all), or N of the toy's prompts (default 16)")
@click.option("--text-embeddings", "text", type=click.Path(exists=True, dir_okay=False),
              help="calibration prompts as embeddings y.npy [N, L, D] (instead of --prompts)")
@click.option("--uncond", type=click.Path(exists=True, dir_okay=False),
              help="empty-prompt embeddings [N, L, D], with --text-embeddings")
@click.option("--guidance", default=3.0, show_default=True, type=options.NON_NEGATIVE_FLOAT)
@click.option("--exclude", multiple=True, help="regex of MatMul module paths kept in float (repeatable; "
              "default: proj_out and attention)")
@click.option("--trt-version", default="10.3.0", show_default=True, help="header of the TensorRT calibration cache")
@click.option("--ignore-gate", is_flag=True, help="write graphs that fail the quality gate (marked in the manifest)")
@options.force_option("replace OUT (and --capture-dir) if starflow-trt wrote it (never other files)")
@click.option("--capture-dir", type=click.Path(file_okay=False), help="also keep the captured graph inputs here "
              "(size-bounded .npz shards)")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False))
def calibrate_command(directory: str, precision: str, method: Optional[str], placement: str,
                      high_precision_dtype: Optional[str], fp8_weights: str, quantize_attention: bool,
                      kv_dtype: Optional[str], prompts_file: Optional[str], samples: Optional[int],
                      text: Optional[str], uncond: Optional[str], guidance: float, exclude: tuple, trt_version: str,
                      ignore_gate: bool, force: bool, capture_dir: Optional[str], out_dir: str) -> None:
    """Calibrate the FP32 graphs of DIRECTORY into INT8 / FP8 (Q/DQ) or FP16 graphs in OUT, gated on quality.

    Calibration prompts: --prompts FILE, --text-embeddings, or by default (an export with a text encoder) the
    package's prompt set; the calibrated manifest records which and how many.
    """
    import re

    import torch

    from .. import logs
    from ..calibration.calibrate import calibrate_directory
    from ..calibration.int8 import DEFAULT_EXCLUDE
    from ..calibration.prompts import read_prompt_file
    from ..errors import InputError
    from ..export.manifest import load_manifest
    from ..staging import check_output_dir, staged_directory

    inputs = [directory, prompts_file, text, uncond]
    check_output_dir(out_dir, force, inputs)  # refuse before any work
    if capture_dir is not None:
        check_output_dir(capture_dir, force, inputs)
        if Path(capture_dir).resolve() == Path(out_dir).resolve():
            raise InputError("--capture-dir must differ from -o; pass another directory")
    if precision == "fp8" and method == "entropy":
        raise InputError("--method entropy is an INT8 histogram fit; fp8 takes --method minmax (amax, default) "
                         "or percentile")
    if high_precision_dtype and precision in ("fp16", "bf16"):
        raise InputError(f"--high-precision-dtype sets the body of int8 / fp8 Q/DQ graphs; {precision} graphs are "
                         f"{precision.upper()} with FP32 islands already: drop it")
    if high_precision_dtype in ("fp16", "bf16") and precision == "int8" and placement == "ort":
        raise InputError(f"--high-precision-dtype {high_precision_dtype} needs --placement trt (ONNX Runtime's "
                         "quantizer writes FP32 graphs); add --placement trt")
    if kv_dtype and precision != "fp8":
        raise InputError(f"--kv-dtype {kv_dtype} needs --precision fp8; drop it or calibrate to fp8")
    if quantize_attention and precision != "fp8":
        raise InputError(f"--quantize-attention needs --precision fp8 (FP8 fused attention); drop it for {precision}")
    for pattern in exclude:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise InputError(f"--exclude {pattern!r} is not a valid regular expression ({exc})") from exc
    if prompts_file is not None and text is not None:
        raise InputError("--prompts and --text-embeddings both give calibration prompts; pass one of them")
    if uncond is not None and text is None:
        raise InputError("--uncond goes with --text-embeddings; --prompts and the default set encode the empty "
                         "prompt for guidance themselves")
    prompt_set = read_prompt_file(prompts_file) if prompts_file is not None else None
    y, u = options.load_array(text, "--text-embeddings"), options.load_array(uncond, "--uncond")
    if y is not None and u is not None and u.shape[0] < y.shape[0]:
        raise InputError(f"--uncond has {u.shape[0]} rows, --text-embeddings {y.shape[0]}; give one per prompt")
    source = load_manifest(directory)
    steps = len(source.graphs) + 2  # capture, one conversion per graph, quality gate
    text_t = torch.from_numpy(y) if y is not None else None
    uncond_t = torch.from_numpy(u) if u is not None else None
    eval_clips = None
    if text_t is None:  # prompts as text; an export of the bundled toy is scored on the toy's held-out clips
        from ..toy.calibration import toy_calibration_set

        toy = toy_calibration_set(source, samples or TOY_SAMPLES)
        eval_clips = toy[2] if toy is not None else None
        prompt_set = prompt_set or default_prompt_set_for(source, samples)
        if prompt_set is None and toy is not None:   # the toy without a text encoder stage: its own embeddings
            text_t, uncond_t = toy[0], toy[1]

    with ExitStack() as stack:
        stack.enter_context(logs.captured())  # ORT quantization's per-tensor chatter unless --verbose
        cap = None
        if capture_dir is not None:
            cap = stack.enter_context(staged_directory(capture_dir, force=force, inputs=inputs, kind="capture"))
        bar = stack.enter_context(logs.progress(total=steps, desc="calibrate", unit="step"))

        def log(message: str) -> None:
            if logs.verbose():
                logs.echo(message)
            bar.set_description(message.strip()[:60])
            bar.update(1)

        manifest = calibrate_directory(
            Path(directory), Path(out_dir), precision, method, samples,
            text_t, uncond_t, guidance, exclude=exclude or DEFAULT_EXCLUDE, eval_clips=eval_clips, trt_version=trt_version, force=ignore_gate,
            overwrite=force, capture_dir=cap, placement=placement, kv_dtype=kv_dtype, log=log, prompts=prompt_set,
            high_precision_dtype=high_precision_dtype, fp8_weights=fp8_weights.removeprefix("per-"),
            quantize_attention=quantize_attention)
        bar.update(steps - bar.n)
    q = manifest.extra["quality"]
    click.echo(f"calibration prompts: {describe_prompt_set(manifest.extra['calibration']['prompt_set'])}")
    click.echo(f"{'graph':18} {'rel L2 (worst output)':>22}")
    for name, g in q["graphs"].items():
        click.echo(f"{name:18} {max(g['rel_l2'].values()):>22.4g}")
    click.echo(f"bits/dim {q['bpd_fp32']:.4f} -> {q['bpd']:.4f} ({q['bpd_increase']:+.4f}); latent PSNR vs FP32 "
               f"{q['latent_psnr_db']:.1f} dB; gate {'passed' if q['gate']['passed'] else 'FAILED (--ignore-gate)'}")
    if q.get("simulated"):
        click.echo("the gate ran each bf16 body as its FP32 simulation (ONNX Runtime has no bf16 MatMul); "
                   "the directory is for --backend trt")
    click.echo(f"wrote {precision} graphs + manifest.json to {out_dir}")


def default_prompt_set_for(manifest: "Manifest", samples: Optional[int]) -> Optional["PromptSet"]:
    """The calibration prompts of an export when none are given: the package's set for a free-text encoder,
    ``samples`` (default :data:`TOY_SAMPLES`) of the toy's prompts for a word-vocabulary one (the package's
    prompts are not in its twelve words); None without a text encoder stage."""
    from ..calibration.prompts import PromptSet, default_prompt_set, text_stage_of
    from ..runtime.backends import make_backend
    from ..runtime.pipeline import Pipeline
    from ..toy.calibration import toy_prompts

    with Pipeline(manifest, make_backend("ort", manifest)) as pipe:   # loads no graph: the stage is read only
        stage = text_stage_of(pipe)
        if stage is None:
            return None
        if stage.words_only:
            return PromptSet(tuple(toy_prompts(samples or TOY_SAMPLES)), "toy")
        return default_prompt_set()


def describe_prompt_set(record: dict) -> str:
    """One line for the report: which set, how many prompts."""
    where = {"default": "the default set", "toy": "the toy's prompts", "embeddings": "embeddings"}
    name = where.get(record["source"], f"{record.get('path')} (sha256 {str(record.get('sha256'))[:12]})")
    return f"{record['count']} from {name}"
