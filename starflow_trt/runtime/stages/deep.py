"""The deep (top) block over ``deep_step``: text / context prefill, then AR or Jacobi with
long-video windows (the sampling core); frames are handed on as soon as they are final."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ...reference.flow import permute_tokens, unpermute_tokens
from ...sampling import BlockInversion, BlockTrace, Hooks, KVCache
from ..graphs import DEEP_PREFILL, DEEP_STEP
from ..run import GenerateRun
from .blocks import GraphBlock

#: ``on_frames(n, out)``: frames ``[0, n)`` of ``out`` [B, T, h, w, c] are final
FramesReady = Callable[[int, torch.Tensor], None]


class DeepStage:
    """The deep block of ``run``. ``context`` [B, N, h, w, c]: the top block's input on the given
    clip (:func:`~.context.context_inputs_of`), its known prefix; ``__call__`` returns the block's
    output [B, T, h, w, c] and hands every frame to ``on_frames`` as soon as it is final."""

    def __init__(self, run: GenerateRun, context: Optional[torch.Tensor], on_frames: FramesReady):
        self.run, self.context, self.on_frames = run, context, on_frames
        g = run.geo
        self.top = g.top_index
        self.perm = g.blocks[self.top].permutation
        self.streamable = self.perm != "flip"   # "flip" reverses the whole video: nothing is final early
        self.inv: Optional[BlockInversion] = None
        self.out = torch.empty_like(run.x)     # [B, T, h, w, c]
        self.done = 0                          # frames [0, done) of out are final

    def __call__(self) -> torch.Tensor:
        run, g = self.run, self.run.geo
        top = g.blocks[self.top]
        x = torch.cat([run.x, run.x]) if run.guidance > 0 else run.x
        seq = permute_tokens(x, self.perm).contiguous()          # ζ [rows, N, c]
        cache = KVCache(run.ws.view("deep_kv", (top.layers, 2, run.deep_capacity, run.rows, top.heads, g.head_dim)))
        cos, sin = run.graphs.rope(run.deep_frames, g.text_length)   # by cache slot
        block = GraphBlock(run.calls, DEEP_STEP, cache, cos, sin, run.graphs.sos(self.top), run.ws, run.guidance,
                           prefill_graph=DEEP_PREFILL, text=run.text)
        trace = BlockTrace(self.top, DEEP_STEP)
        run.traces.append(trace)
        self.inv = BlockInversion(block, seq, trace, Hooks(self._progress, run.hooks.should_stop))
        with run.timed("prefill"):
            start = self.inv.prefill(None if self.context is None else self._prefix())
        with run.timed("deep"):
            self.inv.run(run.req.solver, run.frames, start)
            self._publish(run.frames)
        return self.out

    def _prefix(self) -> torch.Tensor:
        """The context as the top block's prefix [rows, N·F, c] (doubled for guidance, permuted)."""
        top_in = self.context
        return permute_tokens(torch.cat([top_in, top_in]) if self.run.guidance > 0 else top_in,
                              self.perm).contiguous()

    def _progress(self, tokens_done: int) -> None:
        self.run.progress("deep", tokens_done, self.run.n_tokens)
        if self.streamable:
            self._publish(tokens_done // self.run.geo.tokens_per_frame)

    def _publish(self, frames_done: int) -> None:
        """Frames [done, frames_done) are final: copy them out of the inversion, hand them on."""
        run, g = self.run, self.run.geo
        if frames_done <= self.done:
            return
        tokens = self.inv.tokens[: run.batch]                     # [B, N, c], the cond rows
        lo, hi = self.done, frames_done
        if self.perm == "flip":
            self.out.copy_(unpermute_tokens(tokens.contiguous(), self.perm, run.x.shape))
        else:
            c = g.token_channels
            part = tokens[:, lo * g.tokens_per_frame : hi * g.tokens_per_frame].reshape(run.batch, hi - lo, g.h, g.w, c)
            if self.perm == "flip_within_frame":
                part = unpermute_tokens(part.reshape(run.batch, -1, c), self.perm, part.shape)
            self.out[:, lo:hi] = part
        self.done = frames_done
        self.on_frames(frames_done, self.out)
