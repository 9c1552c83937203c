"""The HTTP ingress in this process, without Ray: a fake generator behind it, requests sent as ASGI calls.

    with Harness(tmp_path, ServeConfig(max_ongoing=2, max_queued=2)) as h:
        reply = h.call("POST", "/v1/videos", json_body={"prompt": "a red square"})
        h.settle()                                  # let the background jobs finish

The routes run exactly as on a replica: ``serve.ingress`` turns the class's methods into FastAPI routes
that find their instance through ``serve.get_replica_context().servable_object``
(ray/serve/_private/http_util.py, ``make_fastapi_class_based_view``); the harness answers that call. The
fake generator keeps Ray's admission contract: beyond ``capacity`` requests at once, the first event
raises ``BackPressureError`` (what a full ``max_queued_requests`` does). The ASGI driver counts the body
bytes the app pulls, so a test sees whether a refused upload was read in full.

``python -m tests.ingress_harness`` prints the probe table of the issue's cases (what was sent, what came
back), on whatever code is checked out.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sys
import tempfile
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from starflow_trt.serving.config import ServeConfig
from starflow_trt.serving.summary import ModelSummary

TOY = ModelSummary(directory="/srv/exports/toy", precision="fp32", channels=3, height=16, width=16, max_frames=6,
                   max_batch=8, text_length=6, text_width=16, pixel_space=True, has_denoiser=True, window=None,
                   default_guidance=3.0, noise_std=0.15, prompt_encoder="toy", config_hash="h",
                   checkpoint_sha256="s", graphs=("deep_step",), fps=8)
HOST = "127.0.0.1:8000"
JSON = {"Content-Type": "application/json", "Accept": "application/json"}
STREAM = {"Content-Type": "application/json", "Accept": "application/x-ndjson"}
FAKE_MP4 = b"\x00\x00\x00\x18ftypmp42fake"


def png(h: int = 16, w: int = 16) -> bytes:
    import cv2

    return cv2.imencode(".png", np.zeros((h, w, 3), np.uint8))[1].tobytes()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    read: int = 0               # request body bytes the app pulled

    def json(self) -> Any:
        return json.loads(self.body)

    def lines(self) -> list[dict]:
        return [json.loads(ln) for ln in self.body.splitlines() if ln.strip()]


class _Response:
    """What ``handle.options(stream=True).stream.remote(req)`` returns: async events, ``cancel()``."""

    def __init__(self, gen: "FakeGenerator", req) -> None:
        self.gen, self.req, self._events, self.cancelled = gen, req, None, False

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        if self._events is None:
            if self.gen.ongoing >= self.gen.capacity:
                from ray.serve.exceptions import BackPressureError

                raise BackPressureError(num_queued_requests=self.gen.ongoing, max_queued_requests=self.gen.capacity)
            self.gen.ongoing += 1
            self.gen.peak = max(self.gen.peak, self.gen.ongoing)
            self._events = self.gen.events(self.req)
        try:
            return await self._events.__anext__()
        except BaseException:
            self._end()
            raise

    def _end(self) -> None:
        if self._events is not None and not self.cancelled:
            self.cancelled = True
            self.gen.ongoing -= 1

    def cancel(self) -> None:
        self._end()


class FakeGenerator:
    """The generation deployment's handle: ``req.frames`` PNG frames (``delay_s`` apart), then done + mp4."""

    def __init__(self, capacity: int, delay_s: float = 0.0) -> None:
        self.capacity, self.delay_s = capacity, delay_s
        self.ongoing = self.peak = self.started = 0
        self._png = base64.b64encode(png()).decode("ascii")
        self.stream = types.SimpleNamespace(remote=lambda req: _Response(self, req))
        self.describe = types.SimpleNamespace(remote=self._describe)

    def options(self, **_: Any) -> "FakeGenerator":
        return self

    async def _describe(self) -> dict:
        return {"backend": "fake", "max_batch": 1, "prompt": "toy", "cancellation": "frame"}

    async def events(self, req):
        prompts = req.generation.prompts or ()
        try:                                   # the replica's prepare: the encoder refuses what it cannot encode
            [p.encode("utf-8") for p in prompts]
        except UnicodeEncodeError as exc:
            yield {"type": "_rejected", "field": "prompt", "message": f"prompt: {exc}"}
            return
        self.started += 1
        yield {"type": "_started"}
        for i in range(min(req.frames, 16)):   # a long request's cost is the real generator's concern
            await asyncio.sleep(self.delay_s)
            yield {"type": "frame", "index": i, "png": self._png}
        yield {"type": "done", "stats": {"seconds": {}}, "mp4": base64.b64encode(FAKE_MP4).decode("ascii")}


