"""``JacobiConfig``: the one type of Jacobi sampling options, for the API, requests, the runtime and the reference.

Torch-free (the server's ingress validates requests without torch); the defaults are :mod:`.defaults`'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .defaults import DEFAULT_JACOBI_BLOCK, DEFAULT_JACOBI_ITERS, DEFAULT_JACOBI_THRESHOLD

#: the fields a request's ``jacobi`` object may set (``floor`` is the export's, measured at calibration)
REQUEST_FIELDS = ("block_size", "max_iter", "threshold", "schedule", "window", "context_length")


@dataclass(frozen=True)
class JacobiConfig:
    """Block-wise Jacobi sampling options (spec §10).

    ``schedule="upstream"`` reproduces upstream exactly (the reference sampler accepts only
    this one; ``None`` means "the runner's default": upstream in the reference, the runtime's
    fastest schedule in :class:`starflow_trt.runtime.Pipeline`): chunks of ``block_size``
    tokens while the chunk starts in frame 0 (``s <= F``), ``4·block_size`` after,
    previous-frame initialisation of a chunk's first sweep, stop at
    ``delta < threshold`` or ``max_iter``. ``window`` / ``context_length`` (frames)
    set the long-video local attention window of the top block (None: the
    config's ``local_attn_window``; context None: ``window − 1``).
    ``floor``: the relative update below which sweeps stop improving the result (the residual
    floor of a quantised export, measured at calibration; 0 for float graphs). A chunk stops at
    ``delta < max(threshold, floor)`` (:attr:`stop`); ``threshold = 0`` stays exact-only.
    """

    block_size: int = DEFAULT_JACOBI_BLOCK
    max_iter: int = DEFAULT_JACOBI_ITERS
    threshold: float = DEFAULT_JACOBI_THRESHOLD
    schedule: Optional[str] = None
    window: Optional[int] = None
    context_length: Optional[int] = None
    floor: float = 0.0

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.max_iter < 1 or self.threshold < 0 or not self.floor >= 0:
            raise ValueError("JacobiConfig needs block_size >= 1, max_iter >= 1, threshold >= 0, floor >= 0")

    @property
    def stop(self) -> float:
        """The stopping bound on the relative update: ``max(threshold, floor)``, 0 when ``threshold`` is 0."""
        return max(self.threshold, self.floor) if self.threshold > 0 else 0.0

    @property
    def max_sweep_tokens(self) -> int:
        """The most tokens one sweep evaluates: a chunk is ``4·block_size`` after frame 0, and the sliding
        schedules' window takes up to two chunks (:mod:`starflow_trt.sampling.jacobi`)."""
        return 8 * self.block_size
