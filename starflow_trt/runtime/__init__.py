"""Runtime over exported graphs: backends, KV buffers, stages (deep, shallow, denoiser), the Pipeline."""

from ..sampling import JacobiConfig
from .pipeline import DEFAULT_SCHEDULE, GenerateResult, Pipeline

__all__ = ["Pipeline", "JacobiConfig", "GenerateResult", "DEFAULT_SCHEDULE"]
