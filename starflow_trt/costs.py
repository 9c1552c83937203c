"""Analytic cost model: parameters, FLOPs and bytes of every graph call, from the config alone.

Used by ``starflow-trt inspect`` and by the benchmarks (roofline, GPU projections).
Counts multiply-adds as 2 FLOPs; attention counts QKᵀ and AV over all keys a
query can see (the causal half inside a chunk is ignored: upper bound).
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig
from .model_constants import DENOISER_LAYERS


@dataclass(frozen=True)
class Cost:
    """FLOPs and bytes moved by one call (weights + KV read/written + activations)."""

    flops: float
    weight_bytes: float
    kv_bytes: float
    act_bytes: float

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_bytes + self.act_bytes

    @property
    def intensity(self) -> float:
        """FLOPs per byte."""
        return self.flops / max(self.bytes, 1.0)

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.weight_bytes + other.weight_bytes,
                    self.kv_bytes + other.kv_bytes, self.act_bytes + other.act_bytes)

    def scale(self, k: float) -> "Cost":
        return Cost(self.flops * k, self.weight_bytes * k, self.kv_bytes * k, self.act_bytes * k)


ZERO = Cost(0.0, 0.0, 0.0, 0.0)


def layer_params(width: int, attn_width: int) -> int:
    """One transformer layer: qkv, proj, MLP, two LayerNorms (spec §1.4: 12·C² + 13·C when attn = C)."""
    return ((3 * attn_width * width + 3 * attn_width) + (width * attn_width + width)
            + (8 * width * width + 5 * width) + 4 * width)


def block_params(cfg: ModelConfig, k: int) -> int:
    """Parameters of flow block k (0 for an identity block)."""
    if k != cfg.top_index and cfg.layers[k] == 0:
        return 0
    e, c = cfg.block_width(k), cfg.token_channels
    attn = cfg.block_heads(k) * cfg.head_dim
    n = c + c * e + e + 2 * c * e + 2 * c  # sos, proj_in, proj_out
    if cfg.block_has_text(k):
        n += (cfg.text_width or 0) * e + e
    n += cfg.layers[k] * layer_params(e, attn)
    if cfg.use_final_norm:
        n += e
    return n


def denoiser_params(cfg: ModelConfig) -> int:
    if not cfg.learnable_self_denoiser:
        return 0
    e, c = cfg.channels, cfg.token_channels
    attn = cfg.denoiser_heads * cfg.head_dim
    n = c * e + e + e * c + c + DENOISER_LAYERS * layer_params(e, attn)
    if cfg.conditional_denoiser:
        n += (cfg.text_width or 0) * e + e
    if cfg.use_final_norm:
        n += e
    return n


def _matmul_params(cfg: ModelConfig, width: int, attn: int, layers: int) -> int:
    """Weights a token multiplies through in `layers` layers (no biases / norms)."""
    return layers * (3 * attn * width + width * attn + 8 * width * width)


def step_cost(cfg: ModelConfig, k: int, batch: int, s: int, p: int, dtype_bytes: int = 4) -> Cost:
    """One ``deep_step`` / ``shallow_step_k`` call: ``s`` new tokens over ``p`` cached slots."""
    e, c, layers = cfg.block_width(k), cfg.token_channels, cfg.layers[k]
    attn = cfg.block_heads(k) * cfg.head_dim
    mm = _matmul_params(cfg, e, attn, layers) + 3 * c * e
    flops = 2.0 * batch * s * mm + 4.0 * batch * layers * s * (p + s) * attn
    weights = block_params(cfg, k) * dtype_bytes
    kv = (p + s) * layers * 2 * batch * attn * dtype_bytes
    act = batch * s * (c * 3 + 2 * e) * 4
    return Cost(flops, weights, kv, act)


def prefill_cost(cfg: ModelConfig, batch: int, dtype_bytes: int = 4) -> Cost:
    """``deep_prefill``: text tokens through every layer of the top block."""
    k = cfg.top_index
    e, layers, L, D = cfg.block_width(k), cfg.layers[k], cfg.txt_size, cfg.text_width or 0
    attn = cfg.block_heads(k) * cfg.head_dim
    flops = 2.0 * batch * L * (_matmul_params(cfg, e, attn, layers) + D * e) + 4.0 * batch * layers * L * L * attn
    kv = L * layers * 2 * batch * attn * dtype_bytes
    return Cost(flops, block_params(cfg, k) * dtype_bytes, kv, batch * L * (D + e) * 4)


def denoiser_cost(cfg: ModelConfig, batch: int, frames: int, tokens_per_frame: int, dtype_bytes: int = 4) -> Cost:
    """``denoiser`` on a chunk of ``frames`` frames (keys limited by the frame window mask)."""
    if not cfg.learnable_self_denoiser:
        return ZERO
    e, L = cfg.channels, cfg.txt_size if cfg.conditional_denoiser else 0
    attn = cfg.denoiser_heads * cfg.head_dim
    n = L + frames * tokens_per_frame
    window = cfg.denoiser_window if cfg.denoiser_window is not None else frames
    keys = L + min(frames, window + 1) * tokens_per_frame
    flops = 2.0 * batch * n * (_matmul_params(cfg, e, attn, DENOISER_LAYERS) + 2 * cfg.token_channels * e) \
        + 4.0 * batch * DENOISER_LAYERS * n * keys * attn
    return Cost(flops, denoiser_params(cfg) * dtype_bytes, 0.0, batch * n * (2 * e + 2 * cfg.token_channels) * 4)


def kv_bytes_per_frame(cfg: ModelConfig, tokens_per_frame: int, guidance: bool, dtype_bytes: int = 2) -> int:
    """Top-block KV-cache bytes one latent frame adds (K and V, every layer; fp16 by default)."""
    k = cfg.top_index
    attn = cfg.block_heads(k) * cfg.head_dim
    return tokens_per_frame * cfg.layers[k] * 2 * attn * (2 if guidance else 1) * dtype_bytes


def generation_costs(cfg: ModelConfig, frames: int, tokens_per_frame: int, batch: int = 1, guidance: bool = True,
                     chunk: int = 1, dtype_bytes: int = 4) -> dict[str, Cost]:
    """Cost of one video, split deep / shallow / denoiser, for one sweep per token (AR if chunk=1).

    ``chunk`` tokens per call: chunk=1 is token-by-token decoding (weights streamed once per
    token: the memory-bound case); a Jacobi chunk of S tokens amortises the weights over S
    tokens per sweep (compute-bound for large S). Jacobi sweeps beyond one per token multiply
    these numbers by (sweeps × chunk / tokens).
    """
    F, T, L = tokens_per_frame, frames, cfg.txt_size
    bp = batch * (2 if guidance else 1)
    n = T * F
    deep = prefill_cost(cfg, bp, dtype_bytes)
    calls = -(-n // chunk)
    for i in range(calls):
        s = min(chunk, n - i * chunk)
        deep = deep + step_cost(cfg, cfg.top_index, bp, s, L + i * chunk, dtype_bytes)
    shallow = ZERO
    for k in range(cfg.num_blocks - 1):
        if cfg.layers[k] == 0:
            continue
        seqs = batch * T if cfg.shallow_block_local else batch
        seq_len = F if cfg.shallow_block_local else n
        for i in range(-(-seq_len // chunk)):
            s = min(chunk, seq_len - i * chunk)
            shallow = shallow + step_cost(cfg, k, seqs, s, i * chunk, dtype_bytes)
    window = cfg.local_attn_window or T
    den = denoiser_cost(cfg, batch, min(T, window), F, dtype_bytes)
    return {"deep": deep, "shallow": shallow, "denoiser": den}


def text_encoder_flops(batch: int, tokens: int, linear_params: int, layers: int, heads: int, d_kv: int) -> float:
    """T5 encoder on [batch, tokens]: Linear layers 2 · B · L · weights; attention QKᵀ and AV
    2 · 2 · B · heads · L² · d_kv per layer (norms and the relative-position bias ignored)."""
    return float(2 * batch * tokens * linear_params + 4 * layers * batch * heads * tokens * tokens * d_kv)
