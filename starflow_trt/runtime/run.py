"""Everything one ``generate`` call owns: request, buffers, frame counters, stats and hooks.

The long-lived :class:`~starflow_trt.runtime.Pipeline` keeps only what calls share (loaded
graphs, RoPE tables, the workspace); the stages read and write this object.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch

from ..reference.flow import patchify, unpatchify
from ..sampling import BlockTrace, Hooks, Request
from .graphs import DEEP_STEP, GraphCalls, Graphs, step_graph
from .kv import Workspace

FrameCallback = Callable[[int, torch.Tensor], None]
ProgressCallback = Callable[[str, int, int], None]


class GenerateRun:
    """State of one generate call; buffers are views of the pipeline's workspace (reserved here).

    Frames move deep → shallow → denoiser: ``frames_deep`` / ``frames_shallow`` / ``frames_emitted``
    count the frames final after each. Channels-last buffers [B, T, h, w, c]: ``x`` (noise),
    ``deep_out``, ``shallow_out`` (raw latents), ``final`` (denoised).
    """

    def __init__(self, graphs: Graphs, workspace: Workspace, req: Request, noise: torch.Tensor,
                 on_frame: Optional[FrameCallback] = None, on_progress: Optional[ProgressCallback] = None,
                 should_stop: Optional[Callable[[], bool]] = None, info: Optional[dict] = None):
        self.start = time.perf_counter()
        self.graphs, self.geo, self.req, self.ws = graphs, graphs.geo, req, workspace
        self.calls = GraphCalls(graphs)
        self.on_frame, self.on_progress = on_frame, on_progress
        self.hooks = Hooks(should_stop=should_stop)
        self.info = dict(info or {})
        self.seconds: dict[str, float] = {"prefill": 0.0, "deep": 0.0, "shallow": 0.0, "denoiser": 0.0}
        self.first_frame_s: Optional[float] = None
        self.traces: list[BlockTrace] = []
        g = self.geo
        self.batch, self.frames, self.w = req.batch, req.frames, req.guidance
        self.device = dev = graphs.device
        self.y = req.y.to(dev)
        self.text = req.text().to(dev)
        self.bp = self.text.shape[0]
        self.F, self.c, self.L = g.tokens_per_frame, g.token_channels, g.text_length
        self.context, self.n_ctx = req.context, req.n_ctx
        self.x = patchify(noise, g.patch_size).contiguous().to(dev)  # [B, T, h, w, c]
        self.n_tokens = self.frames * self.F
        self.allocations = self._reserve()
        self.deep_out = torch.empty_like(self.x)
        self.shallow_out = torch.empty_like(self.x)
        self.final = torch.empty_like(self.x)
        self.frames_deep = 0      # frames final after the deep block
        self.frames_shallow = 0   # frames final after the shallow blocks
        self.frames_emitted = 0
        self.ctx_inputs: list[torch.Tensor] = []   # the context's input to every block (spec §11)
        # Frames go through the shallow blocks as soon as they are final only when the caller
        # streams (on_frame): one batch of all frames needs far fewer graph calls. Upstream's
        # stopping test averages over every sequence of a shallow batch (all frames), so the
        # upstream-exact thresholded schedule always inverts all frames in one batch.
        jac = req.jacobi
        self.stream = on_frame is not None and not (jac is not None and req.schedule == "upstream"
                                                    and jac.threshold > 0)

    @property
    def deep_capacity(self) -> int:
        """Deep KV slots: text + the window (long video) or the whole video."""
        return self.L + (self.req.window * self.F if self.req.window else self.n_tokens)

    def _reserve(self) -> int:
        """Reserve every workspace buffer this call needs; returns how many were (re)allocated."""
        g, ws, hd = self.geo, self.ws, self.geo.head_dim
        before = ws.allocations
        top = g.top
        # the caches take the graphs' K/V dtype (FP16/BF16 exports: half the memory)
        ws.reserve("deep_kv", self.deep_capacity * top.layers * 2 * self.bp * top.heads * hd,
                   self.graphs.kv_dtype(DEEP_STEP))
        shallow = [g.blocks[k] for k in g.shallow_blocks]
        seqs = self.batch * (self.frames if g.frame_local else 1)
        s_len = self.F if g.frame_local else self.n_tokens
        if shallow:
            per_slot = max(b.layers * b.heads for b in shallow) * 2 * hd
            ws.reserve("shallow_kv", s_len * per_slot * seqs, self.graphs.kv_dtype(step_graph(g.shallow_blocks[0], g)))
        max_s = max(self.n_tokens, self.F * max(self.n_ctx, 1))
        ws.reserve("scale", max_s * max(self.bp, seqs) * self.c, torch.float32)
        ws.reserve("shift", max_s * max(self.bp, seqs) * self.c, torch.float32)
        return ws.allocations - before

    # ------------------------------------------------------------ events
    @contextmanager
    def timed(self, stage: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - t0

    def progress(self, stage: str, done: int, total: int) -> None:
        if self.on_progress is not None:
            self.on_progress(stage, done, total)

    def emit(self, upto: int, source: torch.Tensor) -> None:
        """Frames ``[frames_emitted, upto)`` of ``source`` are final: hand them to ``on_frame``."""
        if upto <= self.frames_emitted:
            return
        if self.first_frame_s is None:
            self.first_frame_s = time.perf_counter() - self.start
        p = self.geo.patch_size
        for t in range(self.frames_emitted, upto):
            self.hooks.check()
            if self.on_frame is not None:
                self.on_frame(t, unpatchify(source[:, t], p).cpu().clone())
        self.frames_emitted = upto

    # ------------------------------------------------------------ results
    def outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, raw) [B, T, C, H, W] on the CPU."""
        p = self.geo.patch_size
        raw = unpatchify(self.shallow_out, p)
        final = unpatchify(self.final, p) if self.req.denoise_chunks is not None else raw
        return final.cpu(), raw.cpu()

    def stats(self) -> dict:
        st = self.calls.stats
        return {
            "graph_calls": dict(st.calls), "graph_seconds": {k: round(v, 6) for k, v in st.seconds.items()},
            "total_graph_calls": sum(st.calls.values()),
            "seconds": {**{k: round(v, 6) for k, v in self.seconds.items()},
                        "total": round(time.perf_counter() - self.start, 6)},
            "time_to_first_frame": None if self.first_frame_s is None else round(self.first_frame_s, 6),
            "jacobi": [t.to_stats() for t in self.traces],
            "schedule": self.req.schedule or "autoregressive", "backend": self.graphs.backend.describe(),
            "frames": self.frames, "batch": self.batch, "guidance": self.w,
            "kv_allocations": self.allocations,
            "request": {**self.info, **self.req.describe()},
        }