def _ingress_class():
    from starflow_trt.serving import ingress

    wrapper = ingress.VideoIngress.func_or_class       # serve.ingress's subclass of our class
    return wrapper, next(c for c in wrapper.__mro__[1:] if c.__name__ == "VideoIngress")


class Harness:
    """One ingress instance on its own event loop, with a fake generator of ``capacity`` requests."""

    def __init__(self, videos_dir: Optional[Path] = None, config: Optional[ServeConfig] = None,
                 model: ModelSummary = TOY, capacity: Optional[int] = None, delay_s: float = 0.0) -> None:
        import dataclasses

        self._tmp = None
        if videos_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="starflow-probe-")
            videos_dir = Path(self._tmp.name)
        cfg = dataclasses.replace(config or ServeConfig(max_ongoing=2, max_queued=2), videos_dir=str(videos_dir),
                                  warmup=False)
        self.config, self.model, self.videos = cfg, model, Path(videos_dir)
        if capacity is None:
            capacity = (cfg.max_ongoing or 2 * model.max_batch) + max(cfg.max_queued, 0)
        self.generator = FakeGenerator(capacity, delay_s)
        self.loop = asyncio.new_event_loop()
        self._patches = contextlib.ExitStack()

    def __enter__(self) -> "Harness":
        from unittest import mock

        import ray.serve

        wrapper, cls = _ingress_class()
        # Serve pickled the class with its module's globals: the routes' `app` and helpers are that copy's
        names = cls.__init__.__globals__
        self.app, self.names = names["app"], names
        self._patches.enter_context(mock.patch("ray.init", _no_ray))          # nothing here may start a cluster
        self._patches.enter_context(mock.patch("starflow_trt.serving.metrics.IngressMetrics", _NoMetrics))
        self._patches.enter_context(mock.patch.dict(names, {"_generator_status": lambda name: {"status": "HEALTHY"}}))
        self.ingress = cls.__new__(cls)     # the class itself: the wrapper's __del__ needs Serve
        asyncio.set_event_loop(self.loop)
        cls.__init__(self.ingress, self.generator, self.model.to_dict(), self.config.to_dict())
        context = types.SimpleNamespace(servable_object=self.ingress)
        self._patches.enter_context(mock.patch.object(ray.serve, "get_replica_context", lambda: context))
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.settle()
        finally:
            self._patches.close()
            self.loop.close()
            asyncio.set_event_loop(None)
            if self._tmp is not None:
                self._tmp.cleanup()

    # ------------------------------------------------------------ requests
    def call(self, method: str, path: str, **kw: Any) -> Reply:
        return self.loop.run_until_complete(self.send(method, path, **kw))

    def gather(self, calls: Iterable[tuple]) -> list[Reply]:
        """Several requests at once: ``(method, path, kwargs)`` each."""
        async def run():
            return await asyncio.gather(*(self.send(m, p, **kw) for m, p, kw in calls))
        return self.loop.run_until_complete(run())

    async def send(self, method: str, path: str, *, headers: Optional[dict] = None, body: bytes = b"",
                   json_body: Any = None, chunks: Optional[Iterable[bytes]] = None, host: Optional[str] = HOST) -> Reply:
        """One ASGI call; ``chunks``: a body without a length (chunked transfer encoding)."""
        hdrs = dict(JSON if json_body is not None and headers is None else headers or {})
        if json_body is not None:
            body = json.dumps(json_body).encode("utf-8")
        if chunks is None:
            chunks = [body]
            hdrs.setdefault("Content-Length", str(len(body)))
        if host is not None:
            hdrs.setdefault("Host", host)
        raw_path, _, query = path.partition("?")
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": raw_path, "raw_path": raw_path.encode(), "query_string": query.encode(),
                 "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
                 "headers": [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in hdrs.items()]}
        pending, done, reply = iter(chunks), asyncio.Event(), Reply(0, {}, b"")

        async def receive() -> dict:
            chunk = next(pending, None)
            if chunk is not None:
                reply.read += len(chunk)
                return {"type": "http.request", "body": chunk, "more_body": True}
            if not getattr(receive, "ended", False):
                receive.ended = True
                return {"type": "http.request", "body": b"", "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                reply.status = message["status"]
                reply.headers = {k.decode().lower(): v.decode() for k, v in message.get("headers", [])}
            elif message["type"] == "http.response.body":
                reply.body += message.get("body", b"")
                if not message.get("more_body"):
                    done.set()

        try:
            await self.app(scope, receive, send)
        except Exception:  # noqa: BLE001 - Starlette has sent its 500 and re-raises for the server's log
            reply.status = reply.status or 500
        return reply

    def settle(self, timeout_s: float = 30.0) -> None:
        """Run the loop until every background job has ended."""
        async def wait():
            tasks = list(self.ingress._jobs.values())
            if tasks:
                await asyncio.wait(tasks, timeout=timeout_s)
        self.loop.run_until_complete(wait())

    def job_files(self) -> list[str]:
        return sorted(p.name for p in self.videos.iterdir() if p.name.startswith("video_"))


def _no_ray(*_: Any, **__: Any) -> None:
    raise RuntimeError("the ingress harness runs without Ray; a route tried to start a cluster")


class _NoMetrics:
    """Ray's metrics need a running Serve replica; the harness counts nothing."""

    def __init__(self) -> None:
        self.requests = self.latency = self.ttff = self.in_flight = self

    def finished(self, *_: Any) -> None:
        pass

    def observe(self, *_: Any) -> None:
        pass

    def set(self, *_: Any) -> None:
        pass


# ---------------------------------------------------------------------------------------------- multipart
def multipart(fields: Iterable[tuple[str, Any]], boundary: str = "probe-boundary") -> tuple[bytes, dict]:
    """Fields → a multipart body and its headers; a ``bytes`` value is sent as a file."""
    out = []
    for name, value in fields:
        if isinstance(value, bytes):
            head = f'Content-Disposition: form-data; name="{name}"; filename="f.png"\r\nContent-Type: image/png'
            data = value
        else:
            head, data = f'Content-Disposition: form-data; name="{name}"', str(value).encode("utf-8", "surrogatepass")
        out.append(f"--{boundary}\r\n{head}\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(out) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}", "Accept": "application/json",
                  "Authorization": "Bearer sk-none"}


# ---------------------------------------------------------------------------------------------- probes
@dataclass
class Probe:
    name: str
    sent: str
    got: str = ""
    ok_after: list[str] = field(default_factory=list)


def _show(r: Reply) -> str:
    try:
        body = r.json()
        msg = body.get("error")
        msg = msg.get("message") if isinstance(msg, dict) else msg
        text = msg if msg else (body.get("status") or body.get("object") or "")
    except ValueError:
        text = f"{len(r.body)} bytes"
    return f"{r.status} {str(text)[:70]}"


def probe_table() -> list[tuple[str, str]]:
    """The issue's cases against the code checked out: [(what was sent, what came back)]."""
    rows: list[tuple[str, str]] = []
    with Harness() as h:
        def job(body, **kw):
            return h.call("POST", "/v1/videos", json_body=body, **kw)

        r = job({"prompt": "\ud800"})
        rows.append(('job {"prompt": "\\ud800"}', _show(r)))
        h.settle()
        rows.append(("then GET /v1/videos", _show(h.call("GET", "/v1/videos"))))
        r = h.call("POST", "/v1/videos/stream", json_body={"prompt": "\ud800"}, headers=STREAM)
        rows.append(('stream {"prompt": "\\ud800"}', _show(r)))
        rows.append(('job {"size": ["16x16"]}', _show(job({"prompt": "p", "size": ["16x16"]}))))
        rows.append(('job {"seconds": 1e308}', _show(job({"prompt": "p", "seconds": 1e308}))))
        body, hdrs = multipart([("prompt", "p"), ("seed", b"1")])
        rows.append(("form: a file in the seed field", _show(h.call("POST", "/v1/videos", body=body,
                                                                       headers=hdrs))))
        limit = h.config.limits.max_body_bytes
        big = [b"x" * (1 << 20)] * (limit // (1 << 20) * 3)
        r = h.call("POST", "/v1/videos", chunks=[*_form_head(), *big], headers=multipart([])[1])
        rows.append((f"chunked form file, {3 * limit >> 20} MiB", f"{_show(r)} (read {r.read >> 20} MiB)"))
        body, hdrs = multipart([(f"f{i}", "x" * (1 << 20)) for i in range(3 * limit >> 20)])
        r = h.call("POST", "/v1/videos", chunks=[body[i:i + (1 << 20)] for i in range(0, len(body), 1 << 20)],
                   headers=hdrs)
        rows.append((f"chunked form, {3 * limit >> 20} MiB of text fields", f"{_show(r)} (read {r.read >> 20} MiB)"))
        n0 = len(h.job_files())
        r = h.call("POST", "/v1/videos", body=b'{"prompt": "cross-site"}',
                   headers={"Content-Type": "text/plain", "Origin": "http://evil.example"})
        rows.append(("text/plain POST, Origin http://evil.example", f"{_show(r)}; jobs +{len(h.job_files()) - n0}"))
        body, hdrs = multipart([("prompt", "cross-site form")])
        r = h.call("POST", "/v1/videos", body=body, headers={"Content-Type": hdrs["Content-Type"]})
        rows.append(("form POST without a non-simple header", f"{_show(r)}; jobs +{len(h.job_files()) - n0}"))
        r = h.call("GET", "/v1/videos", host="rebind.evil.example:8000")
        rows.append(("GET /v1/videos, Host rebind.evil.example", _show(r)))
        r = job({"prompt": "p"}, host="rebind.evil.example:8000")
        rows.append(("job, Host rebind.evil.example", _show(r)))
        page = h.call("GET", "/")
        rows.append(("GET / headers", " ".join(f"{k}={'yes' if k in page.headers else 'no'}" for k in
                                               ("x-content-type-options", "content-security-policy"))))
        vid = job({"prompt": "p", "frames": 2}).json()["id"]     # still running
        codes = sorted(r.status for r in h.gather([("DELETE", f"/v1/videos/{vid}", {})] * 4))
        rows.append(("4 concurrent DELETEs of one job", " ".join(map(str, codes))))
        models = h.call("GET", "/v1/models").body.decode()
        rows.append(("GET /v1/models shows the export's path", "yes" if TOY.directory in models else "no"))
        r = h.call("GET", "/v1/videos/" + "a" * 8000)
        rows.append(("GET /v1/videos/<8000 chars>", f"{r.status}, {len(r.body)} bytes"))
    rows.append(_stall_row())
    rows.extend(_burst_rows())
    return rows


def _stall_row() -> tuple[str, str]:
    """The longest wait of GET /v1/videos and /healthz (due every 20 ms) while six 4096x4096 PNGs are validated."""
    import time

    image = base64.b64encode(png(4096, 4096)).decode("ascii")
    with Harness() as h:
        async def run() -> float:
            async def ping() -> float:
                """Requests due every 20 ms; the worst delay from when one was due to its answer."""
                start, worst = time.perf_counter(), 0.0
                for i in range(100):
                    due = start + 0.02 * i
                    await asyncio.sleep(max(due - time.perf_counter(), 0))
                    await h.send("GET", "/healthz" if i % 2 else "/v1/videos?limit=1")
                    worst = max(worst, time.perf_counter() - due)
                return worst
            posts = [h.send("POST", "/v1/videos/stream", json_body={"prompt": "p", "image": image, "frames": 2},
                            headers=STREAM) for _ in range(6)]
            return (await asyncio.gather(ping(), *posts))[0]
        worst = h.loop.run_until_complete(run())
    return "six 4096x4096 PNG streams: slowest list/health", f"{worst * 1000:.0f} ms"


def _form_head() -> list[bytes]:
    return [b'--probe-boundary\r\nContent-Disposition: form-data; name="input_reference"; filename="f.png"\r\n'
            b"Content-Type: image/png\r\n\r\n"]


def _burst_rows() -> list[tuple[str, str]]:
    cfg = ServeConfig(max_ongoing=2, max_queued=2, videos_max_count=4)
    with Harness(config=cfg, delay_s=0.002) as h:
        earlier = [h.call("POST", "/v1/videos", json_body={"prompt": f"e{i}", "frames": 1}) for i in range(4)]
        h.settle()
        cap = h.generator.capacity
        replies = h.gather([("POST", "/v1/videos", {"json_body": {"prompt": f"b{i}", "frames": 2}})
                            for i in range(3 * cap)])
        h.settle()
        codes = sorted(r.status for r in replies)
        ok = [r.json()["id"] for r in replies if r.status == 200]
        states = [h.call("GET", f"/v1/videos/{i}") for i in ok]
        done = sum(s.status == 200 and s.json()["status"] == "completed" for s in states)
        kept = sum(h.call("GET", f"/v1/videos/{r.json()['id']}").status == 200 for r in earlier)
        summary = {c: codes.count(c) for c in sorted(set(codes))}
        return [(f"burst of {3 * cap} creates (capacity {cap})", f"{summary}; {done}/{len(ok)} of the 200s completed"),
                ("the 4 finished videos before the burst", f"{kept} of 4 still there")]


if __name__ == "__main__":
    table = probe_table()
    width = max(len(s) for s, _ in table)
    print(f"| {'sent':<{width}} | came back |\n|{'-' * (width + 2)}|-----------|")
    for sent, got in table:
        print(f"| {sent:<{width}} | {got} |")
    sys.exit(0)
