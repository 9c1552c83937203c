"""Everything one ``generate`` call owns: request, noise, stage clock, traces, hooks and the frame output.

The long-lived :class:`~starflow_trt.runtime.Pipeline` keeps only what calls share (loaded
graphs, RoPE tables, the workspace). The stages read this object and hand their results to the
next stage themselves (:meth:`~starflow_trt.runtime.Pipeline._execute` wires them); what the
call returns leaves through :class:`FrameOutput`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch

from ..reference.flow import patchify, unpatchify
from ..sampling import BlockTrace, Hooks, SamplingPlan
from .graphs import DEEP_STEP, GraphCalls, Graphs, step_graph
from .kv import Workspace

FrameCallback = Callable[[int, torch.Tensor], None]
ProgressCallback = Callable[[str, int, int], None]

#: the flow stages every call reports, in the order frames pass them
FLOW_STAGES = ("prefill", "deep", "shallow", "denoiser")


class StageClock:
    """Wall seconds per stage; every interval is charged to exactly one stage, the innermost running.

    Streaming runs later stages from inside the deep loop (a finished frame goes through the
    shallow blocks, the denoiser and the caller's callback at once): entering a stage pauses the
    one it was entered from, so each stage's figure is its own time, measured, never a difference.
    """

    def __init__(self, stages: tuple[str, ...] = FLOW_STAGES, timer: Callable[[], float] = time.perf_counter):
        self.seconds: dict[str, float] = dict.fromkeys(stages, 0.0)
        self._timer = timer
        self._running: list[str] = []
        self._mark = 0.0

    def _charge(self, now: float) -> None:
        if self._running:
            top = self._running[-1]
            self.seconds[top] = self.seconds.get(top, 0.0) + now - self._mark
        self._mark = now

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._charge(self._timer())
        self._running.append(name)
        try:
            yield
        finally:
            self._charge(self._timer())
            self._running.pop()


class FrameOutput:
    """The call's output port: final frames [B, C, H, W] go to ``on_frame`` in order, once each."""

    def __init__(self, on_frame: Optional[FrameCallback], hooks: Hooks, patch_size: int, clock: StageClock,
                 start: float):
        self.on_frame, self.hooks, self.patch_size, self.clock, self.start = on_frame, hooks, patch_size, clock, start
        self.emitted = 0
        self.first_frame_s: Optional[float] = None

    def emit(self, upto: int, source: torch.Tensor) -> None:
        """Frames ``[emitted, upto)`` of ``source`` [B, T, h, w, c] are final."""
        if upto <= self.emitted:
            return
        if self.first_frame_s is None:
            self.first_frame_s = time.perf_counter() - self.start
        with self.clock.stage("output"):   # the caller's callbacks (a VAE decode inside is its own "decode")
            for t in range(self.emitted, upto):
                self.hooks.check()
                if self.on_frame is not None:
                    self.on_frame(t, unpatchify(source[:, t], self.patch_size).cpu().clone())
        self.emitted = upto


class GenerateRun:
    """State of one generate call; buffers are views of the pipeline's workspace (reserved here).

    ``x`` [B, T, h, w, c]: the noise, channels-last. The deep block runs ``rows`` sequences
    (2·batch with guidance: ``[cond ; uncond]``).
    """

    def __init__(self, graphs: Graphs, workspace: Workspace, req: SamplingPlan, noise: torch.Tensor,
                 on_frame: Optional[FrameCallback] = None, on_progress: Optional[ProgressCallback] = None,
                 should_stop: Optional[Callable[[], bool]] = None, info: Optional[dict] = None,
                 clock: Optional[StageClock] = None):
        self.start = time.perf_counter()
        self.graphs, self.geo, self.req, self.ws = graphs, graphs.geo, req, workspace
        self.on_progress = on_progress
        self.hooks = Hooks(should_stop=should_stop)
        self.calls = GraphCalls(graphs, before=self.hooks.check)
        self.info = dict(info or {})
        self.clock = clock or StageClock()
        self.traces: list[BlockTrace] = []
        g = self.geo
        self.batch, self.frames, self.guidance = req.batch, req.frames, req.guidance
        self.device = dev = graphs.device
        self.y = req.y.to(dev)
        self.text = req.text().to(dev)        # [rows, L, D]
        self.rows = self.text.shape[0]
        self.context, self.n_ctx = req.context, req.n_ctx
        self.x = patchify(noise, g.patch_size).contiguous().to(dev)  # [B, T, h, w, c]
        self.n_tokens = self.frames * g.tokens_per_frame
        self.allocations = self._reserve()
        self.output = FrameOutput(on_frame, self.hooks, g.patch_size, self.clock, self.start)
        # Frames go through the shallow blocks as soon as they are final only when the caller
        # streams (on_frame): one batch of all frames needs far fewer graph calls. Upstream's
        # stopping test averages over every sequence of a shallow batch (all frames), so the
        # upstream-exact thresholded schedule always inverts all frames in one batch.
        jac = req.jacobi
        self.stream = on_frame is not None and not (jac is not None and req.schedule == "upstream"
                                                    and jac.threshold > 0)

    @property
    def deep_frames(self) -> int:
        """Frames the deep KV cache holds at most: the window (long video) or the whole video."""
        return min(self.frames, self.req.window) if self.req.window else self.frames

    @property
    def deep_capacity(self) -> int:
        """Deep KV slots: text + :attr:`deep_frames` (the cache, and the RoPE rows, are slot-indexed)."""
        return self.geo.text_length + self.deep_frames * self.geo.tokens_per_frame

    @property
    def shallow_group(self) -> int:
        """Frames the shallow blocks invert in one batch: frame-local blocks take at most the export's
        ``max_frames`` per batch (its graphs' batch range; a long video's working memory stays that of
        the window), other blocks the whole video (one sequence)."""
        return min(self.frames, self.geo.max_frames) if self.geo.frame_local else self.frames

    def _reserve(self) -> int:
        """Reserve every workspace buffer this call needs; returns how many were (re)allocated.

        Sized by the window, never by the whole long video: a deep evaluation covers at most
        :attr:`deep_frames` frames (or the given context), a shallow one :attr:`shallow_group` frames.
        """
        g, ws, hd = self.geo, self.ws, self.geo.head_dim
        before = ws.allocations
        top = g.top
        # the caches take the graphs' K/V dtype (FP16/BF16 exports: half the memory)
        ws.reserve("deep_kv", self.deep_capacity * top.layers * 2 * self.rows * top.heads * hd,
                   self.graphs.kv_dtype(DEEP_STEP))
        shallow = [g.blocks[k] for k in g.shallow_blocks]
        seqs = self.batch * (self.shallow_group if g.frame_local else 1)
        s_len = g.tokens_per_frame if g.frame_local else self.n_tokens
        if shallow:
            per_slot = max(b.layers * b.heads for b in shallow) * 2 * hd
            ws.reserve("shallow_kv", s_len * per_slot * seqs, self.graphs.kv_dtype(step_graph(g.shallow_blocks[0], g)))
        deep_s = g.tokens_per_frame * max(self.deep_frames, self.n_ctx)
        scratch = max(self.rows * deep_s, seqs * s_len) * g.token_channels
        ws.reserve("scale", scratch, torch.float32)
        ws.reserve("shift", scratch, torch.float32)
        return ws.allocations - before

    # ------------------------------------------------------------ events
    def timed(self, stage: str):
        """``with run.timed("shallow"):`` — the stage's own wall time (see :class:`StageClock`)."""
        return self.clock.stage(stage)

    def progress(self, stage: str, done: int, total: int) -> None:
        if self.on_progress is not None:
            self.on_progress(stage, done, total)

    # ------------------------------------------------------------ results
    def latents(self, tokens: torch.Tensor) -> torch.Tensor:
        """Channels-last frames [B, T, h, w, c] → latents [B, T, C, H, W] on the CPU."""
        return unpatchify(tokens, self.geo.patch_size).cpu()

    def stats(self) -> dict:
        st = self.calls.stats
        first = self.output.first_frame_s
        return {
            "graph_calls": dict(st.calls), "graph_seconds": {k: round(v, 6) for k, v in st.seconds.items()},
            "total_graph_calls": sum(st.calls.values()),
            "seconds": {**{k: round(v, 6) for k, v in self.clock.seconds.items()},
                        "total": round(time.perf_counter() - self.start, 6)},
            "time_to_first_frame": None if first is None else round(first, 6),
            "jacobi": [t.to_stats() for t in self.traces],
            "schedule": self.req.schedule or "autoregressive", "backend": self.graphs.backend.describe(),
            "frames": self.frames, "batch": self.batch, "guidance": self.guidance,
            "kv_allocations": self.allocations,
            "request": {**self.info, **self.req.describe()},
        }
