"""Runtime over exported graphs: backends, KV buffers, the frame loop, Jacobi schedules."""

from ..reference.sampler import JacobiConfig
from .pipeline import DEFAULT_SCHEDULE, GenerateResult, Pipeline

__all__ = ["Pipeline", "JacobiConfig", "GenerateResult", "DEFAULT_SCHEDULE"]
