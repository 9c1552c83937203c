"""The OpenAI videos API on top of the streaming API: create form/JSON → the streaming request dict; shapes.

An OpenAI ``videos.create`` (multipart form or JSON) becomes the streaming API's JSON request,
which then goes through the same validator and the same generator path as ``POST /v1/videos/stream``::

    prompt           → prompt
    seconds          → frames at the export's fps: pixel frames F = round(seconds · fps) (at least 1);
                       pixel-space exports make one latent frame per pixel frame (T = F), VAE exports
                       T = (F − 1) // 4 + 1 latent frames, which decode to 1 + 4(T − 1) pixel frames
    size "WxH"       → the exported aspect of that size (a 400 lists the sizes)
    input_reference  → image (a PNG upload, or {"image_url": "data:image/png;base64,..."} in JSON)
    model            → must be the served model's id when given
    extra fields     → seed, guidance, negative_prompt, sampler, jacobi, denoise, frames (instead of seconds)

Jobs always ask for PNG frames and the mp4. Errors use OpenAI's shape
``{"error": {"message", "type", "param", "code"}}`` plus the streaming API's ``"field"``.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any, Mapping, Optional

from ..config import ModelConfig
from ..request import MAX_VIDEO_FRAMES
from .limits import RequestError
from .summary import ModelSummary

OPENAI_FIELDS = ("prompt", "model", "seconds", "size", "input_reference")
EXTRA_FIELDS = ("seed", "guidance", "negative_prompt", "sampler", "jacobi", "denoise", "frames")
#: fields the streaming API takes and a job does not: such a body must ask for a stream
STREAM_ONLY = ("text_embeddings", "negative_embeddings", "context_latents", "image", "output", "mp4", "fps",
               "aspect", "timeout_s", "stream")
STREAM_MEDIA = ("application/x-ndjson", "text/event-stream")
STREAM_PATH = "/v1/videos/stream"
#: how often the openai client's ``poll`` asks (its ``openai-poll-after-ms`` header; its default is 1 s)
POLL_AFTER_MS = 100
_INTS, _FLOATS, _BOOLS = ("seed", "frames"), ("guidance",), ("denoise",)
#: the streaming validator's field → the OpenAI parameter the client sent
_PARAMS = {"image": "input_reference"}


def wants_stream(accept: str, body: Optional[Mapping[str, Any]] = None) -> bool:
    """Whether ``POST /v1/videos`` streams: the client accepts NDJSON / SSE, the JSON body has ``stream``, or
    a client that did not ask for JSON sends a body in the streaming API's vocabulary (a streaming-only field:
    the API as it was before the jobs, e.g. ``curl -d '{"prompt": ..., "aspect": "9:16"}'``).

    The openai client sends ``Accept: application/json``: it gets a job (or a 400 for a streaming-only field).
    """
    accept = accept.lower()
    if any(m in accept for m in STREAM_MEDIA) or (body is not None and "stream" in body):
        return True
    return "application/json" not in accept and body is not None and any(k in STREAM_ONLY for k in body)


def check_job_fields(data: Mapping[str, Any]) -> None:
    """400 for a field a job does not take: streaming-only fields point to the streaming API."""
    for name in data:
        if name in STREAM_ONLY:
            raise RequestError(name, f"is a streaming API field: POST {STREAM_PATH} (or POST /v1/videos with "
                                     "'Accept: application/x-ndjson') streams it; a video job takes "
                                     f"{', '.join(OPENAI_FIELDS + EXTRA_FIELDS)}")
        if name not in OPENAI_FIELDS + EXTRA_FIELDS:
            raise RequestError(name, f"unknown field; allowed: {', '.join(OPENAI_FIELDS + EXTRA_FIELDS)}")


# ---------------------------------------------------------------------------------------------- sizes, fps
def export_fps(model: ModelSummary) -> int:
    """The fps seconds are counted in: the export's default (as every API's, :attr:`ModelSummary.default_fps`)."""
    return model.default_fps


def export_sizes(model: ModelSummary) -> dict[str, str]:
    """Exported frame sizes "WxH" (pixels) → the aspect name to request."""
    return {f"{w}x{h}": aspect for aspect, w, h in model.aspect_sizes}


def pixel_frames(latent_frames: int, vae: bool) -> int:
    return 1 + 4 * (latent_frames - 1) if vae else latent_frames


def frames_for_seconds(seconds: float, fps: int, vae: bool) -> int:
    """Latent frames that cover ``seconds`` at ``fps`` (see the module docstring for the rule)."""
    pixels = max(1, round(seconds * fps))
    return ModelConfig.latent_frames_for(pixels) if vae else pixels


def seconds_of(latent_frames: int, model: ModelSummary) -> str:
    """The clip's duration as the Video object's ``seconds`` string ("0.75")."""
    return f"{pixel_frames(latent_frames, model.vae) / export_fps(model):g}"


# ---------------------------------------------------------------------------------------------- translation
def _number(name: str, value: Any) -> Any:
    """Form fields arrive as strings: coerce the numeric and boolean ones (the validator checks ranges)."""
    if not isinstance(value, str):
        return value
    try:
        if name in _INTS:
            return int(value)
        if name in _FLOATS:
            return float(value)
    except ValueError:
        kind = "an integer" if name in _INTS else "a number"
        raise RequestError(name, f"must be {kind}, got {value!r}") from None
    if name in _BOOLS:
        if value.lower() not in ("true", "false"):
            raise RequestError(name, f"must be true or false, got {value!r}")
        return value.lower() == "true"
    return value


def form_fields(items: list[tuple[str, Any]]) -> dict[str, Any]:
    """Multipart items → fields; the client's nested ``jacobi[block_size]=16`` keys → ``{"jacobi": {...}}``.
    Every value must be text: only ``input_reference`` takes a file (the caller takes that one out)."""
    out: dict[str, Any] = {}
    for key, value in items:
        if not isinstance(value, str):
            raise RequestError(key, "is a file; only input_reference takes a file, send this field as text")
        if key.startswith("jacobi[") and key.endswith("]"):
            sub = key[len("jacobi["):-1]
            try:
                parsed = json.loads(value) if isinstance(value, str) else value
            except ValueError:
                parsed = value
            out.setdefault("jacobi", {})[sub] = parsed
        elif key in out:
            raise RequestError(key, "given more than once")
        else:
            out[key] = value
    return out


def image_from_json(value: Any) -> bytes:
    """JSON ``input_reference``: ``{"image_url": "data:image/png;base64,..."}`` → PNG bytes."""
    url = value.get("image_url") if isinstance(value, dict) else None
    if not isinstance(url, str) or not url.startswith("data:") or ";base64," not in url:
        raise RequestError("input_reference", "must be {\"image_url\": \"data:image/png;base64,...\"} in JSON "
                                              "(or a PNG file in a multipart form); remote URLs and file ids "
                                              "are not fetched")
    try:
        return base64.b64decode(url.split(";base64,", 1)[1], validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("input_reference", "the data URL is not valid base64") from None


def to_stream_request(data: Mapping[str, Any], image: Optional[bytes], model: ModelSummary,
                      model_id: str) -> dict[str, Any]:
    """OpenAI create fields (+ the input_reference image bytes) → the streaming API's JSON request dict."""
    check_job_fields(data)
    if not isinstance(data.get("prompt"), str) or not data["prompt"]:
        raise RequestError("prompt", "is required: the text of the video to generate")
    if data.get("model") not in (None, model_id):
        raise RequestError("model", f"this server serves {model_id!r}, got {data['model']!r}; "
                                    "omit model or list them with GET /v1/models")
    req: dict[str, Any] = {k: _number(k, v) for k, v in data.items() if k in EXTRA_FIELDS}
    req["prompt"] = data["prompt"]
    fps = export_fps(model)
    if data.get("seconds") is not None:
        if "frames" in req:
            raise RequestError("seconds", "give seconds or frames, not both")
        try:
            seconds = float(data["seconds"])
        except (TypeError, ValueError):
            raise RequestError("seconds", f"must be a number of seconds, got {data['seconds']!r}") from None
        longest = MAX_VIDEO_FRAMES / fps          # bounded before any arithmetic: 1e308 s is no frame count
        if not math.isfinite(seconds) or not 0 < seconds <= longest:
            raise RequestError("seconds", f"must be > 0 and at most {longest:g}, got {data['seconds']!r}")
        frames = frames_for_seconds(seconds, fps, model.vae)
        if model.window is None and frames > model.max_frames:
            longest = seconds_of(model.max_frames, model)
            raise RequestError("seconds", f"{seconds:g} s is {frames} frames at {fps} fps; this export makes "
                                          f"at most {model.max_frames} frames ({longest} s): ask for fewer seconds")
        req["frames"] = frames
    sizes = export_sizes(model)
    size = data.get("size")
    if size is not None:
        if not isinstance(size, str) or size not in sizes:
            raise RequestError("size", f"{size!r} is not an exported size; sizes: {', '.join(sizes)} "
                                       "(re-export with --aspects for more)")
        req["aspect"] = sizes[size]
    if image is not None:
        req["image"] = base64.b64encode(image).decode("ascii")
    req.update(output="png", mp4=True, fps=fps)
    return req


