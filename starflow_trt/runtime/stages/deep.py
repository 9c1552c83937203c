"""The deep (top) block over ``deep_step``: text / context prefill, then AR or Jacobi with
long-video windows (the sampling core); frames are published as soon as they are final."""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from ...reference.flow import patchify, permute_tokens, unpermute_tokens
from ...sampling import BlockInversion, BlockTrace, Hooks, KVCache, context_inputs
from ..graphs import DEEP_PREFILL, DEEP_STEP
from ..run import GenerateRun
from .blocks import GraphBlock


class DeepStage:
    """Runs the deep block of ``run``; ``on_frames(n)`` fires when frames ``[0, n)`` are in ``run.deep_out``."""

    def __init__(self, run: GenerateRun, on_frames: Callable[[int], None]):
        self.run, self.on_frames = run, on_frames
        g = run.geo
        self.top = g.top_index
        self.perm = g.blocks[self.top].permutation
        self.streamable = self.perm != "flip"   # "flip" reverses the whole video: nothing is final early
        self.inv: Optional[BlockInversion] = None
        self.nested = 0.0  # seconds of later stages run from inside the deep loop (streaming)

    def __call__(self) -> None:
        run, g = self.run, self.run.geo
        top = g.blocks[self.top]
        x = torch.cat([run.x, run.x]) if run.w > 0 else run.x
        seq = permute_tokens(x, self.perm).contiguous()          # ζ [B', N, c]
        cache = KVCache(run.ws.view("deep_kv", (top.layers, 2, run.deep_capacity, run.bp, top.heads, g.head_dim)))
        cos, sin = run.graphs.rope(run.frames, run.L)
        block = GraphBlock(run.calls, DEEP_STEP, cache, cos, sin, run.graphs.sos(self.top), run.ws, run.w,
                           prefill_graph=DEEP_PREFILL, text=run.text)
        trace = BlockTrace(self.top, DEEP_STEP)
        run.traces.append(trace)
        self.inv = BlockInversion(block, seq, trace, Hooks(self._progress, run.hooks.should_stop))
        with run.timed("prefill"):
            start = self.inv.prefill(None if run.context is None else self._context_prefix())
        t0 = time.perf_counter()
        self.inv.run(run.req.solver, run.frames, start)
        run.seconds["deep"] += time.perf_counter() - t0 - self.nested
        self._publish(run.frames)

    def _context_prefix(self) -> torch.Tensor:
        """Forward graphs of the lower blocks on the context (spec §11) → the top block's prefix [B', N·F, c]."""
        run, g = self.run, self.run.geo
        h = patchify(run.context, g.patch_size).contiguous().to(run.device)
        forward = lambda k, h: h if k in g.identity_blocks else run.calls.forward(k, h)[0]
        run.ctx_inputs = context_inputs(h, forward, g.top_index)
        top_in = run.ctx_inputs[-1]
        return permute_tokens(torch.cat([top_in, top_in]) if run.w > 0 else top_in, self.perm).contiguous()

    def _progress(self, tokens_done: int) -> None:
        self.run.progress("deep", tokens_done, self.run.n_tokens)
        if self.streamable:
            self._publish(tokens_done // self.run.F)

    def _publish(self, frames_done: int) -> None:
        """Deep block finished frames [0, frames_done): copy them out and run the later stages."""
        run = self.run
        if frames_done <= run.frames_deep:
            return
        t0 = time.perf_counter()
        out = self.inv.tokens[: run.batch]
        lo, hi = run.frames_deep, frames_done
        if self.perm == "flip":
            run.deep_out.copy_(unpermute_tokens(out.contiguous(), self.perm, run.x.shape))
        else:
            g = run.geo
            part = out[:, lo * run.F : hi * run.F].reshape(run.batch, hi - lo, g.h, g.w, run.c)
            if self.perm == "flip_within_frame":
                part = unpermute_tokens(part.reshape(run.batch, -1, run.c), self.perm, part.shape)
            run.deep_out[:, lo:hi] = part
        run.frames_deep = frames_done
        self.on_frames(frames_done)
        self.nested += time.perf_counter() - t0
