"""The reference's step function: a :class:`FlowBlock` bound to a KV cache for the sampling core.

The loops (AR, Jacobi, long-video windows, prefill) are :mod:`starflow_trt.sampling`; this
module only says how a torch block evaluates tokens. Block inputs are channels-last:
[B, T, h, w, c] for the top block, [B·T, 1, h, w, c] for a shallow-local block. Guidance
doubles the batch inside (``[z ; z]``).
"""

from __future__ import annotations

from typing import Optional

import torch

from ..sampling import BlockInversion, BlockModel, BlockTrace, ChunkLog, JacobiConfig, KVCache, Solver
from .flow import FlowBlock, acc_dtype, guide, permute_tokens, unpermute_tokens

__all__ = ["ModuleBlock", "invert", "JacobiConfig", "BlockTrace", "ChunkLog"]


class ModuleBlock(BlockModel):
    """:class:`FlowBlock` ``module`` over ``cache``; cos/sin [rows, hd] by slot; text [B', L, D] (top block).

    ``guidance`` > 0: the batch is ``[cond ; uncond]`` and ``step`` returns the guided (a, b)
    (spec §9.3). ``temperature``: attention temperature (AR only, spec §9.3 note).
    """

    def __init__(self, module: FlowBlock, cache: KVCache, cos: torch.Tensor, sin: torch.Tensor,
                 text: Optional[torch.Tensor] = None, guidance: float = 0.0, temperature: float = 1.0):
        self.module, self.cache, self.cos, self.sin = module, cache, cos, sin
        self.text = text.to(module.proj_in.weight.dtype) if module.has_text else None
        self.w, self.temperature = guidance, temperature
        self.sos = module.sos_embed[0, 0]

    def prefill_text(self) -> None:
        self.cache.reset()
        if self.text is not None:
            L = self.text.shape[1]
            self.cache.write_layers(self.module.prefill_text(self.text, self.cos[:L], self.sin[:L],
                                                             temperature=self.temperature))
            self.cache.commit(L)

    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = slice(self.cache.idx, self.cache.idx + tokens.shape[1])
        a, b, kv = self.module.step(tokens, self.cos[rows], self.sin[rows], self.cache.past_layers(),
                                    temperature=self.temperature)
        self.cache.write_layers(kv)
        return guide(a, b, self.w) if self.w > 0 else (a, b)

    def prefill_context(self, tokens: torch.Tensor) -> None:
        """One causal pass over ``[text ; tokens]``: upstream's forward-pass prefill (spec §11)."""
        self.cache.reset()
        n = (0 if self.text is None else self.text.shape[1]) + tokens.shape[1]
        _, _, kv = self.module.step(tokens.contiguous(), self.cos[:n], self.sin[:n], text=self.text)
        self.cache.write_layers(kv)
        self.cache.commit(n)


def invert(module: FlowBlock, z: torch.Tensor, text: Optional[torch.Tensor], guidance: float, solver: Solver,
           frames: int, trace: BlockTrace, prefix: Optional[torch.Tensor] = None,
           temperature: float = 1.0) -> torch.Tensor:
    """Inverse of one block (spec §9.2, §10): block-output z → block input, same shape and dtype as z.

    ``frames``: T_v (1 for shallow-local sequences); ``prefix`` [B', P, c]: the top block's known
    context tokens (spec §11), already doubled with guidance.
    """
    wdtype = module.proj_in.weight.dtype
    z32 = z.to(acc_dtype(wdtype))
    text_len = text.shape[1] if module.has_text else 0
    cos, sin = module.rope(z32, text_len)
    if guidance > 0:
        z32 = torch.cat([z32, z32])
    seq = permute_tokens(z32, module.permutation)
    n = seq.shape[1]
    capacity = text_len + (solver.window * (n // frames) if solver.window else n)
    cache = KVCache.allocate(module.num_layers, seq.shape[0], module.heads, capacity, module.head_dim, wdtype,
                             z.device)
    inv = BlockInversion(ModuleBlock(module, cache, cos, sin, text, guidance, temperature), seq, trace)
    out = inv.run(solver, frames, inv.prefill(prefix))[: z.shape[0]]
    return unpermute_tokens(out, module.permutation, z.shape).to(z.dtype)
