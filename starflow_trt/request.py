"""One generation request, built and validated once: the CLI's options and the server's JSON both map to it.

    req = build_request(summary, prompt=["a cat"], seed=0, aspect="9:16", guidance=3.0)
    pipe.run(req)                                  # the Pipeline executes it

A :class:`GenerationRequest` is the only input of the executor (:meth:`Pipeline.run
<starflow_trt.runtime.Pipeline.run>`): the CLI, ``Pipeline.generate`` and the server build one here and
nothing downstream validates, defaults or parses it again. Every rule about what a request may ask of
an export lives in :func:`build_request`; a bad value raises :class:`RequestError` naming the field
(the JSON name: ``guidance``, ``jacobi.block_size``) with a one-line reason, the same text in the CLI
(exit 2), the API and the server (HTTP 400). No torch here: the server's ingress validates without it
(torch tensors are accepted by duck typing and kept as float32 host arrays).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional, Sequence, Union

import numpy as np

from .defaults import DEFAULT_CONTEXT_LENGTH, SCHEDULES
from .errors import InputError
from .frame_plan import denoise_plan, denoise_steps, resolve_window
from .jacobi_config import REQUEST_FIELDS, JacobiConfig
from .summary import ModelSummary

SAMPLERS = ("jacobi", "autoregressive")
#: the aspect that draws one of the export's aspects per row from the row's seed (upstream draws from its nine)
RANDOM_ASPECT = "random"
#: the longest video a request may ask for (latent frames; beyond ``max_frames``: the Jacobi window)
MAX_VIDEO_FRAMES = 1 << 16

ImageInput = Union[str, os.PathLike, np.ndarray]


class RequestError(InputError):
    """An invalid request: ``field`` names the offending field (JSON name), ``reason`` says why and the fix."""

    def __init__(self, field_name: str, reason: str):
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name
        self.reason = reason


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on one request (``max_timeout_s`` is also the server's default deadline).

    ``max_frames``: latent frames (None: the export's ``max_frames``, the server's default); ``max_batch``: rows
    of a request and of the call it joins (None: any; calls run chunks of the export's ``max_batch``);
    ``max_memory_mb``: the estimated working memory (:meth:`~starflow_trt.costs.CallMemory.call_bytes`) of the
    largest call the request can be part of (None: unchecked). The server sets all three (``serve
    --max-frames``, ``--max-batch``, ``--memory-budget``).
    """

    max_frames: Optional[int] = MAX_VIDEO_FRAMES
    max_batch: Optional[int] = None
    max_memory_mb: Optional[float] = None
    max_body_bytes: int = 16 << 20
    max_prompt_chars: int = 2000
    max_guidance: float = 30.0
    max_block_size: int = 4096
    max_iter: int = 256
    max_fps: int = 120
    max_image_pixels: int = 4096 * 4096
    max_timeout_s: float = 600.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, eq=False)
class GenerationRequest:
    """A validated request of ``batch`` rows: what the executor runs, every default resolved.

    Text: ``prompts`` (B strings, ``negative_prompts`` B or None) or embeddings ``y`` [B, L, D] with
    ``y_uncond`` [B, L, D] (guidance > 0). ``jacobi``: the options of sampler ``jacobi`` (its ``window``
    resolved: the model's attention window, else the export's frames); ignored by ``autoregressive``. Conditioning: ``image`` ([h, w, 3] uint8 or a path), ``video``
    ([F, h, w, 3] uint8 or a path) or ``context`` latents [B, N, C, H, W]; ``noise`` [B, T, C, H, W] or drawn
    from ``seed``: an int seeds the call (chunk k of a batch beyond max_batch: seed + k), a tuple one seed
    per row (row b equals a one-row request with ``seeds[b]``). ``aspect``: an exported aspect name.
    """

    seed: Union[int, tuple[int, ...]]
    frames: int
    aspect: str
    guidance: float
    sampler: str
    jacobi: JacobiConfig
    denoise: bool
    fps: int
    prompts: Optional[tuple[str, ...]] = None
    negative_prompts: Optional[tuple[str, ...]] = None
    y: Optional[np.ndarray] = None
    y_uncond: Optional[np.ndarray] = None
    image: Optional[ImageInput] = None
    video: Optional[ImageInput] = None
    context: Optional[np.ndarray] = None
    noise: Optional[np.ndarray] = None

    @property
    def batch(self) -> int:
        return len(self.prompts) if self.prompts is not None else int(self.y.shape[0])

    @property
    def seeds(self) -> Optional[tuple[int, ...]]:
        """One seed per row (None when the seed is the call's)."""
        return self.seed if isinstance(self.seed, tuple) else None

    @property
    def context_frames(self) -> int:
        """Latent context frames (an image: 1)."""
        if self.context is not None:
            return int(self.context.shape[1])
        return 1 if self.image is not None else 0

    @property
    def exact_batching(self) -> bool:
        """Whether sharing a ``generate`` call with other rows cannot change this request's frames.

        Autoregressive sampling and Jacobi with threshold 0 commit tokens independently of the
        other batch rows; a thresholded Jacobi stopping test averages over the batch.
        """
        return self.sampler == "autoregressive" or self.jacobi.threshold == 0

    @property
    def encoded(self) -> bool:
        """Whether the text and conditioning are tensors already (no prompt, image or video left to encode)."""
        return self.prompts is None and self.image is None and self.video is None

    @property
    def jacobi_options(self) -> Optional[JacobiConfig]:
        """The Jacobi options the sampler runs (None: autoregressive)."""
        return self.jacobi if self.sampler == "jacobi" else None

    def with_seeds(self) -> "GenerationRequest":
        """The request with one seed per row (an int seed ``s`` of a one-row request becomes ``(s,)``)."""
        if isinstance(self.seed, tuple):
            return self
        if self.batch != 1:
            raise InputError("per-row seeds of a batched request need the seeds of every row")
        return replace(self, seed=(self.seed,))


