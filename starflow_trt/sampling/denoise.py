"""Sample-time denoising in frame chunks (spec §12.3-12.4), emitted as soon as a frame is final."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..frame_plan import DenoiseChunk
from ..model_constants import DENOISE_CONSTANT, DENOISER_LAYERS


def denoise_lookahead(temporal_causal: int, frames: int) -> int:
    """Future frames one output frame of the denoiser depends on: A − 1 per layer (all if A == 0)."""
    return DENOISER_LAYERS * (temporal_causal - 1) if temporal_causal > 0 else frames


class ChunkedDenoise:
    """Denoise ``raw`` [B, T, ...] into ``out`` chunk by chunk as raw frames arrive.

    ``denoiser(chunk [B, t, ...]) → d`` is the learnable denoiser's raw output; a frame becomes
    ``x − 0.3·d``. A chunk's output frame t depends on frames up to t + ``lookahead`` of the
    chunk, so it is computed on the chunk's prefix as soon as that is in (identical to the
    full-chunk value). ``on_ready(done)`` fires after every chunk that made frames final.
    """

    def __init__(self, plan: list[DenoiseChunk], lookahead: int, raw: torch.Tensor, out: torch.Tensor,
                 denoiser: Callable[[torch.Tensor], torch.Tensor],
                 on_ready: Optional[Callable[[int], None]] = None):
        self.plan, self.lookahead, self.raw, self.out, self.denoiser = plan, lookahead, raw, out, denoiser
        self.on_ready = on_ready
        self.chunk = 0
        self.done = 0   # frames [0, done) of ``out`` are final

    def advance(self, available: int) -> int:
        """Raw frames ``[0, available)`` are in: denoise what they make final; returns :attr:`done`."""
        while self.chunk < len(self.plan):
            s, e, write_from = self.plan[self.chunk]
            stop = min(e, available)
            ready = e if stop >= e else min(stop - self.lookahead, e)
            lo = max(self.done, write_from)
            if ready <= lo:
                break
            # the chunk sees frames denoised by earlier chunks before `write_from`, raw frames after
            # (also where an earlier, partial evaluation of this chunk already wrote final values)
            chunk = torch.cat([self.out[:, s:write_from], self.raw[:, write_from:stop]], dim=1)
            clean = chunk - self.denoiser(chunk) * DENOISE_CONSTANT
            self.out[:, lo:ready] = clean[:, lo - s : ready - s]
            self.done = ready
            if self.on_ready is not None:
                self.on_ready(ready)
            if ready < e:
                break
            self.chunk += 1
        return self.done
