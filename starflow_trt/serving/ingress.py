"""The HTTP ingress (FastAPI on Ray Serve): validation, deadlines, NDJSON / SSE streaming.

Routes::

    POST /v1/videos/stream (and POST /v1/videos asking for a stream: ``Accept: application/x-ndjson``
                      or ``text/event-stream``, or a JSON body with ``stream``)
                      JSON request (see ``limits``) → 200 application/x-ndjson (or text/event-stream):
                      {"type": "frame", "index": i, ...} for i = 0..T-1 in order, then
                      {"type": "done", "stats": {...}}; a failure mid-stream ends it with
                      {"type": "error", "message": "..."}.
                      400 invalid request (before any streaming), 408 the request did not start before
                      its deadline, 503 overloaded (queue full) or no replica.
    GET  /healthz     200 when the generation deployment is healthy, else 503 (also while draining)
    GET  /v1/models   what is served: model summary, backend, limits, batching (OpenAI's model list)
    POST /v1/videos (multipart form, or JSON without asking for a stream), GET /v1/videos[/{id}[/content]],
    DELETE /v1/videos/{id}: OpenAI's videos API (``openai_api``, ``jobs``); GET /: the page (``static``)

With an API key every route but ``/healthz`` and the page needs ``Authorization: Bearer KEY``. Before that,
``browser.BrowserGuard`` refuses a foreign ``Host`` (400) and a write a page on another site could send (403 /
415). A create answers 429 (``Retry-After``) while the generator's replicas and queue are full of jobs; a job
is stored only once its answer is written. Both routes validate with ``limits.parse_request`` on threads of
their own (images are decoded there), after counting the body as it arrives.

The status line is sent when the request's batch starts on a replica, so a request still queued at
its deadline gets 408; past that point a deadline ends the stream with an error event. The deadline
is the request's ``timeout_s`` (at most the server's), enforced here whatever headers the client sends.

Stopping (``drain``, called by ``starflow-trt serve`` on SIGTERM / SIGINT; see ``drain``): new
generation requests get 503, running ones finish until the drain timeout, the rest end with an error
event (a stream), 503 (not yet started) or a failed job.
"""

# no `from __future__ import annotations`: FastAPI must see the real `Request` type of the routes

import asyncio
import base64
import hashlib
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from . import openai_api as oai
from .auth import BearerAuth
from .browser import BrowserGuard
from .config import ServeConfig
from .drain import REFUSED, Cutoff, Drain
from .frames import MEDIA_TYPES, error_event, format_event
from .job_runner import run_job
from .jobs import ASSETS, JOB_ID, JobStore
from .limits import RequestError, VideoRequest, check_text, parse_request
from .summary import ModelSummary

app = FastAPI(title="starflow-trt video generation", docs_url=None, redoc_url=None, openapi_url=None)
app.add_middleware(BearerAuth, key=lambda: getattr(app.state, "api_key", None),
                   route_prefix=lambda: getattr(app.state, "route_prefix", "/"))
app.add_middleware(BrowserGuard, policy=lambda: getattr(app.state, "browser", None))   # outermost: runs first
PAGE = Path(__file__).with_name("static") / "index.html"


def page_headers(html: str) -> dict[str, str]:
    """The page's security headers: a CSP that runs only its own inline script and style (by hash), talks only to
    this server, shows only its own frames (data: PNGs, the blob: mp4), and no site may frame it."""
    def hashes(tag: str) -> str:
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()}'"
                        for text in re.findall(rf"<{tag}>(.*?)</{tag}>", html, re.S))

    csp = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; img-src data: blob:; "
           "media-src blob:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": csp, "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}


PAGE_HTML = PAGE.read_text("utf-8")
PAGE_HEADERS = page_headers(PAGE_HTML)
#: a full queue: how long a refused create (429) or a job that met the generator's full queue waits
RETRY_AFTER_S = 1
#: threads validating requests (decoding images) off the event loop; their own pool, so a burst of large images
#: neither starves the loop's other `to_thread` work (health, files) nor holds more than this many decoded at once
VALIDATE_THREADS = 2


def _error(status: int, message: str, field: Optional[str] = None, **headers: str) -> JSONResponse:
    body = {"error": oai.one_line(message)}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=status, headers=headers or None)


def _oai_error(status: int, exc: RequestError) -> JSONResponse:
    """A validator error in OpenAI's shape, naming the OpenAI parameter (``image`` → ``input_reference``)."""
    param = oai.openai_param(exc.field)
    message = str(exc).split(": ", 1)[-1]
    return JSONResponse(oai.error_body(f"{param}: {message}", param), status_code=status)


