"""A step graph bound to a KV cache: the sampling core's step function over exported graphs."""

from __future__ import annotations

from typing import Optional

import torch

from ...reference.flow import guide
from ...sampling import BlockModel, KVCache
from ..graphs import SCALE, SHIFT, TEXT, TOKENS, GraphCalls, new_names, past_names, rope_inputs
from ..kv import Workspace


class GraphBlock(BlockModel):
    """Graph ``graph`` (``deep_step`` / ``shallow_step_k``) over ``cache``.

    cos/sin [rows, hd] by slot; (a, b) land in the workspace's ``scale`` / ``shift`` views and
    K/V straight in the cache slots. ``guidance`` > 0: the batch is ``[cond ; uncond]``;
    ``prefill_graph`` + ``text`` [B', L, D]: the block is text-conditioned.
    """

    def __init__(self, calls: GraphCalls, graph: str, cache: KVCache, cos: torch.Tensor, sin: torch.Tensor,
                 sos: torch.Tensor, ws: Workspace, guidance: float = 0.0, prefill_graph: Optional[str] = None,
                 text: Optional[torch.Tensor] = None):
        self.calls, self.graph, self.cache, self.cos, self.sin, self.sos = calls, graph, cache, cos, sin, sos
        self.ws, self.guidance, self.prefill_graph, self.text = ws, guidance, prefill_graph, text
        self.past_names, self.new_names = past_names(cache.layers), new_names(cache.layers)

    def prefill_text(self) -> None:
        self.cache.reset()
        if self.prefill_graph is None:
            return
        L = self.text.shape[1]
        self.calls(self.prefill_graph, {TEXT: self.text, **rope_inputs(self.cos[:L], self.sin[:L])},
                   dict(zip(self.new_names, self.cache.slots(L))))
        self.cache.commit(L)

    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bsz, s, c = tokens.shape
        a = self.ws.view("scale", (bsz, s, c))
        b = self.ws.view("shift", (bsz, s, c))
        kv = self.cache
        rows = slice(kv.idx, kv.idx + s)
        self.calls(self.graph, {TOKENS: tokens.contiguous(), **dict(zip(self.past_names, kv.past())),
                                **rope_inputs(self.cos[rows], self.sin[rows])},
                   {SCALE: a, SHIFT: b, **dict(zip(self.new_names, kv.slots(s)))})
        return guide(a, b, self.guidance) if self.guidance > 0 else (a, b)
