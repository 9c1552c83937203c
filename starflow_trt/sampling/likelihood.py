"""Likelihood of data under the flow (spec §7): NLL per dimension and bits per dimension."""

from __future__ import annotations

import math
from typing import Sequence

import torch


def nll(z: torch.Tensor, logdets: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """[B]: ``0.5·mean(z²) − Σ_k mean(logdet_k)`` per sample (nats/dim, no Gaussian constant), in ``dtype``.

    z [B, ...] the flow's output; logdets: each block's log-determinants [B, ...].
    """
    logdet = sum(ld.to(dtype).flatten(1).mean(1) for ld in logdets)
    return 0.5 * z.to(dtype).pow(2).flatten(1).mean(1) - logdet


def bits_per_dim(nll_nats: torch.Tensor) -> torch.Tensor:
    """``(nll + ½·ln 2π) / ln 2``: the Gaussian constant added, in bits."""
    return (nll_nats + 0.5 * math.log(2 * math.pi)) / math.log(2)
