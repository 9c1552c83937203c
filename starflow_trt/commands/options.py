"""Argument validation of every verb, in one place: click types, callbacks and shared options,
and :func:`load_array` for the ``.npy`` inputs.

A bad option value is a click usage error, reported before the command body runs (exit 2, one line
``error: Invalid value for '--frames': ...``); a bad array file is an :class:`InputError` (exit 2).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Union

import click
import numpy as np

from ..errors import InputError
from ..staging import MANIFEST_NAME


class FiniteFloat(click.ParamType):
    """A finite float (no nan / inf) within ``[min, max]``."""

    name = "float"

    def __init__(self, min: Optional[float] = None, max: Optional[float] = None):
        self.min, self.max = min, max

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> float:
        if isinstance(value, float) and math.isfinite(value):
            number = value
        else:
            try:
                number = float(value)
            except (TypeError, ValueError):
                self.fail(f"{value!r} is not a number", param, ctx)
            if not math.isfinite(number):
                self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.min is not None and number < self.min:
            self.fail(f"{value} is below the minimum {self.min:g}", param, ctx)
        if self.max is not None and number > self.max:
            self.fail(f"{value} is above the maximum {self.max:g}", param, ctx)
        return number

    def __repr__(self) -> str:
        return f"FiniteFloat({self.min}, {self.max})"


#: integers >= 1 (frames, samples, batch sizes, Jacobi block / iterations, runs)
POSITIVE_INT = click.IntRange(min=1)
#: integers >= 0 (seeds)
NON_NEGATIVE_INT = click.IntRange(min=0, max=2 ** 63 - 1)
#: finite floats >= 0 (guidance, thresholds)
NON_NEGATIVE_FLOAT = FiniteFloat(min=0.0)
#: finite floats > 0 (GB of workspace)
POSITIVE_FLOAT = FiniteFloat(min=1e-9)
#: ONNX opsets TensorRT 10 parses
OPSET = click.IntRange(min=17, max=20)
#: TensorRT builder optimisation level
OPT_LEVEL = click.IntRange(min=0, max=5)


def grid(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[tuple[int, int]]:
    """``--grid HxW`` → (h, w), both >= 1."""
    if value is None:
        return None
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"must look like 30x53, got {value!r}", ctx, param) from None
    if h < 1 or w < 1:
        raise click.BadParameter(f"both sizes must be >= 1, got {value!r}", ctx, param)
    return h, w


def aspect(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[str]:
    """``--aspect W:H`` with two finite positive numbers (None: not given)."""
    if value is None:
        return None
    try:
        rw, rh = (float(v) for v in value.split(":"))
    except ValueError:
        raise click.BadParameter(f"must look like 16:9, got {value!r}", ctx, param) from None
    if not (math.isfinite(rw) and math.isfinite(rh) and rw > 0 and rh > 0):
        raise click.BadParameter(f"both sides must be finite and > 0, got {value!r}", ctx, param)
    return value


def aspects(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Union[str, tuple[str, ...]]:
    """``--aspects 16:9,9:16,1:1 | all | auto`` → the ratios (each checked like ``--aspect``), or ``all`` / ``auto``."""
    if value is None or value.strip().lower() in ("auto", ""):
        return "auto"
    if value.strip().lower() == "all":
        return "all"
    out = tuple(aspect(ctx, param, v.strip()) for v in value.split(","))
    dup = sorted({a for a in out if out.count(a) > 1})
    if dup:
        raise click.BadParameter(f"{', '.join(dup)} listed twice", ctx, param)
    return out


def text_encoder_dir(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[str]:
    """``--text-encoder DIR``: a local Hugging Face T5 directory (config.json + tokenizer files), or the
    toy's ``text_encoder.safetensors``."""
    if value is None:
        return None
    from pathlib import Path

    d = Path(value)
    if d.is_file() and d.suffix == ".safetensors":   # the bundled toy's word-table encoder
        return value
    if not d.is_dir():
        raise click.BadParameter(f"{value!r} is not a directory; pass a local Hugging Face T5 folder "
                                 "(config.json, weights, tokenizer)", ctx, param)
    if not (d / "config.json").is_file():
        raise click.BadParameter(f"{value!r} has no config.json; pass the folder save_pretrained wrote", ctx, param)
    if not any((d / f).is_file() for f in ("spiece.model", "tokenizer.json")):
        raise click.BadParameter(f"{value!r} has no tokenizer (spiece.model or tokenizer.json); "
                                 "save the tokenizer into it too", ctx, param)
    return value


