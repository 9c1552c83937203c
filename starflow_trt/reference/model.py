"""STARFlow-V model (spec §2, §7, §11, §12): upstream state_dict layout, likelihood, sampling.

Public API (stable; later stages and outside checks call exactly this)::

    z, logdets = model.encode(x, y)          # x [B,T,C,H,W], y [B,L,D]
    nll = model.nll(x, y); bpd = model.bits_per_dim(x, y)      # [B]
    video = model.sample(noise, y, y_uncond=None, guidance=0.0, jacobi=None,
                         context=None, return_sequence=False)  # [B,T,C,H,W]
    eps = model.denoiser(x, y); clean = model.denoise(x, y)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import InputError
from ..sampling import (BlockTrace, ChunkedDenoise, JacobiConfig, SamplerSpec, check_request, check_text,
                        check_video, context_inputs, denoise_plan, denoise_steps, likelihood)
from .denoiser import Denoiser
from .flow import FlowBlock, IdentityBlock, patchify, permute_tokens, unpatchify
from .sampler import invert


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

    @property
    def sampler_spec(self) -> SamplerSpec:
        """What :meth:`sample` accepts (any patch-aligned size and length; the upstream schedule)."""
        cfg = self.cfg
        return SamplerSpec(channels=cfg.channel_size, patch_size=cfg.patch_size, text_length=cfg.txt_size,
                           text_width=cfg.text_width, local_attn_window=cfg.local_attn_window,
                           denoiser_window=cfg.denoiser_window, schedules=("upstream",), default_schedule="upstream")

    def check_video(self, x: torch.Tensor, name: str = "x") -> None:
        """Raise InputError unless x is [B, T, C, H, W] with this model's C and patch-aligned H, W."""
        check_video(x, self.sampler_spec, name)

    def check_text(self, y: torch.Tensor, batch: int, name: str = "y") -> None:
        """Raise InputError unless y is [batch, txt_size, txt_dim] and finite."""
        check_text(y, self.sampler_spec, batch, name)

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
        return likelihood.nll(z, logdets, logdets[0].dtype)

    def bits_per_dim(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[B]: ``(nll + ½·ln 2π) / ln 2``."""
        return likelihood.bits_per_dim(self.nll(x, y))

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
        plan = denoise_plan(T, denoise_steps(steps, self.cfg.local_attn_window, T), self.cfg.denoiser_window)
        raw = x.to(self.dtype)
        out = raw.clone()
        ChunkedDenoise(plan, 0, raw, out, lambda chunk: self.denoiser(chunk, y)).advance(T)
        return out

    # ------------------------------------------------------ noise → data
    def _forward_shallow(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Block k (below the top) forward on h [B, T, h, w, c] → z, same shape."""
        return self.blocks[k](self._shallow_in(h))[0].reshape(h.shape)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, y: torch.Tensor, y_uncond: Optional[torch.Tensor] = None,
               guidance: float = 0.0, jacobi: Optional[JacobiConfig] = None,
               context: Optional[torch.Tensor] = None, return_sequence: bool = False,
               attn_temp: float = 1.0):
        """Invert the flow: noise [B,T,C,H,W] → latents [B,T,C,H,W] (spec §9-§11).

        y, y_uncond [B, L, D]; guidance > 0 needs y_uncond (batch ``[y ; y_uncond]`` in the
        top block). jacobi None → autoregressive (``attn_temp`` applies), else the upstream
        schedule. context [B, N, C, H, W] (noisy latents, N < T): image-to-video (N=1) /
        video-to-video (N>1); the first N output frames reconstruct it.
        return_sequence → [noise, after top, after block nb−2, …, after block 0].
        ``last_trace``: one :class:`BlockTrace` per inverted block, top first.
        """
        cfg = self.cfg
        req = check_request(self.sampler_spec, y, noise, y_uncond=y_uncond, guidance=guidance, jacobi=jacobi,
                            context=context)
        w, p = req.guidance, cfg.patch_size
        y_all = req.text().to(self.dtype)
        noise = noise.to(self.dtype)
        ctx_inputs, prefix, n_ctx = None, None, req.n_ctx
        if context is not None:
            noise = noise.clone()
            noise[:, :n_ctx] = context.to(self.dtype)
            ctx_inputs = context_inputs(patchify(context.to(self.dtype), p), self._forward_shallow, cfg.top_index)
            top_in = ctx_inputs[-1]
            prefix = permute_tokens(torch.cat([top_in, top_in]) if w > 0 else top_in, self.top.permutation)
        temperature = attn_temp if jacobi is None else 1.0   # Jacobi ignores it (spec §9.3 note)
        solver = req.solver
        seq = [noise]
        trace = BlockTrace(cfg.top_index)
        self.last_trace = [trace]
        h = invert(self.top, patchify(noise, p), y_all, w, solver, req.frames, trace, prefix, temperature)
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
            self.last_trace.append(trace)
            hout = invert(block, self._shallow_in(h[:, skip:]), None, 0.0, solver.unwindowed(),
                          1 if local else req.frames, trace, temperature=temperature)
            h = h.clone()
            h[:, skip:] = hout.reshape(h[:, skip:].shape)
            if skip:
                h[:, :skip] = ctx_inputs[block.index]
            seq.append(unpatchify(h, p))
        return seq if return_sequence else seq[-1]