def _not_found(video_id: str) -> JSONResponse:
    shown = video_id if JOB_ID.match(video_id) else "with that id"   # a long or odd id is not echoed
    return JSONResponse(oai.error_body(f"no video {shown}: it was deleted, expired or never existed; list them "
                                       "with GET /v1/videos", "video_id", "not_found"), status_code=404)


def _short(exc: BaseException) -> str:
    """One line for an exception raised across Ray (their messages span many lines)."""
    from ray.exceptions import RayActorError

    if isinstance(exc, RayActorError):
        return f"the replica serving this request died ({type(exc).__name__}); retry the request"
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {first[:300]}"


def _generator_status(app_name: str) -> dict:
    """Status of the generation deployment of ``app_name`` from Serve's controller."""
    try:
        status = serve.status()
        dep = status.applications[app_name].deployments["VideoGenerator"]
    except (KeyError, RuntimeError) as exc:
        return {"status": "UNKNOWN", "message": str(exc)}
    return {"status": str(getattr(dep.status, "value", dep.status)),
            "replicas": {str(getattr(k, "value", k)): v for k, v in dep.replica_states.items()}}


def _cancel(response) -> None:
    """Cancel a handle call; a call that already failed re-raises its error from ``cancel``: ignore it."""
    try:
        response.cancel()
    except Exception:  # noqa: BLE001
        pass


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise RequestError("body", f"{declared} bytes exceed the limit of {limit}; send smaller embeddings or images")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError("body", f"more than {limit} bytes; send smaller embeddings or images")
        chunks.append(chunk)
    return b"".join(chunks)


