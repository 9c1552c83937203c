"""Analytic cost model: parameters, FLOPs and bytes of every graph call, from the config alone.

Used by ``starflow-trt inspect`` and by the benchmarks (roofline, GPU projections).
Counts multiply-adds as 2 FLOPs; attention counts QKᵀ and AV over all keys a
query can see (the causal half inside a chunk is ignored: upper bound).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .config import ModelConfig
from .geometry import Geometry
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


# ---------------------------------------------------------------------------------------------- memory
#: allocator headroom on the buffers of a graph call: ORT's CPU arena grows in powers of two
#: (``arena_extend_strategy`` 0 = kNextPowerOfTwo, the default: onnxruntime_c_api.h, CreateArenaCfgV2; "might
#: allocate more memory than needed", microsoft/onnxruntime#11627), so a working set may hold up to twice its bytes
ALLOCATOR_HEADROOM = 2.0
#: transformer layers whose tensors are live at once in a graph call: the running one and the one before it
#: (ORT frees a layer's intermediates as their last reader ends; the residual stream spans two layers)
LIVE_LAYERS = 2
#: copies of the whole video a call keeps per row: noise, deep / shallow / denoised outputs, the returned
#: latents and raw latents, the frames handed out (float32 tokens)
VIDEO_COPIES = 8
#: copies per deep row (two per video row with guidance): its noise sequence, the inversion's work
#: tensor and the Jacobi affine memory (scale, shift)
DEEP_ROW_COPIES = 4
#: decoded uint8 frames kept per row: the decoder's chunks, the returned video and the server's mp4 clip
PIXEL_COPIES = 3


@dataclass(frozen=True)
class CallMemory:
    """What the working memory of one generate call depends on, read from an export (plain ints: it travels to
    the server's ingress inside the model summary). Token counts are the export's largest grid's."""

    text_length: int
    tokens_per_frame: int
    token_channels: int
    head_dim: int
    max_frames: int
    frame_local: bool
    deep: tuple[int, int, int]       # (layers, heads, width) of the top block
    shallow: tuple[int, int, int]    # the largest (layers, heads, width) of the other blocks; (0, 0, 0): none
    denoiser: tuple[int, int, int]   # (layers, heads, width); (0, 0, 0): none
    kv_bytes: int                    # bytes of one cached K or V element (the graphs' dtype)
    pixel_frame_bytes: int = 0       # one decoded RGB uint8 frame; 0: latents only
    frame_scale: int = 1             # pixel frames per latent frame after the first (the VAE's temporal factor)

    @classmethod
    def of(cls, cfg: ModelConfig, geo: Geometry, kv_bytes: int, pixel_frame_bytes: int = 0, frame_scale: int = 1
           ) -> "CallMemory":
        """From an export's config and :class:`~starflow_trt.geometry.Geometry`."""
        top = geo.top
        shallow = [geo.blocks[k] for k in geo.shallow_blocks]
        den = (DENOISER_LAYERS, cfg.denoiser_heads, cfg.channels) if geo.has_denoiser else (0, 0, 0)
        return cls(text_length=geo.text_length, tokens_per_frame=geo.max_tokens_per_frame,
                   token_channels=geo.token_channels, head_dim=geo.head_dim, max_frames=geo.max_frames,
                   frame_local=geo.frame_local, deep=(top.layers, top.heads, top.width),
                   shallow=tuple(max((b.layers, b.heads, b.width)[i] for b in shallow) for i in range(3))
                   if shallow else (0, 0, 0), denoiser=den, kv_bytes=kv_bytes,
                   pixel_frame_bytes=pixel_frame_bytes, frame_scale=frame_scale)

    def call_bytes(self, batch: int, frames: int, window: Optional[int], guidance: bool, chunk: int,
                   context_frames: int = 0, denoise: bool = True, decoded: bool = False) -> int:
        """Estimated peak bytes one call of ``batch`` rows and ``frames`` latent frames adds to a warm replica.

        ``window``: the long-video attention window (None: the whole video); ``chunk``: the most tokens
        one Jacobi sweep evaluates (1: autoregressive). The working set (KV caches, step scratch, the
        largest graph call's live tensors) is sized by the window, times :data:`ALLOCATOR_HEADROOM`;
        the video itself (latents, decoded frames) grows with ``frames``.
        """
        F, c, L, hd = self.tokens_per_frame, self.token_channels, self.text_length, self.head_dim
        rows = batch * (2 if guidance else 1)
        held = min(frames, window) if window else frames                     # frames in the deep cache
        # tokens of one deep call: a sweep, the given context's prefill, or a window's context re-encoding
        deep_s = max(min(chunk, held * F), context_frames * F, (held - 1) * F if window else 0)
        slots = L + max(held, context_frames) * F
        group = min(frames, self.max_frames) if self.frame_local else frames  # shallow frames per batch
        seqs, s_len = (batch * group, F) if self.frame_local else (batch, frames * F)
        layers, heads, width = self.deep
        work = layers * 2 * heads * hd * self.kv_bytes * rows * slots          # deep KV
        work += 2 * 4 * c * max(rows * deep_s, seqs * s_len)                  # scale / shift scratch
        acts = [min(layers, LIVE_LAYERS) * _layer_live(rows, deep_s, slots, heads, hd, width)]
        if self.shallow[0]:
            sl, sh, sw = self.shallow
            work += sl * 2 * sh * hd * self.kv_bytes * seqs * s_len
            acts.append(min(sl, LIVE_LAYERS) * _layer_live(seqs, min(chunk, s_len), s_len, sh, hd, sw))
        if denoise and self.denoiser[0]:
            dl, dh, dw = self.denoiser
            n = L + min(frames, window or frames) * F
            acts.append(min(dl, LIVE_LAYERS) * _layer_live(batch, n, n, dh, hd, dw))
        video = 4 * F * c * frames * (VIDEO_COPIES * batch + DEEP_ROW_COPIES * rows)
        if decoded:
            video += PIXEL_COPIES * batch * (1 + self.frame_scale * (frames - 1)) * self.pixel_frame_bytes
        return int(ALLOCATOR_HEADROOM * (work + max(acts)) + video)


def _layer_live(rows: int, s: int, p: int, heads: int, hd: int, width: int) -> int:
    """Float32 bytes live in one transformer layer of a call: ``s`` query tokens over ``p`` keys per row
    (hidden state, q / k / v, the keys and values with their past, scores and softmax, the 4x MLP)."""
    return 4 * rows * (s * (6 * width + 3 * heads * hd) + 2 * heads * hd * p + 2 * heads * s * p)