def openai_param(field: str) -> str:
    """The OpenAI parameter behind a streaming validator field (``image`` → ``input_reference``)."""
    head = field.split(".", 1)[0]
    return _PARAMS.get(head, field)


def size_of(req_dict: Mapping[str, Any], model: ModelSummary) -> str:
    """The "WxH" a request renders at."""
    sizes = export_sizes(model)
    aspect = req_dict.get("aspect") or model.aspect
    return next(s for s, a in sizes.items() if a == aspect)


# ---------------------------------------------------------------------------------------------- shapes
#: the longest error message an answer carries (an echoed value is cut: never an 8,000-character id)
MAX_MESSAGE_CHARS = 400


def one_line(message: object, limit: int = MAX_MESSAGE_CHARS) -> str:
    """An error message as an answer carries it: one line, at most ``limit`` characters, valid UTF-8 ("?" for a
    lone surrogate a client sent)."""
    text = " ".join(str(message).split()).encode("utf-8", "replace").decode("utf-8")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def error_body(message: str, param: Optional[str] = None, code: Optional[str] = None,
               kind: str = "invalid_request_error") -> dict[str, Any]:
    """OpenAI's error object (the client raises by status and shows ``message``) + the streaming API's field."""
    message = one_line(message)
    param = None if param is None else one_line(param, 64)
    return {"error": {"message": message, "type": kind, "param": param, "code": code}, "field": param}


def model_object(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "starflow-trt"}
