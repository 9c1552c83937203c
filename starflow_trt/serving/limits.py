"""``POST /v1/videos`` request schema, size and option limits, validation (no Ray, no pickle).

A JSON body becomes a :class:`VideoRequest` or raises :class:`RequestError` whose message is
one line naming the field (HTTP 400)::

    {"prompt": "a red square moving right", "seed": 0, "guidance": 3.0}
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
import math
import secrets
import struct
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

from ..errors import InputError
from .summary import ModelSummary

SAMPLERS = ("jacobi", "autoregressive")
SCHEDULES = ("predictive", "sliding", "upstream")
OUTPUTS = ("png", "latents")
STREAMS = ("ndjson", "sse")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class RequestError(InputError):
    """An invalid request (HTTP 400): ``field`` names the offending JSON field."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class RequestLimits:
    """Server-side bounds on one request (``max_timeout_s`` is also the default deadline)."""

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


@dataclass(frozen=True)
class JacobiOptions:
    block_size: int = 16
    max_iter: int = 32
    threshold: float = 1e-3
    schedule: Optional[str] = None   # None: the runtime's default (predictive)


@dataclass
class VideoRequest:
    """A validated request. Arrays: y [L, D], y_uncond [L, D] or None, context [N, C, H, W] or None."""

    seed: int
    frames: int
    guidance: float
    sampler: str
    jacobi: JacobiOptions
    denoise: bool
    output: str
    mp4: bool
    fps: int
    stream: str
    timeout_s: float
    prompt: Optional[str] = None
    negative_prompt: Optional[str] = None
    y: Optional[np.ndarray] = None
    y_uncond: Optional[np.ndarray] = None
    image: Optional[np.ndarray] = None       # [3, H, W] float32 in [-1, 1] (pixel-space models)
    context: Optional[np.ndarray] = None     # [N, C, H, W] float32 latents
    request_id: str = field(default_factory=lambda: secrets.token_hex(8))

    @property
    def context_frames(self) -> int:
        return 1 if self.image is not None else (0 if self.context is None else int(self.context.shape[0]))

    @property
    def exact_batching(self) -> bool:
        """Whether sharing a ``generate`` call cannot change this request's frames.

        Autoregressive sampling and Jacobi with threshold 0 commit tokens independently of the
        other batch rows; a thresholded Jacobi stopping test averages over the batch.
        """
        return self.sampler == "autoregressive" or self.jacobi.threshold == 0


ALLOWED = ("prompt", "negative_prompt", "text_embeddings", "negative_embeddings", "seed", "guidance", "frames",
           "aspect", "fps", "sampler", "jacobi", "denoise", "output", "mp4", "image", "context_latents",
           "timeout_s", "stream")
JACOBI_ALLOWED = ("block_size", "max_iter", "threshold", "schedule")