@serve.deployment(name="VideoIngress")
@serve.ingress(app)
class VideoIngress:
    def __init__(self, generator: DeploymentHandle, model: dict, config: dict):
        from .metrics import IngressMetrics

        self.generator = generator
        self.model = ModelSummary.from_dict(model)
        self.config = ServeConfig.from_dict(config)
        self.limits = self.config.request_limits()
        self.metrics = IngressMetrics()
        self._replica_info: Optional[dict] = None
        self._in_flight = 0
        app.state.api_key, app.state.route_prefix = self.config.api_key, self.config.route_prefix
        app.state.browser = self.config.browser_policy()
        self._job_capacity = self.config.job_capacity(self.model.max_batch)
        self.jobs = JobStore(self.config.videos_root(), self.config.retention())
        self._jobs: dict[str, asyncio.Task] = {}
        self._created = int(time.time())
        self._drain = Drain()
        self._validator = ThreadPoolExecutor(VALIDATE_THREADS, thread_name_prefix="starflow-validate")

    async def _validate(self, fn, *args):
        """``fn(*args)`` on the validation threads (it may decode an image); its result or its exception."""
        return await asyncio.get_running_loop().run_in_executor(self._validator, fn, *args)

    # ------------------------------------------------------------ videos
    @app.post("/v1/videos")
    async def videos(self, request: Request) -> Response:
        """The streaming API when the client asks for a stream, else OpenAI's create (a job)."""
        t0 = time.perf_counter()
        if request.headers.get("content-type", "").startswith(("multipart/form-data", "application/x-www-form")):
            return await self._create_from_form(request)
        try:
            body = await _read_body(request, self.limits.max_body_bytes)
        except RequestError as exc:
            self.metrics.finished("invalid", time.perf_counter() - t0)
            return _error(400, str(exc), exc.field)
        try:
            data = json.loads(body)
        except (ValueError, RecursionError):
            data = None                    # the streaming validator names what is wrong with it
        if not isinstance(data, dict) or oai.wants_stream(request.headers.get("accept", ""), data):
            return await self._stream(body, t0)
        return await self._create(data, None)

    @app.post("/v1/videos/stream")
    async def videos_stream(self, request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            body = await _read_body(request, self.limits.max_body_bytes)
        except RequestError as exc:
            self.metrics.finished("invalid", time.perf_counter() - t0)
            return _error(400, str(exc), exc.field)
        return await self._stream(body, t0)

    async def _stream(self, body: bytes, t0: float) -> Response:
        if self._drain.refusing:
            self.metrics.finished("shutdown", time.perf_counter() - t0)
            return _error(503, REFUSED)
        try:   # off the event loop: an image is decoded here
            req = await self._validate(parse_request, body, self.model, self.limits)
        except RequestError as exc:
            self.metrics.finished("invalid", time.perf_counter() - t0)
            return _error(400, str(exc), exc.field)
        return await self._open(req, t0)

    async def _open(self, req: VideoRequest, t0: float) -> Response:
        """Start ``req`` on a replica: its streaming response once its batch starts, or an error response."""
        deadline = t0 + req.timeout_s
        response, handed_over = None, False
        self._drain.enter()
        try:
            response = self.generator.options(stream=True).stream.remote(req)
            first = await self._drain.next(response.__anext__(), max(deadline - time.perf_counter(), 1e-3))
            if first["type"] == "_rejected":
                self.metrics.finished("invalid", time.perf_counter() - t0)
                return _error(400, first["message"], first["field"])
            handed_over = True   # the relay leaves the drain
            return StreamingResponse(self._relay(response, req, t0, deadline), media_type=MEDIA_TYPES[req.stream],
                                     headers={"Cache-Control": "no-cache", "X-Starflow-Request": req.request_id})
        except asyncio.TimeoutError:
            self.metrics.finished("timeout", time.perf_counter() - t0)
            return _error(408, f"request did not start within its timeout of {req.timeout_s:g} s "
                               "(server busy); retry later or raise timeout_s")
        except Cutoff as exc:
            self.metrics.finished("shutdown", time.perf_counter() - t0)
            return _error(503, str(exc))
        except BackPressureError:
            self.metrics.finished("overloaded", time.perf_counter() - t0)
            return _error(503, f"server overloaded: more than {self.config.max_queued} requests queued; retry later",
                          **{"Retry-After": "1"})
        except Exception as exc:  # noqa: BLE001 - no replica, replica died before starting
            self.metrics.finished("error", time.perf_counter() - t0)
            return _error(503, f"generation unavailable: {_short(exc)}", **{"Retry-After": "1"})
        finally:
            if not handed_over:
                self._drain.leave()
                if response is not None:
                    _cancel(response)

    async def _relay(self, response, req: VideoRequest, t0: float, deadline: float) -> AsyncIterator[bytes]:
        """Replica events → response lines; ends with done or error; cancels the replica work otherwise."""
        status, first_frame = "error", None
        self._in_flight += 1
        self.metrics.in_flight.set(self._in_flight)
        try:
            while True:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    raise asyncio.TimeoutError
                try:
                    event = await self._drain.next(response.__anext__(), remaining)
                except StopAsyncIteration:
                    yield format_event(error_event("the generator ended the stream without a result"), req.stream)
                    break
                kind = event["type"]
                if kind == "frame" and first_frame is None:
                    first_frame = time.perf_counter() - t0
                    self.metrics.ttff.observe(first_frame)
                elif kind == "done":
                    stats = event["stats"]
                    stats["time_to_first_frame"] = None if first_frame is None else round(first_frame, 6)
                    stats["seconds"]["total"] = round(time.perf_counter() - t0, 6)
                    status = "ok"
                if kind.startswith("_"):
                    continue
                yield format_event(event, req.stream)
                if kind in ("done", "error"):
                    break
        except asyncio.TimeoutError:
            status = "timeout"
            yield format_event(error_event(f"request timed out after {req.timeout_s:g} s; "
                                           "ask for fewer frames or a larger timeout_s"), req.stream)
        except Cutoff as exc:
            status = "shutdown"
            yield format_event(error_event(str(exc)), req.stream)
        except (asyncio.CancelledError, GeneratorExit):
            status = "cancelled"   # the client went away
            raise
        except Exception as exc:  # noqa: BLE001 - replica died or failed mid-stream
            status = "error"
            yield format_event(error_event(f"generation failed: {_short(exc)}"), req.stream)
        finally:
            if status != "ok":
                _cancel(response)
            self._in_flight -= 1
            self.metrics.in_flight.set(self._in_flight)
            self.metrics.finished(status, time.perf_counter() - t0)
            self._drain.leave()

    def check_health(self) -> None:
        """Serve calls this every few seconds: refresh the gauge (Ray drops gauges left unset)."""
        self.metrics.in_flight.set(self._in_flight)

    # ------------------------------------------------------------ OpenAI videos API (jobs)
    async def _create_from_form(self, request: Request) -> Response:
        limit = self.limits.max_body_bytes
        try:   # the whole form, counted as it arrives (a chunked body has no length to check first)
            body = await _read_body(request, limit)
        except RequestError as exc:
            return _oai_error(400, exc)

        async def replay() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=64, max_part_size=limit)
        except Exception as exc:  # noqa: BLE001 - malformed multipart
            return _oai_error(400, RequestError("body", f"not a valid form ({exc}); send multipart/form-data"))
        try:
            image, items = None, []
            for key, value in form.multi_items():
                if key == "input_reference" and hasattr(value, "read"):
                    image = await value.read()
                else:
                    items.append((key, value))
            data = oai.form_fields(items)
        except RequestError as exc:
            return _oai_error(400, exc)
        finally:
            await form.close()
        return await self._create(data, image)

    def _busy(self) -> Optional[Response]:
        """429 while the generator's replicas and queue are full of jobs (never a job taken and then failed)."""
        if self._job_capacity is None or len(self._jobs) < self._job_capacity:
            return None
        message = (f"server busy: {len(self._jobs)} video jobs queued or running, the most it takes "
                   f"(--max-queued and the replicas' requests); retry after {RETRY_AFTER_S} s")
        return JSONResponse(oai.error_body(message, code="rate_limit_exceeded", kind="rate_limit_error"),
                            status_code=429, headers={"Retry-After": str(RETRY_AFTER_S)})

    def _job_request(self, data: dict, image: Optional[bytes]) -> tuple[dict, VideoRequest]:
        """OpenAI create fields → (the streaming request's fields, the validated request), as the stream route
        validates: :func:`check_text`, then :func:`parse_request`."""
        check_text(data)
        if image is None and data.get("input_reference") is not None:
            image = oai.image_from_json(data["input_reference"])
        fields = oai.to_stream_request({k: v for k, v in data.items() if k != "input_reference"}, image,
                                       self.model, self.config.app_name)
        return fields, parse_request(json.dumps(fields).encode("utf-8"), self.model, self.limits)

    async def _create(self, data: dict, image: Optional[bytes]) -> Response:
        """OpenAI create → the streaming API's request (same validator) → a job run in the background; the job is
        stored only once its answer is written."""
        if self._drain.refusing:
            return JSONResponse(oai.error_body(REFUSED, code="server_shutting_down", kind="server_error"),
                                status_code=503, headers={"Retry-After": "1"})
        busy = self._busy()
        if busy is not None:
            return busy
        try:   # off the event loop: an image is decoded here
            fields, req = await self._validate(self._job_request, data, image)
        except RequestError as exc:
            return _oai_error(400, exc)
        job = JobStore.draft(model=self.config.app_name, prompt=fields["prompt"],
                             seconds=oai.seconds_of(req.frames, self.model), size=oai.size_of(fields, self.model),
                             frames=req.frames)
        answer = job.encoded()
        busy = self._busy()                 # others were admitted while this one was validated
        if busy is not None:
            return busy
        self.jobs.add(job)
        self._drain.enter()   # the job leaves when it ends
        self._jobs[job.id] = asyncio.create_task(self._run_job(job, req))
        return Response(answer, media_type="application/json",
                        headers={"openai-poll-after-ms": str(oai.POLL_AFTER_MS)})

    async def _run_job(self, job, req: VideoRequest) -> None:
        """The streaming path (same replica call, deadline, metrics) consumed into the job's files. A job met by a
        full generator queue (streams took it) waits its turn within its deadline instead of failing."""
        t0 = time.perf_counter()
        try:
            while True:
                response = await self._open(req, t0)
                if not (response.status_code == 503 and "retry-after" in response.headers
                        and not self._drain.refusing and time.perf_counter() + RETRY_AFTER_S < t0 + req.timeout_s):
                    break
                await asyncio.sleep(RETRY_AFTER_S)
            if not isinstance(response, StreamingResponse):
                self.jobs.fail(job, json.loads(response.body)["error"], f"http_{response.status_code}")
                return
            self.jobs.start(job, req.request_id)
            lines = response.body_iterator
            try:
                await run_job(self.jobs, job, (json.loads(line) async for line in lines))
            finally:
                await lines.aclose()
        except asyncio.CancelledError:
            pass                                    # deleted while running
        finally:
            self._jobs.pop(job.id, None)
            self._drain.leave()

    def _job(self, video_id: str):
        job = self.jobs.get(video_id)
        if job is None:
            return None, _not_found(video_id)
        return job, None

    @app.get("/v1/videos")
    async def videos_list(self, after: Optional[str] = None, limit: int = 20, order: str = "desc") -> Response:
        if not 1 <= limit <= 100:
            return _oai_error(400, RequestError("limit", f"must be in [1, 100], got {limit}"))
        if order not in ("asc", "desc"):
            return _oai_error(400, RequestError("order", f"must be asc or desc, got {order!r}"))
        try:
            return JSONResponse(self.jobs.page(after, limit, order))
        except KeyError:
            shown = repr(after) if JOB_ID.match(after or "") else "with that id"
            return _oai_error(400, RequestError("after", f"no video {shown}; pass the last_id of a page"))

    @app.get("/v1/videos/{video_id}")
    async def videos_retrieve(self, video_id: str) -> Response:
        job, missing = self._job(video_id)
        if missing is not None:
            return missing
        headers = {} if job.status in ("completed", "failed") else {"openai-poll-after-ms": str(oai.POLL_AFTER_MS)}
        return JSONResponse(job.to_openai(), headers=headers)

    @app.get("/v1/videos/{video_id}/content")
    async def videos_content(self, video_id: str, variant: str = "video") -> Response:
        job, missing = self._job(video_id)
        if missing is not None:
            return missing
        if variant not in ASSETS:
            return _oai_error(400, RequestError("variant", f"must be one of {', '.join(ASSETS)}, got {variant!r}"))
        if job.status != "completed":
            return _oai_error(400, RequestError("video_id", f"video {video_id} is {job.status}; poll it until "
                                                            "completed (a failed one has no content)"))
        if variant == "video":
            await asyncio.to_thread(self.jobs.downloaded, job)
        return FileResponse(self.jobs.asset_path(job, variant), media_type=ASSETS[variant][1])

    @app.delete("/v1/videos/{video_id}")
    async def videos_delete(self, video_id: str) -> Response:
        if self.jobs.take(video_id) is None:        # before any await: of concurrent deletes one wins
            return _not_found(video_id)
        task = self._jobs.get(video_id)
        if task is not None:                        # running: stop it (the replica drops the request)
            task.cancel()
            await asyncio.wait([task], timeout=10)
        await asyncio.to_thread(self.jobs.remove_files, video_id)
        return JSONResponse({"id": video_id, "object": "video.deleted", "deleted": True})

    @app.get("/")
    async def page(self) -> Response:
        return HTMLResponse(PAGE_HTML, headers=PAGE_HEADERS)

    # ------------------------------------------------------------ health, models
    @app.get("/healthz")
    async def healthz(self) -> Response:
        if self._drain.refusing:   # a load balancer stops sending here
            return JSONResponse({"status": "draining", "running": self._drain.running}, status_code=503)
        state = await asyncio.to_thread(_generator_status, self.config.app_name)
        code = 200 if state.get("status") == "HEALTHY" else 503
        return JSONResponse({"status": "ok" if code == 200 else "unavailable", "generator": state}, status_code=code)

    # ------------------------------------------------------------ stop
    async def drain(self, timeout_s: float) -> dict:
        """Refuse new generation requests (503), let running ones finish within ``timeout_s``, end the rest
        (see ``drain``); returns {"running", "ended", "left"}. Called by ``starflow-trt serve`` on SIGTERM."""
        return await self._drain.run(timeout_s)

    @app.get("/v1/models")
    async def models(self) -> Response:
        if self._replica_info is None:
            try:
                info = await asyncio.wait_for(self.generator.describe.remote(), 10)
                self._replica_info = {k: info[k] for k in ("backend", "max_batch", "prompt", "cancellation")}
            except Exception:  # noqa: BLE001 - busy or restarting: answer without the replica's view
                pass
        cfg = self.config
        return JSONResponse({
            "object": "list",
            "data": [{**{k: v for k, v in self.model.to_dict().items() if k != "directory"},
                      **(self._replica_info or {}),
                      **oai.model_object(cfg.app_name, self._created),
                      "sizes": list(oai.export_sizes(self.model)), "fps": oai.export_fps(self.model)}],
            "limits": {**self.limits.to_dict(), "max_queued": cfg.max_queued},
            "batching": {"max_batch": min(cfg.max_batch or self.model.max_batch, self.model.max_batch),
                         "wait_s": cfg.batch_wait_s, "approximate": cfg.batch_approximate},
            "serving": {"backend": cfg.backend, "replicas": cfg.replicas, "max_replicas": cfg.max_replicas,
                        "gpus_per_replica": cfg.gpus_per_replica, "accelerator_type": cfg.accelerator_type},
        })