def vae_path(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[str]:
    """``--vae PATH``: upstream's ``Wan2.2_VAE.pth`` / a ``.safetensors`` file, or a diffusers VAE (or pipeline) folder."""
    if value is None:
        return None
    from pathlib import Path

    p = Path(value)
    if p.is_file():
        if p.suffix not in (".pth", ".pt", ".safetensors"):
            raise click.BadParameter(f"{value!r} is not a .pth or .safetensors file; pass Wan2.2_VAE.pth "
                                     "or a diffusers VAE folder", ctx, param)
    elif p.is_dir():
        if not ((p / "config.json").is_file() or (p / "vae" / "config.json").is_file()):
            raise click.BadParameter(f"{value!r} has no config.json (nor vae/config.json); pass a diffusers "
                                     "AutoencoderKLWan folder or Wan2.2_VAE.pth", ctx, param)
    else:
        raise click.BadParameter(f"{value!r} does not exist; pass Wan2.2_VAE.pth or a diffusers VAE folder",
                                 ctx, param)
    return value


def graph_list(ctx: click.Context, param: click.Parameter, value: Optional[str]) -> Optional[list[str]]:
    """``--graphs a,b`` → ["a", "b"] (no empty names)."""
    if value is None:
        return None
    names = [v.strip() for v in value.split(",")]
    if not all(names):
        raise click.BadParameter(f"a comma-separated list of graph names, got {value!r}", ctx, param)
    return names


def trt_major(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """``--trt-version`` like 10, 10.3 or 11.0: a TensorRT major version starflow-trt targets (8-11)."""
    try:
        major = int(str(value).split(".")[0])
    except ValueError:
        raise click.BadParameter(f"must be a TensorRT version like 10 or 10.3, got {value!r}", ctx, param) from None
    if not 8 <= major <= 11:
        raise click.BadParameter(f"TensorRT {major} is not supported (8-11)", ctx, param)
    return value


def long_video(window: Optional[int], context_length: Optional[int], autoregressive: bool) -> None:
    """``generate --window / --context-length``: Jacobi sampling only, the context shorter than the window."""
    if autoregressive and (window is not None or context_length is not None):
        raise click.UsageError("--window / --context-length set the Jacobi attention window of long videos; "
                               "drop them or drop --autoregressive")
    if window is not None and context_length is not None and context_length >= window:
        raise click.BadParameter(f"{context_length} frames must be fewer than --window {window} frames; "
                                 f"pass --context-length {window - 1} or less", param_hint="'--context-length'")


def export_dir(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """An export / engine directory; a `starflow-trt demo` output stands for its FP32 export (DIR/graphs)."""
    from pathlib import Path

    root = Path(value)
    if not (root / MANIFEST_NAME).exists() and (root / "graphs" / MANIFEST_NAME).exists():
        click.echo(f"{root} is a demo output: using its export {root / 'graphs'}", err=True)
        return str(root / "graphs")
    return value


def force_option(help: str = "replace OUT if starflow-trt wrote it (never other files)") -> Callable:
    return click.option("--force", is_flag=True, help=help)


def backend_option(default: str = "ort") -> Callable:
    from ..runtime.backends import backend_names

    return click.option("--backend", type=click.Choice(backend_names()), default=default, show_default=True)


def thread_pool_option() -> Callable:
    from ..defaults import DEFAULT_THREAD_POOL
    from ..runtime.backends import THREAD_POOLS

    return click.option("--thread-pool", type=click.Choice(THREAD_POOLS), default=DEFAULT_THREAD_POOL,
                        show_default=True,
                        help="ORT CPU threads: a pool per graph, or one pool shared by all graphs (faster)")


def cuda_graphs_option() -> Callable:
    return click.option("--cuda-graphs", is_flag=True,
                        help="--backend trt (or torch on CUDA): capture each repeated call as a CUDA graph and replay it")


def torch_device_options(func: Callable) -> Callable:
    """``--device`` and ``--dtype``: where and in what precision ``--backend torch`` runs (the GPU path without TensorRT)."""
    func = click.option("--dtype", "torch_dtype", type=click.Choice(("fp32", "fp16", "bf16")), default=None,
                        help="for --backend torch: module and K/V precision (default: the export's)")(func)
    return click.option("--device", default=None, metavar="cpu|cuda[:N]",
                        help="for --backend torch: run the graphs' modules there (default cpu)")(func)


#: rank and layout of every array option (checked before the pipeline sees it)
ARRAYS = {"--text-embeddings": (3, "[B, L, D]"), "--uncond": (3, "[B, L, D]"), "--noise": (5, "[B, T, C, H, W]"),
          "--context": (5, "[B, N, C, H, W]"), "--video": (5, "[B, T, C, H, W]")}


def load_array(path: Optional[str], name: str) -> Optional[np.ndarray]:
    """A finite float32 array of the rank ``ARRAYS[name]`` from a ``.npy`` file (no pickles)."""
    if path is None:
        return None
    rank, layout = ARRAYS[name]
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise InputError(f"{name} {path!r} is not a readable .npy array ({reason}); save it with numpy.save") from exc
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu":
        raise InputError(f"{name} {path!r} holds {getattr(array, 'dtype', type(array).__name__)} data; "
                         "save a float array with numpy.save")
    if array.ndim != rank or 0 in array.shape:
        raise InputError(f"{name} {path!r} has shape {array.shape}; expected a non-empty {layout} array")
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
        raise InputError(f"{name} {path!r} contains NaN or Inf (or values beyond float32); fix the file")
    return array


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
