"""The learnable denoiser over ``denoiser``: chunk plan and lookahead from the sampling core."""

from __future__ import annotations

import torch

from ...sampling import ChunkedDenoise, denoise_lookahead
from ..graphs import D, DENOISER, TEXT, X, rope_inputs
from ..run import GenerateRun


class DenoiserStage:
    """Denoises shallow-final frames as they arrive and emits final frames (raw ones without denoising)."""

    def __init__(self, run: GenerateRun):
        self.run = run
        chunks = run.req.denoise_chunks
        self.chunked = None if chunks is None else ChunkedDenoise(
            chunks, denoise_lookahead(run.geo.temporal_causal, run.frames), run.shallow_out, run.final,
            self._denoiser, on_ready=self._ready)

    def upto(self, available: int) -> None:
        """Shallow-final frames ``[0, available)`` are in."""
        if self.chunked is None:
            self.run.emit(available, self.run.shallow_out)
        else:
            self.chunked.advance(available)

    def _ready(self, done: int) -> None:
        self.run.progress("denoiser", done, self.run.frames)
        self.run.emit(done, self.run.final)

    def _denoiser(self, chunk: torch.Tensor) -> torch.Tensor:
        run = self.run
        with run.timed("denoiser"):
            chunk = chunk.contiguous()
            d = torch.empty_like(chunk)
            run.calls(DENOISER, {X: chunk, TEXT: run.y, **rope_inputs(*run.graphs.rope(chunk.shape[1], run.L))},
                      {D: d})
        return d
