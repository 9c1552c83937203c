"""A fake step function for the sampling core's unit tests: a tiny causal affine model with an
independent, loop-by-loop reference (no network, float64, milliseconds)."""

from __future__ import annotations

from typing import Optional

import torch

from starflow_trt.sampling import BlockModel, KVCache

C = 3  # token channels


def affine(history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) [B, c] of a token from the inputs it sees, history [P, B, c] (P >= 1)."""
    mean = history.mean(0)
    return 1.0 + 0.4 * torch.tanh(mean + 0.2 * history.shape[0]), 0.5 * torch.sin(2 * mean)


class FakeBlock(BlockModel):
    """Causal "network": token j's (a, b) = :func:`affine` of every cached input plus the inputs up
    to j. The cache stores the inputs themselves (one layer, one head of width c)."""

    def __init__(self, batch: int, capacity: int, text: Optional[torch.Tensor] = None,
                 device: Optional[torch.device] = None):
        self.cache = KVCache.allocate(1, batch, 1, capacity, C, torch.float64, device)
        self.sos = torch.full((C,), 0.1, dtype=torch.float64, device=device)
        self.text = text           # [L, B, c] text "tokens"
        self.evaluations = 0
        self.prefills: list[str] = []

    def _write(self, inputs: torch.Tensor) -> None:   # inputs [S, B, c]
        k, v = self.cache.slots(inputs.shape[0])
        k.copy_(inputs.unsqueeze(2))
        v.copy_(inputs.unsqueeze(2))

    def prefill_text(self) -> None:
        self.prefills.append("text")
        self.cache.reset()
        if self.text is not None:
            self._write(self.text)
            self.cache.commit(self.text.shape[0])

    def prefill_context(self, tokens: torch.Tensor) -> None:
        self.prefills.append("context")
        super().prefill_context(tokens)

    def step(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.evaluations += 1
        # a real attention layer spreads a NaN input to every query (masked scores included)
        assert torch.isfinite(tokens).all(), "a step got a non-finite input token"
        new = tokens.permute(1, 0, 2)                      # [S, B, c]
        past = self.cache.past()[0][:, :, 0]               # [P, B, c]
        seen = torch.cat([past, new])
        out = [affine(seen[: past.shape[0] + j + 1]) for j in range(new.shape[0])]
        self._write(new)
        a = torch.stack([o[0] for o in out], 1)
        b = torch.stack([o[1] for o in out], 1)
        return a, b


def reference_ar(seq: torch.Tensor, sos: torch.Tensor, text: Optional[torch.Tensor] = None,
                 prefix: Optional[torch.Tensor] = None, fs: int = 1, window: Optional[int] = None,
                 context: Optional[int] = None) -> torch.Tensor:
    """Independent token loop: x_t = ζ_t·a + b of the inputs token t sees; seq [B, N, c] → x [B, N, c].

    Long-video windows (frames ``window``, ``context``): phase p covers tokens up to its target; after
    a phase the history restarts as [text ; sos ; the last context−1 frames' tokens] (spec §10.4).
    """
    b, n, _ = seq.shape
    x = seq.clone()
    p = 0 if prefix is None else prefix.shape[1]
    if p:
        x[:, :p] = prefix
    text_rows = [] if text is None else list(text)
    bounds = [n]
    if window is not None:
        bounds, target = [], min(n, window * fs)
        while True:
            bounds.append(target)
            if target >= n:
                break
            target = min(n, target + (window - context) * fs)
    for t in range(p, n):
        phase = next(i for i, e in enumerate(bounds) if t < e)
        first = 0 if phase == 0 else bounds[phase - 1] - context * fs
        inputs = [sos.expand(b, -1)] + [x[:, i] for i in range(first, t)]   # [sos ; x_first … x_{t−1}]
        a, bb = affine(torch.stack(text_rows + inputs))
        x[:, t] = seq[:, t] * a + bb
    return x