def parse_request(body: bytes, model: ModelSummary, limits: RequestLimits) -> VideoRequest:
    """JSON body → :class:`VideoRequest`, or :class:`RequestError` naming the first bad field."""
    if len(body) > limits.max_body_bytes:
        raise RequestError("body", f"{len(body)} bytes exceed the limit of {limits.max_body_bytes}; "
                                   "send smaller embeddings or images")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError("body", f"not valid JSON ({exc}); send a JSON object") from None
    if not isinstance(data, dict):
        raise RequestError("body", f"must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - set(ALLOWED))
    if unknown:
        raise RequestError(unknown[0], f"unknown field; allowed: {', '.join(ALLOWED)}")
    return _Parser(data, model, limits).parse()


class _Parser:
    def __init__(self, data: dict, model: ModelSummary, limits: RequestLimits):
        self.d, self.m, self.lim = data, model, limits

    # ------------------------------------------------------------ scalars
    def _int(self, name: str, default: Optional[int], lo: int, hi: int, why: str = "") -> Optional[int]:
        v = self.d.get(name, default)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise RequestError(name, f"must be an integer in [{lo}, {hi}]{why}, got {json.dumps(v)}")
        return v

    def _float(self, name: str, default: float, lo: float, hi: float) -> float:
        v = self.d.get(name, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
            raise RequestError(name, f"must be a number in [{lo:g}, {hi:g}], got {json.dumps(v)}")
        return float(v)

    def _bool(self, name: str, default: bool) -> bool:
        v = self.d.get(name, default)
        if not isinstance(v, bool):
            raise RequestError(name, f"must be true or false, got {json.dumps(v)}")
        return v

    def _choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        v = self.d.get(name, default)
        if v not in choices:
            raise RequestError(name, f"must be one of {', '.join(choices)}, got {json.dumps(v)}")
        return v

    def _text(self, name: str) -> Optional[str]:
        v = self.d.get(name)
        if v is None:
            return None
        if not isinstance(v, str):
            raise RequestError(name, f"must be a string, got {type(v).__name__}")
        if len(v) > self.lim.max_prompt_chars:
            raise RequestError(name, f"{len(v)} characters exceed the limit of {self.lim.max_prompt_chars}")
        return v

    # ------------------------------------------------------------ payloads
    def _b64(self, name: str) -> Optional[bytes]:
        v = self.d.get(name)
        if v is None:
            return None
        if not isinstance(v, str):
            raise RequestError(name, "must be a base64 string")
        try:
            return base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(name, "is not valid base64") from None

    def _npy(self, name: str, shape: tuple[Optional[int], ...], what: str) -> Optional[np.ndarray]:
        raw = self._b64(name)
        if raw is None:
            return None
        try:
            arr = np.load(io.BytesIO(raw), allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise RequestError(name, f"is not a .npy array ({' '.join(str(exc).split())}); "
                                     "encode numpy.save bytes in base64") from None
        if not isinstance(arr, np.ndarray) or arr.dtype.kind != "f":
            raise RequestError(name, f"must be a float array, got dtype {getattr(arr, 'dtype', type(arr))}")
        if arr.ndim == len(shape) + 1 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != len(shape) or any(w is not None and w != s for w, s in zip(shape, arr.shape)):
            want = ", ".join("N" if w is None else str(w) for w in shape)
            raise RequestError(name, f"must be {what} [{want}], got shape {list(arr.shape)}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if not np.isfinite(arr).all():
            raise RequestError(name, "contains NaN or Inf")
        return arr

    def _png(self, name: str) -> Optional[np.ndarray]:
        raw = self._b64(name)
        if raw is None:
            return None
        if not self.m.pixel_space:
            raise RequestError(name, "image conditioning needs a VAE encoder, which this export lacks; "
                                     "send context_latents [N, C, H, W] instead")
        if raw[:8] != PNG_MAGIC or len(raw) < 24 or raw[12:16] != b"IHDR":
            raise RequestError(name, "must be a base64 PNG image")
        w, h = struct.unpack(">II", raw[16:24])
        if w == 0 or h == 0 or w * h > self.lim.max_image_pixels:
            raise RequestError(name, f"{w}x{h} pixels: need 1 to {self.lim.max_image_pixels} pixels")
        import cv2

        img = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise RequestError(name, "PNG could not be decoded")
        return fit_image(img[..., ::-1], self.m.height, self.m.width)

    # ------------------------------------------------------------ request
    def parse(self) -> VideoRequest:
        m, lim = self.m, self.lim
        prompt, negative = self._text("prompt"), self._text("negative_prompt")
        has_y = self.d.get("text_embeddings") is not None
        if (prompt is None) == (not has_y):
            raise RequestError("prompt", "give exactly one of prompt or text_embeddings")
        if prompt is not None and m.prompt_encoder is None:
            raise RequestError("prompt", "this export has no text encoder yet; send text_embeddings "
                                         f"(base64 .npy [{m.text_length}, {m.text_width}])")
        if negative is not None and m.prompt_encoder is None:
            raise RequestError("negative_prompt", "this export has no text encoder; send negative_embeddings")
        y = self._npy("text_embeddings", (m.text_length, m.text_width), "text embeddings")
        y_uncond = self._npy("negative_embeddings", (m.text_length, m.text_width), "text embeddings")
        seed = self._int("seed", None, 0, 2**63 - 1)
        if seed is None:
            seed = secrets.randbelow(2**31)
        guidance = self._float("guidance", m.default_guidance if prompt is not None else 0.0, 0.0, lim.max_guidance)
        if guidance > 0 and prompt is None and y_uncond is None:
            raise RequestError("negative_embeddings", "guidance > 0 needs negative_embeddings (the empty-prompt "
                                                      "embeddings) when the request sends text_embeddings")
        window = m.window
        frames = self._int("frames", m.max_frames, 1, m.max_frames if window is None else 1 << 16,
                           " (the export's max_frames)" if window is None else "")
        aspect = self.d.get("aspect")
        if aspect is not None and aspect != m.aspect:
            raise RequestError("aspect", f"this export serves {m.aspect} frames ({m.width}x{m.height}) only, "
                                         f"got {json.dumps(aspect)}; re-export for other aspects")
        fps = self._int("fps", 8, 1, lim.max_fps)
        sampler = self._choice("sampler", "jacobi", SAMPLERS)
        jacobi = self._jacobi(sampler)
        if window is not None and frames > window and sampler != "jacobi":
            raise RequestError("sampler", f"{frames} frames exceed the attention window of {window}: use jacobi")
        output = self._choice("output", "png" if m.pixel_space else "latents", OUTPUTS)
        if output == "png" and not m.pixel_space:
            raise RequestError("output", "PNG frames need a VAE decoder, which this export lacks; use latents")
        mp4 = self._bool("mp4", False)
        if mp4 and not m.pixel_space:
            raise RequestError("mp4", "an mp4 needs a VAE decoder, which this export lacks; set mp4 false")
        image = self._png("image")
        context = self._npy("context_latents", (None, m.channels, m.height, m.width), "latent frames")
        if image is not None and context is not None:
            raise RequestError("image", "give image or context_latents, not both")
        n_ctx = 1 if image is not None else (0 if context is None else context.shape[0])
        if n_ctx and not n_ctx < frames:
            raise RequestError("frames", f"must exceed the {n_ctx} context frame(s), got {frames}")
        denoise = self._bool("denoise", True)
        timeout = self._float("timeout_s", lim.max_timeout_s, 0.0, lim.max_timeout_s)
        if timeout == 0:
            raise RequestError("timeout_s", f"must be > 0 and <= {lim.max_timeout_s:g}")
        stream = self._choice("stream", "ndjson", STREAMS)
        return VideoRequest(seed=seed, frames=frames, guidance=guidance, sampler=sampler, jacobi=jacobi,
                            denoise=denoise, output=output, mp4=mp4, fps=fps, stream=stream, timeout_s=timeout,
                            prompt=prompt, negative_prompt=negative, y=y, y_uncond=y_uncond, image=image,
                            context=context)

    def _jacobi(self, sampler: str) -> JacobiOptions:
        v = self.d.get("jacobi")
        if v is None:
            return JacobiOptions()
        if sampler != "jacobi":
            raise RequestError("jacobi", "options need sampler jacobi")
        if not isinstance(v, dict):
            raise RequestError("jacobi", "must be an object {block_size, max_iter, threshold, schedule}")
        unknown = sorted(set(v) - set(JACOBI_ALLOWED))
        if unknown:
            raise RequestError(f"jacobi.{unknown[0]}", f"unknown field; allowed: {', '.join(JACOBI_ALLOWED)}")
        sub = _Parser(v, self.m, self.lim)
        try:
            return JacobiOptions(
                block_size=sub._int("block_size", 16, 1, self.lim.max_block_size),
                max_iter=sub._int("max_iter", 32, 1, self.lim.max_iter),
                threshold=sub._float("threshold", 1e-3, 0.0, 1.0),
                schedule=None if v.get("schedule") is None else sub._choice("schedule", "sliding", SCHEDULES))
        except RequestError as exc:
            raise RequestError(f"jacobi.{exc.field}", str(exc).split(": ", 1)[1]) from None


def fit_image(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [h, w, 3] → [3, height, width] float32 in [-1, 1]: resize to cover, centre-crop (spec §11)."""
    import cv2

    h, w = rgb.shape[:2]
    scale = max(height / h, width / w)
    nh, nw = max(height, int(h * scale)), max(width, int(w * scale))
    resized = cv2.resize(np.ascontiguousarray(rgb), (nw, nh), interpolation=cv2.INTER_AREA)
    top, left = (nh - height) // 2, (nw - width) // 2
    crop = resized[top : top + height, left : left + width]
    return np.ascontiguousarray(crop.transpose(2, 0, 1), dtype=np.float32) / 127.5 - 1.0


def encode_npy(array: np.ndarray) -> str:
    """numpy array → base64 of its ``.npy`` bytes (what the request and frame events carry)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_npy(text: str) -> np.ndarray:
    """Inverse of :func:`encode_npy` (``allow_pickle=False``)."""
    return np.load(io.BytesIO(base64.b64decode(text, validate=True)), allow_pickle=False)