def stack_rows(requests: Sequence[GenerationRequest]) -> GenerationRequest:
    """Encoded one-seed-per-row requests of equal options (the server's batch key) → one request of all their
    rows; row b runs as ``requests[b]`` alone would (its own noise and context noise from its seed)."""
    first = requests[0]
    if not all(r.encoded and isinstance(r.seed, tuple) for r in requests):
        raise InputError("stack_rows takes encoded requests (Pipeline.prepare) with one seed per row")

    def cat(name: str) -> Optional[np.ndarray]:
        parts = [getattr(r, name) for r in requests]
        if all(p is None for p in parts):
            return None
        if any(p is None for p in parts):
            raise InputError(f"stack_rows: {name} is given for some rows only")
        return np.concatenate(parts)

    return replace(first, seed=tuple(s for r in requests for s in r.seed), y=cat("y"), y_uncond=cat("y_uncond"),
                   context=cat("context"), noise=cat("noise"))


# ---------------------------------------------------------------------------------------------- values
def _show(value: Any) -> str:
    try:
        return json.dumps(value, allow_nan=True)
    except (TypeError, ValueError):
        return type(value).__name__


def check_int(name: str, value: Any, lo: int, hi: int, why: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise RequestError(name, f"must be an integer in [{lo}, {hi}]{why}, got {_show(value)}")
    return int(value)


def check_float(name: str, value: Any, lo: float, hi: float) -> float:
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.floating))
    if not ok or not math.isfinite(value) or not lo <= value <= hi:
        raise RequestError(name, f"must be a number in [{lo:g}, {hi:g}], got {_show(value)}")
    return float(value)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise RequestError(name, f"must be true or false, got {_show(value)}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise RequestError(name, f"must be one of {', '.join(choices)}, got {_show(value)}")
    return value


def _texts(name: str, value: Any, limits: RequestLimits) -> Optional[tuple[str, ...]]:
    if value is None:
        return None
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(v, str) for v in items):
        raise RequestError(name, f"must be a string, got {type(value).__name__}")
    for v in items:
        if len(v) > limits.max_prompt_chars:
            raise RequestError(name, f"{len(v)} characters exceed the limit of {limits.max_prompt_chars}")
    return tuple(items)


