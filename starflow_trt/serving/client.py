"""A small Python client for the service (standard library only).

    from starflow_trt.serving.client import VideoClient
    client = VideoClient("http://127.0.0.1:8000")
    for event in client.stream({"prompt": "a red square moving right", "seed": 0, "guidance": 3.0}):
        ...                                   # {"type": "frame", "index": i, "png": ...}, then "done"
    video = client.generate({"text_embeddings": VideoClient.encode_array(y), "output": "latents"})
    video.frames                              # list of [C, H, W] float32 (latents) or [H, W, 3] uint8 (png)
"""

from __future__ import annotations

import base64
import http.client
import json
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional
from urllib.parse import urlsplit

import numpy as np

from ..errors import StarflowError
from .limits import decode_npy, encode_npy


class ServiceError(StarflowError):
    """The service answered with an error status, or the stream ended with an error event."""

    def __init__(self, status: int, message: str, field: Optional[str] = None):
        super().__init__(f"HTTP {status}: {message}" if status else message)
        self.status, self.message, self.field = status, message, field


@dataclass
class VideoResult:
    """frames in index order; stats of the done event; mp4 bytes when asked; arrival times (s)."""

    frames: list = field(default_factory=list)
    stats: dict = field(default_factory=dict)
    mp4: Optional[bytes] = None
    arrivals: list = field(default_factory=list)


class VideoClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", timeout: float = 660.0, api_key: Optional[str] = None):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise StarflowError(f"url {url!r} must look like http://HOST:PORT (TLS belongs to a proxy in front)")
        self.host, self.port = parts.hostname, parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    # ------------------------------------------------------------ plumbing
    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _get(self, path: str) -> tuple[int, dict]:
        conn = self._connect()
        try:
            conn.request("GET", self.prefix + path, headers=self.headers)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read() or b"{}")
        finally:
            conn.close()

    def health(self) -> dict:
        status, body = self._get("/healthz")
        if status != 200:
            raise ServiceError(status, json.dumps(body))
        return body

    def models(self) -> dict:
        status, body = self._get("/v1/models")
        if status != 200:
            raise ServiceError(status, json.dumps(body))
        return body

    # ------------------------------------------------------------ videos
    def stream(self, request: dict) -> Iterator[dict]:
        """POST /v1/videos asking for NDJSON (a stream); yields events as they arrive. Closing the iterator
        disconnects (cancels)."""
        conn = self._connect()
        try:
            body = json.dumps(request).encode("utf-8")
            conn.request("POST", self.prefix + "/v1/videos", body=body,
                         headers={"Content-Type": "application/json", "Accept": "application/x-ndjson",
                                  **self.headers})
            resp = conn.getresponse()
            if resp.status != 200:
                payload = resp.read()
                try:
                    err = json.loads(payload)
                except ValueError:
                    err = {"error": payload.decode("utf-8", "replace")[:300]}
                message = err.get("error", "")
                if isinstance(message, dict):        # OpenAI's error shape (401)
                    message = message.get("message", "")
                raise ServiceError(resp.status, message, err.get("field"))
            sse = resp.getheader("Content-Type", "").startswith("text/event-stream")
            while True:
                line = resp.readline()
                if not line:
                    return
                line = line.strip()
                if sse:
                    if not line.startswith(b"data:"):
                        continue
                    line = line[5:].strip()
                if line:
                    yield json.loads(line)
        finally:
            conn.close()

    def generate(self, request: dict) -> VideoResult:
        """Collect one request's stream; raises :class:`ServiceError` on an error status or error event."""
        out = VideoResult()
        t0 = time.perf_counter()
        for event in self.stream(request):
            if event["type"] == "frame":
                if event["index"] != len(out.frames):
                    raise ServiceError(0, f"frame {event['index']} arrived, expected {len(out.frames)}")
                out.frames.append(decode_frame(event))
                out.arrivals.append(time.perf_counter() - t0)
            elif event["type"] == "done":
                out.stats = event["stats"]
                if "mp4" in event:
                    out.mp4 = base64.b64decode(event["mp4"])
                return out
            elif event["type"] == "error":
                raise ServiceError(0, event.get("message", "generation failed"))
        raise ServiceError(0, "the stream ended without a done event")

    @staticmethod
    def encode_array(array) -> str:
        """Embeddings / latents → the base64 .npy string the request fields take."""
        return encode_npy(np.asarray(array, dtype=np.float32))


def decode_frame(event: dict) -> np.ndarray:
    """A frame event → latents [C, H, W] float32, or an RGB image [H, W, 3] uint8."""
    if "latents" in event:
        return decode_npy(event["latents"])
    import cv2

    img = cv2.imdecode(np.frombuffer(base64.b64decode(event["png"]), np.uint8), cv2.IMREAD_COLOR)
    return np.ascontiguousarray(img[..., ::-1])
