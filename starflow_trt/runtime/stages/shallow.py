"""The blocks below the top on deep-final frames: frames batched (frame-local: folded into the batch, at most
the export's ``max_frames`` at a time)."""

from __future__ import annotations

from typing import Optional

import torch

from ...reference.flow import permute_tokens, unpermute_tokens
from ...sampling import BlockInversion, BlockTrace, KVCache
from ..graphs import step_graph
from ..run import GenerateRun
from .blocks import GraphBlock


class ShallowStage:
    """Inverts every shallow block of ``run`` on deep-final frames into :attr:`out` [B, T, h, w, c].

    ``context`` [B, N, h, w, c]: the given clip's frames, which (frame-local) are their own
    inverse (spec §11) and are copied, not inverted.
    """

    def __init__(self, run: GenerateRun, context: Optional[torch.Tensor] = None):
        self.run, self.context = run, context
        self.out = torch.empty_like(run.x)   # the raw latents, channels-last
        self.done = 0                        # frames [0, done) of out are final

    def upto(self, frames_done: int, deep_out: torch.Tensor) -> int:
        """Frames ``[0, frames_done)`` of ``deep_out`` are final; returns how many of :attr:`out` are."""
        run, g = self.run, self.run.geo
        lo, hi = self.done, frames_done
        if hi <= lo or (not g.frame_local and hi < run.frames):
            return self.done
        with run.timed("shallow"):
            for start in range(lo, hi, run.shallow_group):
                self._frames(start, min(start + run.shallow_group, hi), deep_out)
            self.done = hi
        run.progress("shallow", hi, run.frames)
        return self.done

    def _frames(self, lo: int, hi: int, deep_out: torch.Tensor) -> None:
        """Frames ``[lo, hi)`` of :attr:`out` from those of ``deep_out`` [B, T, h, w, c], one batch."""
        g = self.run.geo
        skip = max(0, self.run.n_ctx - lo) if g.frame_local else 0
        todo = deep_out[:, lo:hi][:, skip:]
        for k in reversed(range(g.num_blocks - 1)):
            if k in g.identity_blocks or todo.shape[1] == 0:
                continue
            todo = self._invert(k, todo)
        out = self.out[:, lo:hi]
        out[:, skip:] = todo
        if skip:
            out[:, :skip] = self.context[:, lo : lo + skip]

    def _invert(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Block k's inverse on frames h [B, t, h, w, c]."""
        run, g = self.run, self.run.geo
        blk = g.blocks[k]
        local = g.frame_local
        hin = h.reshape(-1, 1, *h.shape[2:]) if local else h
        frames = 1 if local else hin.shape[1]
        seq = permute_tokens(hin, blk.permutation).contiguous()
        bs, n = seq.shape[:2]
        cache = KVCache(run.ws.view("shallow_kv", (blk.layers, 2, n, bs, blk.heads, g.head_dim)))
        cos, sin = run.graphs.rope(frames, 0)
        name = step_graph(k, g)
        trace = BlockTrace(k, name)
        run.traces.append(trace)
        inv = BlockInversion(GraphBlock(run.calls, name, cache, cos, sin, run.graphs.sos(k), run.ws), seq, trace,
                             run.hooks)
        inv.run(run.req.solver.unwindowed(), frames, inv.prefill())
        return unpermute_tokens(inv.tokens, blk.permutation, hin.shape).reshape(h.shape)
