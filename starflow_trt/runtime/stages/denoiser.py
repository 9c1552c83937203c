"""The learnable denoiser over ``denoiser``: chunk plan and lookahead from the sampling core."""

from __future__ import annotations

import torch

from ...sampling import ChunkedDenoise, denoise_lookahead
from ..graphs import D, DENOISER, TEXT, X, rope_inputs
from ..run import GenerateRun


class DenoiserStage:
    """Denoises the raw latents ``raw`` [B, T, h, w, c] (the shallow stage's output) as frames arrive and
    emits final frames through ``run.output`` (raw ones when the request does not denoise)."""

    def __init__(self, run: GenerateRun, raw: torch.Tensor):
        self.run, self.raw = run, raw
        chunks = run.req.denoise_chunks
        #: the call's final latents, channels-last
        self.out = raw if chunks is None else torch.empty_like(raw)
        self.chunked = None if chunks is None else ChunkedDenoise(
            chunks, denoise_lookahead(run.geo.temporal_causal, run.frames), raw, self.out,
            self._denoiser, on_ready=self._ready)

    def upto(self, available: int) -> None:
        """Raw frames ``[0, available)`` are in."""
        if self.chunked is None:
            self.run.output.emit(available, self.out)
            return
        with self.run.timed("denoiser"):
            self.chunked.advance(available)

    def _ready(self, done: int) -> None:
        self.run.progress("denoiser", done, self.run.frames)
        self.run.output.emit(done, self.out)

    def _denoiser(self, chunk: torch.Tensor) -> torch.Tensor:
        """The denoiser graph on frames chunk [B, t, h, w, c] → its raw output d (same shape)."""
        run = self.run
        chunk = chunk.contiguous()
        d = torch.empty_like(chunk)
        rope = rope_inputs(*run.graphs.rope(chunk.shape[1], run.geo.text_length))
        run.calls(DENOISER, {X: chunk, TEXT: run.y, **rope}, {D: d})
        return d
