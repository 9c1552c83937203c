"""The generation deployment: one ``Pipeline`` per replica, batched, streamed, cancellable.

``stream(request)`` (called through a streaming ``DeploymentHandle``) yields, in order:
``{"type": "_rejected", "field", "message"}`` for a request the replica cannot take (bad prompt),
or ``{"type": "_started", ...}`` when its batch starts, then frame events, then ``done`` or
``error``. Events whose type starts with ``_`` are for the ingress only.

A request's text and conditioning go through the Pipeline's stages first (:meth:`Pipeline.prepare`: the
export's text encoder, the VAE encoder for an image), on a thread of their own while earlier batches
generate; a prompt the encoder cannot take is rejected there. Requests then go through ``@serve.batch``;
:func:`~.batching.plan_groups` splits a batch into groups of matching options and each group runs as one
request of its rows (:func:`~starflow_trt.request.stack_rows`, one seed per row) through
:meth:`Pipeline.run`, the executor the CLI and the Python API use. It runs on
the replica's one worker thread and its ``on_frame`` (latent frames) and ``on_video`` (VAE-decoded
frames, PNG / mp4) events are forwarded to the callers as they come. A caller that goes away (client
disconnect, timeout) gets no more events; when every caller of a call is gone or past its deadline
(``timeout_s`` from its arrival here) the runtime's ``should_stop`` hook stops the call before its next
graph call.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Optional

import torch
from ray import serve

from ..errors import GenerationCancelled, StarflowError
from ..request import stack_rows
from .batching import Ticket, plan_groups
from .config import ServeConfig
from .frames import error_event, frame_event, mp4_bytes, png_event
from .limits import RequestError, VideoRequest

log = logging.getLogger("ray.serve")

#: batch size before ``__init__`` sets the export's (the decorator needs a value at import)
_DEFAULT_BATCH = 8


@serve.deployment(name="VideoGenerator")
class VideoGenerator:
    """Holds one ``Pipeline``; ``config`` is :meth:`ServeConfig.to_dict`."""

    def __init__(self, directory: str, config: dict):
        from ..runtime import Pipeline
        from .metrics import GeneratorMetrics

        self.config = cfg = ServeConfig.from_dict(config)
        t0 = time.perf_counter()
        self.pipe = Pipeline.from_dir(directory, backend=cfg.backend, precision=cfg.precision,
                                      providers=cfg.providers, threads=cfg.threads, thread_pool=cfg.thread_pool,
                                      cuda_graphs=cfg.cuda_graphs, device=cfg.device, dtype=cfg.dtype,
                                      checkpoint=cfg.checkpoint)
        self.summary = self.pipe.summary
        self.max_batch = min(cfg.max_batch or self.summary.max_batch, self.summary.max_batch)
        type(self)._batched.set_max_batch_size(self.max_batch)
        type(self)._batched.set_batch_wait_timeout_s(cfg.batch_wait_s)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="starflow-generate")
        self._text = ThreadPoolExecutor(1, thread_name_prefix="starflow-text")
        self._closing = False
        self._queued = 0
        self._busy = 0                  # batches running
        self._idle = asyncio.Event()    # set while no batch runs: requests enter the batcher then
        self._idle.set()
        self._recent: deque[dict] = deque(maxlen=512)
        self.metrics = GeneratorMetrics()
        ctx = serve.get_replica_context()
        self.replica = getattr(getattr(ctx, "replica_id", None), "unique_id", None) or str(os.getpid())
        if cfg.warmup:
            self._warmup()
        self.load_seconds = round(time.perf_counter() - t0, 3)

    # ------------------------------------------------------------ inputs
    def prepare(self, req: VideoRequest):
        """The request's :class:`~starflow_trt.request.GenerationRequest` with its prompt and image encoded
        (:meth:`Pipeline.prepare`); :class:`RequestError` (HTTP 400) for a prompt the encoder cannot take."""
        gen = req.generation
        try:
            return self.pipe.prepare(gen)
        except (ValueError, StarflowError) as exc:
            raise RequestError("prompt" if gen.prompts is not None else "image", str(exc)) from None

    def _warmup(self) -> None:
        """One short generate so the first request does not pay for session creation."""
        from ..runtime import JacobiConfig

        g = self.pipe.geo
        y = torch.zeros(1, g.text_length, g.text_width)
        self.pipe.generate(y, y_uncond=y, guidance=1.0, num_frames=min(2, g.max_frames), jacobi=JacobiConfig())

    # ------------------------------------------------------------ requests
    async def stream(self, req: VideoRequest) -> AsyncIterator[dict]:
        """Events of one request (see the module docstring)."""
        ticket = Ticket(req)
        loop = asyncio.get_running_loop()
        try:
            ticket.prepared = await loop.run_in_executor(self._text, self.prepare, req)
        except RequestError as exc:
            yield {"type": "_rejected", "field": exc.field, "message": str(exc)}
            return
        self._queued += 1
        self.metrics.queue.set(self._queued)
        try:
            # Requests that arrive while a batch runs wait here and enter @serve.batch together when
            # it ends, so they form full batches instead of trickling in one wait window at a time.
            await self._idle.wait()
            async for event in self._batched(ticket):
                if event is None:
                    continue
                ticket.finished = event["type"] in ("done", "error")
                yield event
                if ticket.finished:
                    return
        finally:
            if ticket.status == "queued":       # never started: rejected by the batcher or left early
                self._queued -= 1
                self.metrics.queue.set(self._queued)
                if not ticket.finished:
                    self._record(ticket, "cancelled", 0)
            ticket.gone = ticket.gone or not ticket.finished

    @serve.batch(max_batch_size=_DEFAULT_BATCH, batch_wait_timeout_s=0.02)
    async def _batched(self, tickets: list[Ticket]) -> AsyncIterator[list]:
        """Streaming batch: each yield is one item per ticket (None: nothing new, StopIteration: ended)."""
        slot = {id(t): i for i, t in enumerate(tickets)}
        self._busy += 1
        self._idle.clear()
        try:
            for group in plan_groups(tickets, self.max_batch, self.config.batch_approximate):
                async for updates in self._run_group(group):
                    for wave in _waves(updates):   # a row holds one event per ticket
                        row: list = [None] * len(tickets)
                        for t, event in wave:
                            row[slot[id(t)]] = event
                        yield row
            yield [StopIteration] * len(tickets)
        finally:
            self._busy -= 1
            if not self._busy:
                self._idle.set()

    async def _run_group(self, group: list[Ticket]) -> AsyncIterator[list[tuple[Ticket, dict]]]:
        """One ``Pipeline.run`` of ``group``'s rows; yields [(ticket, event)] as events arrive."""
        live = [t for t in group if not t.gone]
        if not live:
            return
        group = live
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        started = time.perf_counter()
        for t in group:
            t.started, t.status, t.batch_size = started, "running", len(group)
        self._queued -= len(group)
        self.metrics.queue.set(self._queued)
        self.metrics.batch.observe(len(group))
        yield [(t, {"type": "_started", "batch_size": len(group)}) for t in group]

        req = group[0].request
        generated = [0]
        status, job, abort = "error", None, [False]
        decoded = self.summary.vae and any(t.request.output == "png" or t.request.mp4 for t in group)

        def should_stop() -> bool:
            now = time.perf_counter()
            return self._closing or abort[0] or all(t.gone or now > t.arrived + t.request.timeout_s for t in group)

        def on_frame(index: int, frame: torch.Tensor) -> None:
            generated[0] = index + 1
            loop.call_soon_threadsafe(events.put_nowait, ("frame", index, frame))

        def on_video(chunk: torch.Tensor) -> None:   # decoded frames [B, f, 3, H, W] in [-1, 1]
            loop.call_soon_threadsafe(events.put_nowait, ("video", chunk))

        def work(request) -> None:
            hooks = {"should_stop": should_stop}
            if decoded:
                hooks["on_video"] = on_video
            try:
                result = self.pipe.run(request, on_frame=on_frame, **hooks)
                loop.call_soon_threadsafe(events.put_nowait, ("done", result))
            except GenerationCancelled:
                loop.call_soon_threadsafe(events.put_nowait, ("cancelled", None))
            except BaseException as exc:  # noqa: BLE001 - reported to the callers, logged here
                if not isinstance(exc, StarflowError):
                    log.exception("generate failed")
                loop.call_soon_threadsafe(events.put_nowait, ("error", exc))

        clips: dict[int, list] = {id(t): [] for t in group if t.request.mp4}
        try:
            job = loop.run_in_executor(self._worker, work, stack_rows([t.prepared for t in group]))
            while True:
                kind, *payload = await events.get()
                if kind in ("frame", "video"):
                    handler = self._frame_events if kind == "frame" else self._video_events
                    out = await asyncio.to_thread(handler, group, *payload, clips)
                    if out:
                        yield out
                    continue
                if kind == "done":
                    result = payload[0]
                    gen_s = time.perf_counter() - started
                    self.metrics.generate.observe(gen_s)
                    self.metrics.frames.inc(len(group) * req.frames)
                    self.metrics.fps.set(len(group) * req.frames / max(gen_s, 1e-9))
                    out = await asyncio.to_thread(self._done_events, group, result, gen_s, clips)
                    status = "ok"
                    yield out
                elif kind == "cancelled":
                    status = "cancelled"
                    self.metrics.cancelled.inc()
                else:
                    exc = payload[0]
                    msg = str(exc) if isinstance(exc, StarflowError) else f"generation failed ({type(exc).__name__}: {exc})"
                    yield [(t, error_event(msg)) for t in group if not t.gone]
                break
        except BaseException:   # shutting down, or a failure here: stop the call; callers get the error
            abort[0] = True
            raise
        finally:
            if job is not None:
                await job
            for t in group:
                self._record(t, "cancelled" if t.gone else status, generated[0])

    def _frame_events(self, group: list[Ticket], index: int, frame: torch.Tensor,
                      clips: dict[int, list]) -> list[tuple[Ticket, dict]]:
        """A finished latent frame [B, C, H, W]: latents events, or PNG / mp4 frames of a pixel-space model."""
        from ..media.io import frames_to_uint8

        out = []
        for j, t in enumerate(group):
            if t.gone:
                continue
            pixels = self.summary.pixel_space
            if id(t) in clips and pixels:
                clips[id(t)].append(frames_to_uint8(frame[j]))
            if t.request.output == "latents" or pixels:
                out.append((t, frame_event(index, frame[j], t.request.output)))
                t.frames_sent += 1
        return out

    def _video_events(self, group: list[Ticket], chunk: torch.Tensor, clips: dict[int, list]) -> list:
        """Decoded frames [B, f, 3, H, W] (VAE exports): PNG events numbered by pixel frame, and the mp4's frames."""
        from ..media.io import encode_png, frames_to_uint8

        rgb = frames_to_uint8(chunk)   # [B, f, H, W, 3], as the Pipeline's result.video
        out = []
        for j, t in enumerate(group):
            if t.gone:
                continue
            if id(t) in clips:
                clips[id(t)].extend(rgb[j])
            if t.request.output == "png":
                for frame in rgb[j]:
                    out.append((t, png_event(t.pixel_frames_sent, encode_png(frame))))
                    t.pixel_frames_sent += 1
                    t.frames_sent += 1
        return out

    def _done_events(self, group: list[Ticket], result, gen_s: float, clips: dict[int, list]) -> list:
        st = result.stats
        out = []
        for t in group:
            if t.gone:
                continue
            req = t.request
            stats = {
                "seed": req.seed, "frames": req.frames, "batch_size": len(group), "batch_exact": req.exact_batching,
                "seconds": {"queue": round(t.started - t.arrived, 6), "generate": round(gen_s, 6),
                            **{k: v for k, v in st.get("seconds", {}).items() if k != "total"}},
                "generate_time_to_first_frame": st.get("time_to_first_frame"),
                "graph_calls": st.get("total_graph_calls"), "schedule": st.get("schedule"),
                "backend": st.get("backend"), "replica": self.replica,
            }
            if "request" in st:
                stats["request"] = st["request"]
            event = {"type": "done", "stats": stats}
            if id(t) in clips:
                import base64

                event["mp4"] = base64.b64encode(mp4_bytes(clips[id(t)], req.fps)).decode("ascii")
            out.append((t, event))
        return out

    def _record(self, t: Ticket, status: str, generated: int) -> None:
        t.status, t.frames_generated = status, generated
        self._recent.append({"request_id": t.request.request_id, "status": status, "frames": t.request.frames,
                             "frames_generated": generated, "frames_sent": t.frames_sent,
                             "batch_size": t.batch_size})

    def check_health(self) -> None:
        """Serve calls this every few seconds: refresh the gauges (Ray drops gauges left unset)."""
        self.metrics.queue.set(self._queued)

    # ------------------------------------------------------------ introspection
    def describe(self) -> dict:
        """What this replica serves (``GET /v1/models``) and how it batches."""
        return {"model": self.summary.to_dict(), "backend": self.pipe.backend.describe(), "replica": self.replica,
                "pid": os.getpid(), "load_seconds": self.load_seconds, "max_batch": self.max_batch,
                "batch_wait_s": self.config.batch_wait_s, "batch_approximate": self.config.batch_approximate,
                "prompt": self.summary.prompt_encoder is not None, "cancellation": "graph call"}

    def recent(self) -> list[dict]:
        """The last requests this replica finished: status (ok, error, cancelled), frames generated and sent."""
        return list(self._recent)

    def __del__(self):
        self._closing = True
        worker = getattr(self, "_worker", None)
        if worker is not None:
            worker.shutdown(wait=False, cancel_futures=True)


def _waves(updates: list[tuple[Ticket, dict]]) -> list[list[tuple[Ticket, dict]]]:
    """Split updates so each wave has at most one event per ticket, in order (a decoded chunk is 4 frames)."""
    waves: list[list[tuple[Ticket, dict]]] = []
    count: dict[int, int] = {}
    for t, event in updates:
        k = count.get(id(t), 0)
        count[id(t)] = k + 1
        if k == len(waves):
            waves.append([])
        waves[k].append((t, event))
    return waves
