"""Caller arrays → contiguous float32 CPU tensors (numpy or torch in; one error for anything else)."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import InputError


def as_float32(value, name: str) -> torch.Tensor:
    """``value`` (numpy array or torch tensor) as a contiguous float32 CPU tensor; ``name`` is for the error."""
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{name} must be a numpy array or torch tensor, got {type(value).__name__}")
    return value.detach().to("cpu", torch.float32).contiguous()
