"""The HTTP ingress (FastAPI on Ray Serve): validation, deadlines, NDJSON / SSE streaming.

Routes::

    POST /v1/videos   JSON request (see ``limits``) → 200 application/x-ndjson (or text/event-stream):
                      {"type": "frame", "index": i, ...} for i = 0..T-1 in order, then
                      {"type": "done", "stats": {...}}; a failure mid-stream ends it with
                      {"type": "error", "message": "..."}.
                      400 invalid request (before any streaming), 408 the request did not start before
                      its deadline, 503 overloaded (queue full) or no replica.
    GET  /healthz     200 when the generation deployment is healthy, else 503
    GET  /v1/models   what is served: model summary, backend, limits, batching

The status line is sent when the request's batch starts on a replica, so a request still queued at
its deadline gets 408; past that point a deadline ends the stream with an error event. The deadline
is the request's ``timeout_s`` (at most the server's), enforced here whatever headers the client sends.
"""

# no `from __future__ import annotations`: FastAPI must see the real `Request` type of the routes

import asyncio
import time
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from .frames import MEDIA_TYPES, error_event, format_event
from .limits import RequestError, VideoRequest, parse_request
from .summary import ModelSummary

app = FastAPI(title="starflow-trt video generation", docs_url=None, redoc_url=None, openapi_url=None)


def _error(status: int, message: str, field: Optional[str] = None, **headers: str) -> JSONResponse:
    body = {"error": " ".join(message.split())}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=status, headers=headers or None)


def _short(exc: BaseException) -> str:
    """One line for an exception raised across Ray (their messages span many lines)."""
    from ray.exceptions import RayActorError

    if isinstance(exc, RayActorError):
        return f"the replica serving this request died ({type(exc).__name__}); retry the request"
    first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {first[:300]}"


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
        from .app import ServeConfig
        from .metrics import IngressMetrics

        self.generator = generator
        self.model = ModelSummary.from_dict(model)
        self.config = ServeConfig.from_dict(config)
        self.limits = self.config.request_limits()
        self.metrics = IngressMetrics()
        self._replica_info: Optional[dict] = None
        self._in_flight = 0

    # ------------------------------------------------------------ videos
    @app.post("/v1/videos")
    async def videos(self, request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            req = parse_request(await _read_body(request, self.limits.max_body_bytes), self.model, self.limits)
        except RequestError as exc:
            self.metrics.finished("invalid", time.perf_counter() - t0)
            return _error(400, str(exc), exc.field)
        deadline = t0 + req.timeout_s
        response, handed_over = None, False
        try:
            response = self.generator.options(stream=True).stream.remote(req)
            first = await asyncio.wait_for(response.__anext__(), max(deadline - time.perf_counter(), 1e-3))
            if first["type"] == "_rejected":
                self.metrics.finished("invalid", time.perf_counter() - t0)
                return _error(400, first["message"], first["field"])
            handed_over = True
            return StreamingResponse(self._relay(response, req, t0, deadline), media_type=MEDIA_TYPES[req.stream],
                                     headers={"Cache-Control": "no-cache", "X-Starflow-Request": req.request_id})
        except asyncio.TimeoutError:
            self.metrics.finished("timeout", time.perf_counter() - t0)
            return _error(408, f"request did not start within its timeout of {req.timeout_s:g} s "
                               "(server busy); retry later or raise timeout_s")
        except BackPressureError:
            self.metrics.finished("overloaded", time.perf_counter() - t0)
            return _error(503, f"server overloaded: more than {self.config.max_queued} requests queued; retry later",
                          **{"Retry-After": "1"})
        except Exception as exc:  # noqa: BLE001 - no replica, replica died before starting
            self.metrics.finished("error", time.perf_counter() - t0)
            return _error(503, f"generation unavailable: {_short(exc)}", **{"Retry-After": "1"})
        finally:
            if response is not None and not handed_over:
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
                    event = await asyncio.wait_for(response.__anext__(), remaining)
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

    def check_health(self) -> None:
        """Serve calls this every few seconds: refresh the gauge (Ray drops gauges left unset)."""
        self.metrics.in_flight.set(self._in_flight)

    # ------------------------------------------------------------ health, models
    @app.get("/healthz")
    async def healthz(self) -> Response:
        from .app import generator_status

        state = await asyncio.to_thread(generator_status, self.config.app_name)
        code = 200 if state.get("status") == "HEALTHY" else 503
        return JSONResponse({"status": "ok" if code == 200 else "unavailable", "generator": state}, status_code=code)

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
            "data": [{"id": cfg.app_name, "object": "model", **self.model.to_dict(), **(self._replica_info or {})}],
            "limits": {**self.limits.to_dict(), "max_queued": cfg.max_queued},
            "batching": {"max_batch": min(cfg.max_batch or self.model.max_batch, self.model.max_batch),
                         "wait_s": cfg.batch_wait_s, "approximate": cfg.batch_approximate},
            "serving": {"backend": cfg.backend, "replicas": cfg.replicas, "max_replicas": cfg.max_replicas,
                        "gpus_per_replica": cfg.gpus_per_replica, "accelerator_type": cfg.accelerator_type},
        })