def _array(name: str, value: Any, layout: str, size: tuple[Optional[int], ...], what: str = "") -> Optional[np.ndarray]:
    """A finite float32 array of ``len(size)`` dims; None entries of ``size`` are free; ``what`` explains them."""
    if value is None:
        return None
    if hasattr(value, "detach") and hasattr(value, "is_floating_point"):   # a torch tensor (the Python API)
        if str(value.dtype) == "torch.bool":
            raise RequestError(name, f"must be a float array, got dtype {value.dtype}")
        value = value.detach().float().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype.kind not in "fiu":
        raise RequestError(name, f"must be a float array, got dtype {arr.dtype}")
    if arr.ndim != len(size) or 0 in arr.shape or any(w is not None and w != s for w, s in zip(size, arr.shape)):
        want = ", ".join(d if w is None else str(w) for d, w in zip(layout.split(", "), size))
        raise RequestError(name, f"must be [{layout}] = [{want}]{what}, got shape {list(arr.shape)}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise RequestError(name, "contains NaN or Inf")
    return arr


# --------------------------------------------------------------------------------------------- request
def build_request(model: ModelSummary, limits: RequestLimits = RequestLimits(), *, prompt: Any = None,
                  negative_prompt: Any = None, text_embeddings: Any = None, negative_embeddings: Any = None,
                  image: Any = None, video: Any = None, context_latents: Any = None, noise: Any = None,
                  seed: Any = None, frames: Any = None, aspect: Any = None, fps: Any = None, guidance: Any = None,
                  sampler: Any = None, jacobi: Union[None, dict, JacobiConfig] = None,
                  denoise: Any = True) -> GenerationRequest:
    """Plain values (JSON fields, CLI options) → a :class:`GenerationRequest`, or :class:`RequestError`.

    prompt: a string or a list (one per row); text_embeddings [B, L, D]; seed: an int (the call's), a list
    (per row) or None (fresh); guidance None: the export's default with a prompt, 0 with embeddings;
    aspect None: the size of the given context / noise, else the export's default; jacobi: a mapping of
    :data:`~.jacobi_config.REQUEST_FIELDS` or a :class:`JacobiConfig` (sampler jacobi only). Arrays: numpy or
    torch, held as float32 host arrays.
    """
    m, lim = model, limits
    prompts = _texts("prompt", prompt, lim)
    negatives = _texts("negative_prompt", negative_prompt, lim)
    check_sources(prompt=prompts, text_embeddings=text_embeddings, negative_prompt=negatives,
                  negative_embeddings=negative_embeddings, image=image, video=video, context=context_latents)
    if prompts is not None and m.prompt_encoder is None:
        raise RequestError("prompt", "this export has no text_encoder graph; send text_embeddings "
                                     f"[{m.text_length}, {m.text_width}] or re-export with --text-encoder")
    if negatives is not None and len(negatives) != len(prompts):
        raise RequestError("negative_prompt", f"{len(negatives)} negative prompts for {len(prompts)} prompts; "
                                              "give one per prompt or none")
    text, L, D = "B, L, D", m.text_length, m.text_width
    what = f" (text embeddings of length {L}, width {D})"
    y = _array("text_embeddings", text_embeddings, text, (None, L, D), what)
    batch = len(prompts) if prompts is not None else y.shape[0]
    y_uncond = _array("negative_embeddings", negative_embeddings, text, (batch, L, D), what)
    seed = _seed(seed, batch)
    if guidance is None:
        guidance = m.default_guidance if prompts is not None else 0.0
    g = check_float("guidance", guidance, 0.0, lim.max_guidance)
    if g > 0 and y is not None and y_uncond is None:
        raise RequestError("negative_embeddings", "guidance > 0 needs negative_embeddings (the empty-prompt "
                                                  "embeddings) when the request sends text_embeddings")
    sampler = check_choice("sampler", "jacobi" if sampler is None else sampler, SAMPLERS)
    options = _jacobi(jacobi, sampler, m, lim)
    noise = _array("noise", noise, "B, T, C, H, W", (batch, None, m.channels, None, None))
    ctx = _array("context_latents", context_latents, "B, N, C, H, W", (None, None, m.channels, None, None))
    if ctx is not None and ctx.shape[0] != batch:
        raise RequestError("context_latents", f"has {ctx.shape[0]} rows for a batch of {batch}; give one per row")
    if aspect == RANDOM_ASPECT:
        if batch != 1:
            raise RequestError("aspect", f"{RANDOM_ASPECT} draws one aspect per row: send one row per request")
        aspect = draw_aspect(m, seed if isinstance(seed, int) else seed[0])
    aspect = _aspect(m, aspect, ctx if ctx is not None else noise)
    H, W = m.latent_size(aspect)
    for name, arr in (("noise", noise), ("context_latents", ctx)):
        if arr is not None and tuple(arr.shape[-2:]) != (H, W):
            raise RequestError(name, f"latent frames must be {m.channels}x{H}x{W} (aspect {aspect}), "
                                     f"got {'x'.join(map(str, arr.shape[2:]))}")
    n = frames if frames is not None else (noise.shape[1] if noise is not None else m.max_frames)
    n = check_int("frames", n, 1, MAX_VIDEO_FRAMES)
    if noise is not None and noise.shape[1] != n:
        raise RequestError("frames", f"{n} frames but the noise has {noise.shape[1]}; drop one of them")
    if n > m.max_frames and sampler != "jacobi":
        raise RequestError("sampler", f"{n} frames exceed the export's {m.max_frames}: a longer video runs "
                                      "through the attention window, which needs sampler jacobi")
    fps = check_int("fps", model.default_fps if fps is None else fps, 1, lim.max_fps)
    _media(m, prompts, image, video, ctx)
    n_ctx = int(ctx.shape[1]) if ctx is not None else (1 if image is not None else 0)
    if n_ctx and not n_ctx < n:
        raise RequestError("frames", f"must exceed the {n_ctx} context frame(s), got {n}")
    req = GenerationRequest(seed=seed, frames=n, aspect=aspect, guidance=g, sampler=sampler, jacobi=options,
                            denoise=check_bool("denoise", denoise), fps=fps, prompts=prompts,
                            negative_prompts=negatives, y=y, y_uncond=y_uncond if g > 0 else None, image=image,
                            video=video, context=ctx, noise=noise)
    check_budget(req, m, lim)
    check_frame_plan(req, m)
    return req


def check_frame_plan(req: GenerationRequest, m: ModelSummary) -> None:
    """Refuse a request whose frames the sampler could not plan (the long-video window, the denoising chunks),
    before any work: the same functions the sampler plans with."""
    try:
        window, _ = resolve_window(req.jacobi_options, req.frames, m.window, m.max_frames)
        if req.denoise and m.has_denoiser:
            denoise_plan(req.frames, denoise_steps(window, m.window, req.frames), m.denoiser_window)
    except InputError as exc:
        raise RequestError("frames", str(exc)) from None


def check_budget(req: GenerationRequest, m: ModelSummary, lim: RequestLimits) -> None:
    """Refuse a request beyond the limits on work (frames, rows, estimated memory), naming the limit and the
    ``serve`` option that sets it."""
    if lim.max_batch is not None and req.batch > lim.max_batch:
        raise RequestError("prompt" if req.prompts is not None else "text_embeddings",
                           f"{req.batch} rows exceed the limit of {lim.max_batch} a request (serve --max-batch); "
                           "send fewer rows")
    limit = m.max_frames if lim.max_frames is None else lim.max_frames
    if req.frames > limit:
        whose = ("serve --max-frames" if lim.max_frames is not None
                 else "the export's max_frames; serve --max-frames raises it")
        raise RequestError("frames", f"{req.frames} latent frames exceed the limit of {limit} ({whose}); "
                                     "ask for fewer frames")
    if lim.max_memory_mb is None or m.memory is None:
        return
    rows = min(m.max_batch, lim.max_batch or m.max_batch)     # the largest call this request can join
    jac = req.jacobi_options
    window = jac.window if jac is not None and jac.window and req.frames > jac.window else None
    sweep = 1 if jac is None else jac.max_sweep_tokens
    need = m.memory.call_bytes(rows, req.frames, window, req.guidance > 0, sweep, req.context_frames,
                               req.denoise and m.has_denoiser, m.pixel_frames) / (1 << 20)
    if need > lim.max_memory_mb:
        raise RequestError("frames", f"{req.frames} frames need an estimated {need:.0f} MiB in a call of {rows} "
                                     f"row(s), over the budget of {lim.max_memory_mb:.0f} MiB (serve "
                                     "--memory-budget); ask for fewer frames or a smaller jacobi.block_size")


def _seed(seed: Any, batch: int) -> Union[int, tuple[int, ...]]:
    import secrets

    if seed is None:
        return secrets.randbelow(2 ** 31)
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch:
            raise RequestError("seed", f"{len(seed)} seeds for {batch} rows; give one per row or one integer")
        return tuple(check_int("seed", s, 0, 2 ** 63 - 1) for s in seed)
    return check_int("seed", seed, 0, 2 ** 63 - 1)


def draw_aspect(model: ModelSummary, seed: int) -> str:
    """One of the export's aspects, drawn from ``seed`` (what ``aspect: random`` gives a row of that seed)."""
    import random

    names = model.aspect_names
    return names[random.Random(seed).randrange(len(names))]


def _aspect(m: ModelSummary, aspect: Any, latents: Optional[np.ndarray]) -> str:
    """The exported aspect name of a request (given, else that of its latents' size, else the default)."""
    names = m.aspect_names
    if aspect is None:
        if latents is not None:
            for name, h, w in m.grid_aspects:
                if (h, w) == tuple(latents.shape[-2:]):
                    return name
        return m.aspect
    if aspect not in names:
        sizes = ", ".join(f"{a} ({w * m.pixel_scale}x{h * m.pixel_scale})" for a, h, w in m.grid_aspects)
        ratio = isinstance(aspect, str) and re.fullmatch(r"[1-9][0-9]*:[1-9][0-9]*", aspect)
        fix = (f"re-export with --aspects {aspect} to add it" if ratio else f"choose one of them or {RANDOM_ASPECT}")
        raise RequestError("aspect", f"this export serves {sizes}, got {_show(aspect)}; {fix}")
    return aspect


def check_sources(*, prompt: Any, text_embeddings: Any, negative_prompt: Any = None, negative_embeddings: Any = None,
                  image: Any = None, video: Any = None, context: Any = None) -> None:
    """Which inputs one request may combine (the CLI, the server and ``Pipeline.generate`` alike)."""
    if (prompt is None) == (text_embeddings is None):
        raise RequestError("prompt", "give either text embeddings or a prompt, exactly one")
    if negative_prompt is not None and prompt is None:
        raise RequestError("negative_prompt", "goes with prompt; with text_embeddings send negative_embeddings")
    if prompt is not None and negative_embeddings is not None:
        raise RequestError("negative_embeddings", "goes with text_embeddings; with prompt send negative_prompt")
    if image is not None and video is not None:
        raise RequestError("image", "give image or video, not both")
    if (image is not None or video is not None) and context is not None:
        raise RequestError("image" if image is not None else "video", "give image / video or context_latents, "
                                                                      "not both")


def _media(m: ModelSummary, prompts, image, video, ctx) -> None:
    if image is not None and not (m.vae_encoder or m.pixel_space):
        raise RequestError("image", "image conditioning needs VAE encoder graphs, which this export lacks; "
                                    "send context_latents [N, C, H, W] instead")
    if video is not None and not m.vae_encoder:
        raise RequestError("video", "video conditioning needs VAE encoder graphs, which this export lacks; "
                                    "send context_latents [N, C, H, W] instead")


def _jacobi(value: Union[None, dict, JacobiConfig], sampler: str, m: ModelSummary, lim: RequestLimits) -> JacobiConfig:
    """The request's Jacobi options: a mapping of :data:`~.jacobi_config.REQUEST_FIELDS` (JSON, CLI) or a
    :class:`JacobiConfig` (the API); ``window`` None: the model's attention window, else the export's frames
    (upstream's: the training length)."""
    if value is None:
        value = {}
    elif sampler != "jacobi":
        raise RequestError("jacobi", "options need sampler jacobi")
    floor = 0.0
    if isinstance(value, JacobiConfig):
        value, floor = {f: getattr(value, f) for f in REQUEST_FIELDS}, value.floor
    if not isinstance(value, dict):
        raise RequestError("jacobi", f"must be an object {{{', '.join(REQUEST_FIELDS)}}}")
    unknown = sorted(set(value) - set(REQUEST_FIELDS))
    if unknown:
        raise RequestError(f"jacobi.{unknown[0]}", f"unknown field; allowed: {', '.join(REQUEST_FIELDS)}")
    d = JacobiConfig()
    get = value.get
    window = get("window")
    window = m.window or m.max_frames if window is None else check_int("jacobi.window", window, 1, m.max_frames,
                                                                       " (the export's frames)")
    context = get("context_length")
    if context is None:
        context = min(DEFAULT_CONTEXT_LENGTH, window - 1) if window > 1 else None
    else:
        context = check_int("jacobi.context_length", context, 1, MAX_VIDEO_FRAMES)
        if context >= window:
            raise RequestError("jacobi.context_length", f"{context} frames must be fewer than the window of "
                                                        f"{window}; give {window - 1} or less")
    schedule = get("schedule")
    return JacobiConfig(
        block_size=check_int("jacobi.block_size", get("block_size", d.block_size), 1, lim.max_block_size),
        max_iter=check_int("jacobi.max_iter", get("max_iter", d.max_iter), 1, lim.max_iter),
        threshold=check_float("jacobi.threshold", get("threshold", d.threshold), 0.0, 1.0),
        schedule=None if schedule is None else check_choice("jacobi.schedule", schedule, SCHEDULES),
        window=window, context_length=context, floor=floor)
