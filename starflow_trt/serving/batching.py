"""Which requests may share one ``Pipeline.run`` call, and each request's own inputs.

``@serve.batch`` hands the replica whatever arrived together; :func:`plan_groups` splits that
into groups whose per-call options match (frames, guidance, sampler and Jacobi options,
aspect, denoising, context length), at most ``max_batch`` each, in arrival order. Every request's
noise comes from its own seed (a request of one seed per row), so a request gives the
same frames in any group, as long as its sampler commits tokens independently of the other rows
(:attr:`VideoRequest.exact_batching`); thresholded-Jacobi requests run alone unless the server
allows approximate batching.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Hashable, Optional

from ..request import GenerationRequest
from .limits import VideoRequest


@dataclass(eq=False)
class Ticket:
    """One request inside a replica: its inputs and what happened to it."""

    request: VideoRequest
    prepared: Optional[GenerationRequest] = None   # the request's one row, its prompt and image encoded
    pixel_frames_sent: int = 0                # decoded frames (VAE exports) streamed so far
    arrived: float = field(default_factory=time.perf_counter)
    started: Optional[float] = None
    gone: bool = False        # the caller disconnected or timed out
    finished: bool = False    # the caller received done or error
    frames_sent: int = 0
    frames_generated: int = 0
    batch_size: int = 0
    status: str = "queued"


def batch_key(req: VideoRequest, approximate: bool = False) -> Hashable:
    """Requests with equal keys may run as one request of their rows."""
    options = (req.frames, req.aspect, req.guidance, req.sampler, req.denoise, req.context_frames)
    if req.sampler == "jacobi":
        j = req.jacobi
        options += (j.block_size, j.max_iter, j.threshold, j.schedule, j.window, j.context_length)
    if not (req.exact_batching or approximate):
        options += (req.request_id,)   # alone: a shared stopping test would change its frames
    return options


def plan_groups(tickets: list[Ticket], max_batch: int, approximate: bool = False) -> list[list[Ticket]]:
    """Live tickets → groups of matching options, each at most ``max_batch``, ordered by first arrival."""
    groups: dict[Hashable, list[list[Ticket]]] = {}
    order: list[list[Ticket]] = []
    for t in tickets:
        if t.gone:
            continue
        chunks = groups.setdefault(batch_key(t.request, approximate), [])
        if not chunks or len(chunks[-1]) >= max_batch:
            chunks.append([])
            order.append(chunks[-1])
        chunks[-1].append(t)
    return order
