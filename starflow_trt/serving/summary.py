"""The export summary the server validates against (:mod:`starflow_trt.summary`, shared with the CLI)."""

from ..summary import PROMPT_ENCODERS, ModelSummary, detect_prompt_encoder

__all__ = ["ModelSummary", "PROMPT_ENCODERS", "detect_prompt_encoder"]
