"""A given clip (image / video conditioning, spec §11) through the lower blocks' forward graphs."""

from __future__ import annotations

from typing import Optional

import torch

from ...reference.flow import patchify
from ...sampling import context_inputs
from ..run import GenerateRun


def context_inputs_of(run: GenerateRun) -> Optional[list[torch.Tensor]]:
    """The context's input to every block, index k = block k's, each [B, N, h, w, c]; None without
    a context. The last one is the top block's known prefix; the first, the context itself, is the
    shallow blocks' inverse of the context frames (frame-local models)."""
    if run.context is None:
        return None
    g = run.geo
    with run.timed("prefill"):
        h = patchify(run.context, g.patch_size).contiguous().to(run.device)
        forward = lambda k, h: h if k in g.identity_blocks else run.calls.forward(k, h)[0]   # noqa: E731
        return context_inputs(h, forward, g.top_index)
