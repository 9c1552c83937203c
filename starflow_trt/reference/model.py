"""STARFlow-V model (spec §2, §7, §11, §12): upstream state_dict layout, likelihood, sampling.

Public API (stable; later stages and outside checks call exactly this)::

    z, logdets = model.encode(x, y)          # x [B,T,C,H,W], y [B,L,D]
    nll = model.nll(x, y); bpd = model.bits_per_dim(x, y)      # [B]
    video = model.sample(noise, y, y_uncond=None, guidance=0.0, jacobi=None,
                         context=None, return_sequence=False)  # [B,T,C,H,W]
    eps = model.denoiser(x, y); clean = model.denoise(x, y)
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..config import DENOISE_CONSTANT, ModelConfig
from ..errors import InputError
from .cache import KVCache
from .denoiser import Denoiser
from .flow import FlowBlock, IdentityBlock, patchify, unpatchify
from .sampler import BlockTrace, JacobiConfig, reverse_ar, reverse_jacobi


class RopeBuffers(nn.Module):
    """Holder of the deprecated ``feat_rope.freqs_cos/sin`` buffers (never read)."""

    def __init__(self, rows: int, head_dim: int, with_buffers: bool):
        super().__init__()
        if with_buffers:
            self.register_buffer("freqs_cos", torch.zeros(rows, 2 * (head_dim // 2)))
            self.register_buffer("freqs_sin", torch.zeros(rows, 2 * (head_dim // 2)))


def deprecated_buffer_values(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Default values of the deprecated buffers (spec §2.2), for checkpoints that lack them."""
    P, L, c, hd = cfg.rope_seq_len, cfg.txt_size, cfg.token_channels, cfg.head_dim
    out = {"var": torch.ones(P * P, c)}
    for k in range(cfg.num_blocks):
        if k == cfg.top_index or cfg.layers[k] > 0:
            out[f"blocks.{k}.attn_mask"] = torch.ones(P * P + L, P * P + L).tril()
    if cfg.rope:
        rows = L + P * P if L else P * P
        out["feat_rope.freqs_cos"] = torch.zeros(rows, 2 * (hd // 2))
        out["feat_rope.freqs_sin"] = torch.zeros(rows, 2 * (hd // 2))
    return out


class StarflowV(nn.Module):
    """The whole model: ``blocks.0 … blocks.{nb-1}`` (top last) + learnable denoiser."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        if cfg.text_width is None and cfg.txt_size > 0:
            raise InputError("config has no txt_dim and names no known text encoder; pass txt_dim "
                             "or load through load_reference (infers it from the checkpoint)")
        self.cfg = cfg
        P = cfg.rope_seq_len
        self.register_buffer("var", torch.ones(P * P, cfg.token_channels))
        self.blocks = nn.ModuleList(
            FlowBlock(cfg, k) if (k == cfg.top_index or cfg.layers[k] > 0) else IdentityBlock(k)
            for k in range(cfg.num_blocks))
        if cfg.learnable_self_denoiser:
            self.learnable_self_denoiser = Denoiser(cfg)
        if cfg.rope:
            rows = cfg.txt_size + P * P if cfg.txt_size else P * P
            self.feat_rope = RopeBuffers(rows, cfg.head_dim, True)
            self.feat_rope_gen = RopeBuffers(rows, cfg.head_dim, False)
        self.last_trace: list[BlockTrace] = []

    # ------------------------------------------------------------ helpers
    @property
    def top(self) -> FlowBlock:
        return self.blocks[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.top.proj_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.top.proj_in.weight.device

    def check_video(self, x: torch.Tensor, name: str = "x") -> None:
        """Raise InputError unless x is [B, T, C, H, W] with this model's C and patch-aligned H, W."""
        cfg = self.cfg
        if not isinstance(x, torch.Tensor) or x.dim() != 5:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"{name} must be a [B, T, C, H, W] tensor, got {shape}")
        if x.shape[2] != cfg.channel_size:
            raise InputError(f"{name} has {x.shape[2]} channels, the model expects C={cfg.channel_size} "
                             f"(shape {tuple(x.shape)} must be [B, T, C, H, W])")
        p = cfg.patch_size
        if x.shape[3] % p or x.shape[4] % p or x.shape[1] < 1:
            raise InputError(f"{name} spatial size {tuple(x.shape[3:])} must be a multiple of patch_size {p}")
        if not torch.isfinite(x).all():
            raise InputError(f"{name} contains NaN or Inf")

    def check_text(self, y: torch.Tensor, batch: int, name: str = "y") -> None:
        """Raise InputError unless y is [batch, txt_size, txt_dim] and finite."""
        cfg = self.cfg
        want = (batch, cfg.txt_size, cfg.text_width)
        if not isinstance(y, torch.Tensor) or y.dim() != 3 or tuple(y.shape) != want:
            shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
            raise InputError(f"{name} must be text embeddings [B, L, D] = {list(want)}, got {shape}")
        if not torch.isfinite(y).all():
            raise InputError(f"{name} contains NaN or Inf")

    def _shallow_in(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, h, w, c] → [B·T, 1, h, w, c] when shallow blocks are frame-local."""
        if self.cfg.shallow_block_local:
            return x.reshape(-1, 1, *x.shape[2:])
        return x

    # ------------------------------------------------------ data → noise
    def encode(self, x: torch.Tensor, y: torch.Tensor, return_outputs: bool = False):
        """x [B,T,C,H,W], y [B,L,D] → (z [B,T,C,H,W], logdets) (+ outputs if asked).

        logdets[k]: shallow blocks [B, T, F, c], top block [B, T·F, c] (slot order).
        outputs: the nb+1 channels-last sequences [B, T, h, w, c] entering each block and the last.
        """
        self.check_video(x)
        self.check_text(y, x.shape[0])
        x, y = x.to(self.dtype), y.to(self.dtype)
        h = patchify(x, self.cfg.patch_size)
        outputs, logdets = [h], []
        b, t = h.shape[:2]
        for block in self.blocks[:-1]:
            z, logdet, _, _ = block(self._shallow_in(h))
            h = z.reshape(h.shape)
            outputs.append(h)
            logdets.append(logdet.reshape(b, t, -1, logdet.shape[-1]))
        h, logdet, _, _ = self.top(h, y)
        outputs.append(h)
        logdets.append(logdet)
        z = unpatchify(h, self.cfg.patch_size)
        return (z, logdets, outputs) if return_outputs else (z, logdets)

    def nll(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[B]: ``0.5·mean(z²) − Σ_k mean(logdet_k)`` per sample, nats/dim without the Gaussian constant."""
        z, logdets = self.encode(x, y)
        loss_z = 0.5 * z.to(logdets[0].dtype).pow(2).flatten(1).mean(1)
        loss_logdet = -sum(ld.flatten(1).mean(1) for ld in logdets)
        return loss_z + loss_logdet

    def bits_per_dim(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[B]: ``(nll + ½·ln 2π) / ln 2``."""
        return (self.nll(x, y) + 0.5 * math.log(2 * math.pi)) / math.log(2)

    # ---------------------------------------------------------- denoiser
    def denoiser(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Raw learnable-denoiser output d [B,T,C,H,W] for latents x and cond text y."""
        if not hasattr(self, "learnable_self_denoiser"):
            raise InputError("this checkpoint has no learnable denoiser (learnable_self_denoiser: 0)")
        self.check_video(x)
        self.check_text(y, x.shape[0])
        p = self.cfg.patch_size
        d = self.learnable_self_denoiser(patchify(x.to(self.dtype), p), y.to(self.dtype))
        return unpatchify(d, p)

    def denoise(self, x: torch.Tensor, y: torch.Tensor, steps: Optional[int] = None) -> torch.Tensor:
        """Sample-time denoising ``x − 0.3·d`` chunked over frames (spec §12.3-12.4).

        steps: frames per chunk (None: ``local_attn_window`` or T). Later chunks overlap
        the previous by ``denoiser_window`` frames and see already-denoised frames;
        chunks that would write nothing are not evaluated (no numeric effect).
        """
        self.check_video(x)
        T = x.shape[1]
        steps = steps or self.cfg.local_attn_window or T
        out = x.to(self.dtype).clone()
        s, overlap = 0, 0
        while s < T:
            chunk = out[:, s : s + steps]
            clean = chunk - self.denoiser(chunk, y) * DENOISE_CONSTANT
            out[:, s + overlap : s + steps] = clean[:, overlap:]
            if s + steps >= T:
                break
            overlap = self.cfg.denoiser_window if self.cfg.denoiser_window is not None else steps - 1
            if steps - overlap <= 0:
                raise InputError(f"denoising chunks of {steps} frames with overlap {overlap} cannot advance; "
                                 "use a local_attn_window larger than denoiser_window")
            s += steps - overlap
        return out

    # ------------------------------------------------------ noise → data
    def prefill_context(self, context: torch.Tensor, y_all: torch.Tensor, total_frames: int,
                        window: Optional[int] = None) -> tuple[KVCache, list[torch.Tensor]]:
        """Top-block cache holding ``[text ; context tokens]`` and its prefix (spec §11).

        context [B, N, C, H, W] (noisy latents); y_all [B or 2B, L, D] (2B: guidance on).
        The cache is allocated once for the whole video of ``total_frames`` frames.
        Also returns the context's input to every block, channels-last [B, N, h, w, c]
        (index k = input of block k, the last = the top block's input).
        """
        p = self.cfg.patch_size
        h = patchify(context.to(self.dtype), p)
        inputs = [h]
        for block in self.blocks[:-1]:
            z, _, _, _ = block(self._shallow_in(h))
            h = z.reshape(h.shape)
            inputs.append(h)
        if y_all.shape[0] == 2 * h.shape[0]:
            h = torch.cat([h, h])
        fs = h.shape[2] * h.shape[3]
        text_len = y_all.shape[1]
        cap = (window * fs if window else total_frames * fs) + text_len
        top = self.top
        cache = KVCache(top.num_layers, h.shape[0], top.heads, cap, top.head_dim, self.dtype, self.device)
        _, _, prefix, kv = top(h, y_all)
        cache.append(kv)
        cache.prefix = prefix
        return cache, inputs

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, y: torch.Tensor, y_uncond: Optional[torch.Tensor] = None,
               guidance: float = 0.0, jacobi: Optional[JacobiConfig] = None,
               context: Optional[torch.Tensor] = None, return_sequence: bool = False,
               attn_temp: float = 1.0):
        """Invert the flow: noise [B,T,C,H,W] → latents [B,T,C,H,W] (spec §9-§11).

        y, y_uncond [B, L, D]; guidance > 0 needs y_uncond (batch ``[y ; y_uncond]`` in the
        top block). jacobi None → autoregressive. context [B, N, C, H, W] (noisy latents,
        N < T): image-to-video (N=1) / video-to-video (N>1); the first N output frames
        reconstruct it. return_sequence → [noise, after top, after block nb−2, …, after block 0].
        """
        cfg = self.cfg
        self.check_video(noise, "noise")
        batch, frames = noise.shape[:2]
        self.check_text(y, batch, "y")
        w = float(guidance)
        if w < 0:
            raise InputError(f"guidance must be >= 0, got {guidance}")
        if w > 0:
            if y_uncond is None:
                raise InputError("guidance > 0 needs y_uncond (the empty-prompt embeddings) [B, L, D]")
            self.check_text(y_uncond, batch, "y_uncond")
            y_all = torch.cat([y, y_uncond]).to(self.dtype)
        else:
            y_all = y.to(self.dtype)
        window = (jacobi.window if jacobi is not None and jacobi.window else cfg.local_attn_window)
        if window is not None and frames <= window:
            window = None  # the whole video fits: identical to the non-window path (§10.4)
        if window is not None and jacobi is None:
            raise InputError(f"{frames} frames exceed the attention window of {window} frames; "
                             "autoregressive sampling has no window: use Jacobi sampling or fewer frames")
        context_length = None
        if window is not None:
            context_length = jacobi.context_length if jacobi.context_length is not None else window - 1
        noise = noise.to(self.dtype)
        cache, ctx_inputs, n_ctx = None, None, 0
        if context is not None:
            self.check_video(context, "context")
            if context.shape[0] != batch or context.shape[2:] != noise.shape[2:] or context.shape[1] >= frames:
                raise InputError(f"context must be [B, N, C, H, W] with N < T={frames} and the noise's "
                                 f"B, C, H, W {tuple(noise.shape)}, got {tuple(context.shape)}")
            noise = noise.clone()
            noise[:, : context.shape[1]] = context.to(self.dtype)
            cache, ctx_inputs = self.prefill_context(context, y_all, frames, window)
            n_ctx = context.shape[1]
        p = cfg.patch_size
        seq = [noise]
        self.last_trace = []
        h = patchify(noise, p)
        trace = BlockTrace(cfg.top_index)
        if jacobi is None:
            h = reverse_ar(self.top, h, y_all, w, cache, attn_temp, trace)
        else:
            h = reverse_jacobi(self.top, h, y_all, w, jacobi, cache, window, context_length, frames, trace)
        self.last_trace.append(trace)
        seq.append(unpatchify(h, p))
        local = bool(cfg.shallow_block_local)
        # With frame-local shallow blocks, the context frames' inverse is known exactly: it
        # is the context's own forward intermediate (upstream re-inverts it and gets it back
        # up to float32 round-trip error). Only the generated frames are inverted.
        skip = n_ctx if local else 0
        for block in reversed(self.blocks[:-1]):
            if isinstance(block, IdentityBlock):
                seq.append(seq[-1])
                continue
            trace = BlockTrace(block.index)
            hin = self._shallow_in(h[:, skip:])
            if jacobi is None:
                hout = reverse_ar(block, hin, None, 0.0, None, attn_temp, trace)
            else:
                hout = reverse_jacobi(block, hin, None, 0.0, jacobi, None, None, None,
                                      1 if local else frames, trace)
            self.last_trace.append(trace)
            h = h.clone()
            h[:, skip:] = hout.reshape(h[:, skip:].shape)
            if skip:
                h[:, :skip] = ctx_inputs[block.index]
            seq.append(unpatchify(h, p))
        return seq if return_sequence else seq[-1]
