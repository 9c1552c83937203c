"""The exported graphs as the runtime calls them: their names and IO names (from :mod:`..export.names`),
loaded runners, RoPE rows and SOS vectors, and per-call timed calls."""

from __future__ import annotations

import copy
from typing import Callable, Optional

import torch

from ..errors import ManifestError
from ..export.dtypes import TORCH_DTYPES
from ..export.manifest import Manifest
from ..reference.rope import rope_table
from .backends.base import Backend, CallStats, GraphRunner
from ..export.names import (D, DEEP_PREFILL, DEEP_STEP, DENOISER, LOGDET, NEW, PAST, ROPE_COS, ROPE_SIN,  # noqa: F401
                            SCALE, SHIFT, SOS, TEXT, TOKENS, X, Z, forward_graph, kv_names, step_graph)


def past_names(layers: int) -> list[str]:
    return kv_names(layers, PAST)


def new_names(layers: int) -> list[str]:
    return kv_names(layers, NEW)


def rope_inputs(cos: torch.Tensor, sin: torch.Tensor) -> dict[str, torch.Tensor]:
    return {ROPE_COS: cos.contiguous(), ROPE_SIN: sin.contiguous()}


# ---------------------------------------------------------------- graphs
class Graphs:
    """The graphs of one export on one backend: runners loaded once, RoPE tables per shape, SOS vectors."""

    def __init__(self, manifest: Manifest, backend: Backend):
        self.manifest, self.backend, self.geo = manifest, backend, manifest.geometry
        self.device = backend.device
        self._runners: dict[str, GraphRunner] = {}
        self._ropes: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def has(self, name: str) -> bool:
        return name in self.manifest.graphs

    def runner(self, name: str) -> GraphRunner:
        if name not in self._runners:
            self._runners[name] = self.backend.load(self.manifest.graph(name))
        return self._runners[name]

    def rope(self, frames: int, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin) [text_len + frames·F, hd] on the backend's device (computed once per shape)."""
        g = self.geo
        key = (frames, text_len, g.h, g.w)   # one table per shape and token grid (--aspects exports)
        if key not in self._ropes:
            self._ropes[key] = rope_table(g.head_dim, frames, g.h, g.w, text_len, g.rope_length, device=self.device)
        return self._ropes[key]

    def kv_dtype(self, name: str) -> torch.dtype:
        """The K/V dtype of graph ``name`` (its ``new_k_0`` output): the cache follows the graphs' precision."""
        if not self.has(name):
            return torch.float32
        kv = [t for t in self.manifest.graph(name).outputs if t.name.startswith(f"{NEW}_k_")]
        dtype = TORCH_DTYPES[kv[0].dtype] if kv else torch.float32
        override = getattr(self.backend, "kv_dtype", None)   # a backend that runs the graphs in its own dtype
        return dtype if override is None else override(dtype)

    def on_grid(self, geo) -> "Graphs":
        """These graphs on ``geo`` (another exported token grid): runners and RoPE cache shared."""
        if geo is self.geo:
            return self
        view = copy.copy(self)
        view.geo = geo
        return view

    def sos(self, block: int) -> torch.Tensor:
        """Block ``block``'s start-of-sequence vector [c]."""
        name = step_graph(block, self.geo)
        values = self.manifest.graph(name).extra.get(SOS)
        if values is None:
            raise ManifestError(f"graph {name!r} has no 'sos' vector in the manifest; re-export")
        return torch.tensor(values, dtype=torch.float32, device=self.device)


class GraphCalls:
    """The graph calls of one request: ``calls(name, inputs, outputs)``, timed into ``stats``.

    ``before()`` runs ahead of every call (a generate call's cancellation check: a request that is
    cancelled or past its deadline stops before its next graph call, prefills and the denoiser included).
    """

    def __init__(self, graphs: Graphs, before: Optional[Callable[[], None]] = None):
        self.graphs, self.before = graphs, before
        self.stats = CallStats()

    def __call__(self, name: str, inputs: dict, outputs: dict) -> None:
        if self.before is not None:
            self.before()
        self.stats.timed(self.graphs.runner(name), inputs, outputs)

    def forward(self, block: int, h: torch.Tensor, text: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Block ``block``'s forward graph on h [B, T, h, w, c] → (z like h, logdet [B, T, F, c]
        frame-local, else [B, T·F, c]); ``text`` [B, L, D] for the top block."""
        g = self.graphs.geo
        top = block == g.top_index
        local = g.frame_local and not top
        b, t, c = h.shape[0], h.shape[1], h.shape[-1]
        z = torch.empty_like(h)
        logdet = torch.empty((b, t, g.tokens_per_frame, c) if local else (b, t * g.tokens_per_frame, c),
                             dtype=torch.float32, device=h.device)
        inputs = {X: h, **rope_inputs(*self.graphs.rope(1 if local else t, g.text_length if top else 0))}
        if top:
            inputs[TEXT] = text
        self(forward_graph(block), inputs, {Z: z, LOGDET: logdet})
        return z, logdet
