"""``POST /v1/videos`` request schema: JSON → the shared :class:`~starflow_trt.request.GenerationRequest`
plus the stream's own options (no Ray, no torch, no pickle).

A JSON body becomes a :class:`VideoRequest` or raises :class:`RequestError` whose message is
one line naming the field (HTTP 400); every generation rule is :func:`starflow_trt.request.build_request`'s,
the same the CLI applies::

    {"prompt": "a red square moving right", "seed": 0, "guidance": 3.0, "aspect": "9:16"}
    {"text_embeddings": "<base64 .npy [L, D]>", "negative_embeddings": "...", "frames": 4,
     "sampler": "jacobi", "jacobi": {"block_size": 16, "max_iter": 32, "threshold": 0.001},
     "output": "latents", "denoise": true, "mp4": false, "stream": "ndjson", "timeout_s": 60}

Arrays travel as base64 of ``numpy.save`` bytes, read with ``allow_pickle=False``; images as
base64 PNG (dimensions read from the header before decoding).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import secrets
import struct
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..request import (GenerationRequest, JacobiConfig, RequestError, RequestLimits, build_request, check_bool,
                       check_choice, check_float)
from .summary import ModelSummary

__all__ = ["VideoRequest", "RequestError", "RequestLimits", "JacobiConfig", "parse_request", "check_text",
           "encode_npy", "decode_npy", "ALLOWED", "OUTPUTS", "STREAMS"]

OUTPUTS = ("png", "latents")
STREAMS = ("ndjson", "sse")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class VideoRequest:
    """One HTTP request: its one-row :class:`GenerationRequest` (per-row seed) and how to stream it back."""

    generation: GenerationRequest
    output: str
    mp4: bool
    stream: str
    timeout_s: float
    request_id: str = field(default_factory=lambda: secrets.token_hex(8))

    @property
    def seed(self) -> int:
        return self.generation.seed[0]

    # the generation fields the replica and the batcher read
    frames = property(lambda self: self.generation.frames)
    guidance = property(lambda self: self.generation.guidance)
    sampler = property(lambda self: self.generation.sampler)
    jacobi = property(lambda self: self.generation.jacobi)
    aspect = property(lambda self: self.generation.aspect)
    denoise = property(lambda self: self.generation.denoise)
    fps = property(lambda self: self.generation.fps)
    context_frames = property(lambda self: self.generation.context_frames)
    exact_batching = property(lambda self: self.generation.exact_batching)


ALLOWED = ("prompt", "negative_prompt", "text_embeddings", "negative_embeddings", "seed", "guidance", "frames",
           "aspect", "fps", "sampler", "jacobi", "denoise", "output", "mp4", "image", "context_latents",
           "timeout_s", "stream")


def parse_request(body: bytes, model: ModelSummary, limits: RequestLimits) -> VideoRequest:
    """JSON body → :class:`VideoRequest`, or :class:`RequestError` naming the first bad field."""
    if len(body) > limits.max_body_bytes:
        raise RequestError("body", f"{len(body)} bytes exceed the limit of {limits.max_body_bytes}; "
                                   "send smaller embeddings or images")
    try:
        data = json.loads(body)
    except ValueError as exc:   # not JSON, not UTF-8, or an integer of more than 4300 digits (int's own limit)
        raise RequestError("body", f"not valid JSON ({exc}); send a JSON object") from None
    except RecursionError:
        raise RequestError("body", "JSON nested too deeply; send a flat JSON object") from None
    if not isinstance(data, dict):
        raise RequestError("body", f"must be a JSON object, got {type(data).__name__}")
    check_text(data)
    unknown = sorted(set(data) - set(ALLOWED))
    if unknown:
        raise RequestError(unknown[0], f"unknown field; allowed: {', '.join(ALLOWED)}")
    d = data.get
    for name in ("prompt", "negative_prompt"):
        if d(name) is not None and not isinstance(d(name), str):
            raise RequestError(name, f"must be a string, got {type(d(name)).__name__}")
    seed = d("seed")
    gen = build_request(
        model, limits, prompt=d("prompt"), negative_prompt=d("negative_prompt"),
        # with a prompt the embeddings are refused undecoded (build_request: exactly one of the two)
        text_embeddings=_npy(data, "text_embeddings", 2) if d("prompt") is None else d("text_embeddings"),
        negative_embeddings=_npy(data, "negative_embeddings", 2),
        image=_png(data, "image", model, limits), context_latents=_npy(data, "context_latents", 4),
        seed=None if seed is None else [seed], frames=d("frames"), aspect=d("aspect"), fps=d("fps"),
        guidance=d("guidance"), sampler=d("sampler"), jacobi=d("jacobi"), denoise=d("denoise", True))
    if gen.seeds is None:   # no seed: a fresh one, kept per row
        gen = gen.with_seeds()
    output = check_choice("output", d("output", "png" if model.pixel_frames else "latents"), OUTPUTS)
    if output == "png" and not model.pixel_frames:
        raise RequestError("output", "PNG frames need VAE decoder graphs, which this export lacks; use latents")
    mp4 = check_bool("mp4", d("mp4", False))
    if mp4 and not model.pixel_frames:
        raise RequestError("mp4", "an mp4 needs VAE decoder graphs, which this export lacks; set mp4 false")
    timeout = check_float("timeout_s", d("timeout_s", limits.max_timeout_s), 0.0, limits.max_timeout_s)
    if timeout == 0:
        raise RequestError("timeout_s", f"must be > 0 and <= {limits.max_timeout_s:g}")
    return VideoRequest(generation=gen, output=output, mp4=mp4, stream=check_choice("stream", d("stream", "ndjson"),
                                                                                    STREAMS), timeout_s=timeout)


def check_text(data: dict) -> None:
    """:class:`RequestError` for a string (key or value, at any depth) that is not valid Unicode: JSON's
    ``"\\ud800"`` escape decodes to a lone surrogate, which no encoder, file or answer can take."""
    stack = [(name, name, value) for name, value in data.items()]
    while stack:
        field_name, key, value = stack.pop()
        for text in (key, value):
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise RequestError(field_name if isinstance(field_name, str) and field_name.isascii()
                                       else "body", "is not valid Unicode text (a lone surrogate such as "
                                                    "\\ud800); send UTF-8 text") from None
        if isinstance(value, dict):
            stack.extend((field_name, k, v) for k, v in value.items())
        elif isinstance(value, list):
            stack.extend((field_name, None, v) for v in value)


def _b64(data: dict, name: str) -> Optional[bytes]:
    v = data.get(name)
    if v is None:
        return None
    if not isinstance(v, str):
        raise RequestError(name, "must be a base64 string")
    try:
        return base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(name, "is not valid base64") from None


def _npy(data: dict, name: str, ndim: int) -> Optional[np.ndarray]:
    """A base64 ``.npy`` field of one row ([...] of ``ndim`` dims, or [1, ...]) → [1, ...]."""
    raw = _b64(data, name)
    if raw is None:
        return None
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise RequestError(name, f"is not a .npy array ({' '.join(str(exc).split())}); "
                                 "encode numpy.save bytes in base64") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
        raise RequestError(name, f"must be a float array, got dtype {getattr(arr, 'dtype', type(arr))}")
    return arr if arr.ndim == ndim + 1 and arr.shape[0] == 1 else arr[None]


def _png(data: dict, name: str, model: ModelSummary, limits: RequestLimits) -> Optional[np.ndarray]:
    """A base64 PNG → [h, w, 3] uint8 RGB (size bounded from the header before decoding)."""
    raw = _b64(data, name)
    if raw is None:
        return None
    if raw[:8] != PNG_MAGIC or len(raw) < 24 or raw[12:16] != b"IHDR":
        raise RequestError(name, "must be a base64 PNG image")
    w, h = struct.unpack(">II", raw[16:24])
    if w == 0 or h == 0 or w * h > limits.max_image_pixels:
        raise RequestError(name, f"{w}x{h} pixels: need 1 to {limits.max_image_pixels} pixels")
    from ..errors import InputError
    from ..media.images import decode_image   # no torch in the ingress

    try:
        return decode_image(raw)
    except InputError:
        raise RequestError(name, "PNG could not be decoded") from None


def encode_npy(array: np.ndarray) -> str:
    """numpy array → base64 of its ``.npy`` bytes (what the request and frame events carry)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_npy(text: str) -> np.ndarray:
    """Inverse of :func:`encode_npy` (``allow_pickle=False``)."""
    return np.load(io.BytesIO(base64.b64decode(text, validate=True)), allow_pickle=False)
