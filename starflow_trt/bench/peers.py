"""Peers in the benchmark: the upstream sampler from a user's checkout, the reference under ``torch.compile``.

Nothing of apple/ml-starflow is vendored or downloaded. :func:`load_upstream` imports
``transformer_flow`` from the checkout the user names (``bench --upstream PATH``) and drives it
through the narrow interface the spec documents, nothing more:

* ``transformer_flow.Model(**kwargs)`` with the constructor parameters of spec §1.2
  (:func:`upstream_kwargs`), then ``load_state_dict(state, strict=False)`` (upstream loads
  non-strictly, §2.2) of the same checkpoint the other rows use;
* ``model(noise, y, reverse=True, guidance=w, jacobi=True, jacobi_block_size=k,
  jacobi_max_iter=n, jacobi_th=t)`` (§7.1) with ``noise`` [B, T, C, H, W] and ``y`` the
  ``[cond ; uncond]`` text batch [2B, L, D] (§9.1), returning latents shaped like ``noise``.

Upstream's Jacobi loop all-reduces a "done" flag after every sweep (its ``sample.py`` always runs
under ``torchrun``), so :meth:`UpstreamSampler.sample` opens a one-process gloo group on an
in-process store when none is open. Run against apple/ml-starflow at e565a46 (2026-12-07) and
against the tests' fake checkout.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..config import ModelConfig
from ..errors import StarflowError

EXPECTED = ("a checkout of apple/ml-starflow whose top folder holds transformer_flow.py (or a transformer_flow "
            "package) defining Model")


def upstream_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """The upstream ``Model`` constructor arguments of ``cfg`` (spec §1.2 mapping)."""
    return {"in_channels": cfg.channel_size, "img_size": cfg.latent_img_size, "patch_size": cfg.patch_size,
            "channels": cfg.channels, "top_block_channels": cfg.top_block_channels, "num_blocks": cfg.num_blocks,
            "layers_per_block": list(cfg.layers), "rope": cfg.rope, "pt_seq_len": cfg.pt_seq_len,
            "head_dim": cfg.head_dim, "num_heads": cfg.num_heads, "num_kv_heads": cfg.num_kv_heads,
            "use_swiglu": cfg.use_swiglu, "use_qk_norm": cfg.use_qk_norm, "use_post_norm": cfg.use_post_norm,
            "use_bias": cfg.use_bias, "norm_type": cfg.norm_type, "txt_size": cfg.txt_size, "txt_dim": cfg.text_width,
            "sos": cfg.sos, "cond_top_only": cfg.cond_top_only, "use_softplus": cfg.use_softplus,
            "use_final_norm": cfg.use_final_norm, "soft_clip": cfg.soft_clip, "seq_order": cfg.seq_order,
            "learnable_self_denoiser": cfg.learnable_self_denoiser, "conditional_denoiser": cfg.conditional_denoiser,
            "temporal_causal": cfg.temporal_causal, "shallow_block_local": cfg.shallow_block_local,
            "denoiser_window": cfg.denoiser_window, "local_attn_window": cfg.local_attn_window}


def _import_transformer_flow(checkout: Path):
    """``transformer_flow`` imported from ``checkout`` (put first on sys.path; a module of that name
    imported from elsewhere is dropped first, so the row runs the checkout it names)."""
    if not checkout.is_dir():
        raise StarflowError(f"--upstream {checkout}: no such directory; expected {EXPECTED}")
    if not ((checkout / "transformer_flow.py").is_file() or (checkout / "transformer_flow" / "__init__.py").is_file()):
        raise StarflowError(f"--upstream {checkout}: no transformer_flow module there; expected {EXPECTED}")
    root = str(checkout.resolve())
    if root not in sys.path:
        sys.path.insert(0, root)
    loaded = sys.modules.get("transformer_flow")
    if loaded is not None and not str(getattr(loaded, "__file__", "")).startswith(root):
        del sys.modules["transformer_flow"]
    try:
        module = importlib.import_module("transformer_flow")
    except Exception as e:   # a missing dependency of the checkout, a syntax error, ...
        raise StarflowError(f"--upstream {checkout}: importing transformer_flow failed "
                            f"({type(e).__name__}: {e}); install the checkout's requirements") from e
    if not isinstance(getattr(module, "Model", None), type):
        raise StarflowError(f"--upstream {checkout}: transformer_flow has no Model class; expected {EXPECTED}")
    return module


def _one_process_group() -> None:
    """A one-process gloo group (in-process store, no socket) unless the caller already opened one."""
    import torch.distributed as dist

    if dist.is_available() and not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


class UpstreamSampler:
    """The upstream ``Model`` of a checkout with the bench checkpoint loaded (eval mode, float32, CPU)."""

    def __init__(self, model: torch.nn.Module, checkout: Path):
        self.model, self.checkout = model, checkout

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, y: torch.Tensor, y_uncond: Optional[torch.Tensor], guidance: float,
               block: int, threshold: float, max_iter: int = 32) -> torch.Tensor:
        """noise [B, T, C, H, W], y / y_uncond [B, L, D] → latents [B, T, C, H, W] (upstream Jacobi)."""
        text = torch.cat([y, y_uncond]) if guidance > 0 else y
        _one_process_group()
        try:
            out = self.model(noise, text, reverse=True, guidance=guidance, jacobi=True, jacobi_block_size=block,
                             jacobi_max_iter=max_iter, jacobi_th=threshold)
        except TypeError as e:
            raise StarflowError(f"--upstream {self.checkout}: Model(x, y, reverse=True, guidance=..., jacobi=True, "
                                f"jacobi_block_size=..., jacobi_max_iter=..., jacobi_th=...) failed ({e}); "
                                "this adapter expects the call of spec §7.1") from e
        if isinstance(out, (list, tuple)):
            out = out[-1]
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(noise.shape):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise StarflowError(f"--upstream {self.checkout}: reverse sampling returned {got}, expected latents "
                                f"shaped like the noise {tuple(noise.shape)}")
        return out


def load_upstream(checkout: Union[str, Path], cfg: ModelConfig, checkpoint: Union[str, Path]) -> UpstreamSampler:
    """Build the checkout's ``transformer_flow.Model`` for ``cfg`` and load ``checkpoint`` into it."""
    from ..checkpoint import load_checkpoint
    from ..reference import parameter_shapes

    checkout = Path(checkout)
    module = _import_transformer_flow(checkout)
    try:
        model = module.Model(**upstream_kwargs(cfg))
    except TypeError as e:
        raise StarflowError(f"--upstream {checkout}: transformer_flow.Model rejected the spec §1.2 constructor "
                            f"arguments ({e}); expected {EXPECTED}") from e
    state, _ = load_checkpoint(checkpoint, parameter_shapes(cfg))
    result = model.load_state_dict(state, strict=False)
    unexpected = list(getattr(result, "unexpected_keys", []))
    if unexpected:
        raise StarflowError(f"--upstream {checkout}: {len(unexpected)} checkpoint keys fit no parameter of its Model "
                            f"(first: {unexpected[0]}); the checkout does not match this model family")
    return UpstreamSampler(model.float().eval(), checkout)


def compile_reference(ref: torch.nn.Module) -> torch.nn.Module:
    """``ref`` with every flow block's network step under ``torch.compile`` (inductor, dynamic shapes).

    The sampling loops stay eager Python (they are data dependent); the per-call network, where the
    FLOPs are, is what a user would compile. Compilation happens lazily on the first calls.
    """
    for block in ref.blocks:
        block.step = torch.compile(block.step, dynamic=True)
        block.prefill_text = torch.compile(block.prefill_text, dynamic=True)
    return ref
