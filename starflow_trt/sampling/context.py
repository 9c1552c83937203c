"""Context prefill (spec §11): a given clip's input to every block, the top block's known prefix."""

from __future__ import annotations

from typing import Callable

import torch


def context_inputs(h: torch.Tensor, forward: Callable[[int, torch.Tensor], torch.Tensor],
                   blocks: int) -> list[torch.Tensor]:
    """Forward the context h [B, N, h, w, c] through blocks ``0 … blocks−1`` (``forward(k, h) → z``).

    Returns the input of every block, channels-last: index k = input of block k, the last one
    the top block's input (whose permutation is the top block's prefix). With frame-local
    shallow blocks these are also the exact inverses of the context frames.
    """
    inputs = [h]
    for k in range(blocks):
        h = forward(k, h)
        inputs.append(h)
    return inputs
