"""The Wan2.2 VAE (diffusers ``AutoencoderKLWan``): its dims and latent statistics, and loading.

Loading (:func:`load_vae`): upstream's ``Wan2.2_VAE.pth`` (Wan's own key layout, renamed here
by :func:`convert_upstream_state_dict`; model dims inferred from the tensors by
:func:`infer_vae_config`) or a diffusers directory (``config.json`` + weights, or a pipeline
directory with a ``vae/`` subfolder). Nothing is downloaded.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from ..checkpoint import load_state_dict, validate_state_dict
from ..errors import CheckpointError, StarflowError

PathLike = Union[str, os.PathLike]

# Per-channel latent statistics of the Wan2.2 VAE (Wan-AI/Wan2.2-TI2V-5B; the same 48 numbers are
# the ``latents_mean`` / ``latents_std`` of diffusers' Wan2.2 VAE config and of upstream's wrapper).
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)

#: ``AutoencoderKLWan`` arguments of the Wan2.2 VAE (TI2V-5B).
WAN22_VAE_CONFIG: dict[str, Any] = dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
    temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
    patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
    latents_mean=list(WAN22_LATENTS_MEAN), latents_std=list(WAN22_LATENTS_STD),
)


def diffusers_wan():
    """diffusers' ``autoencoder_kl_wan`` module (StarflowError naming the extra when diffusers is missing)."""
    try:
        from diffusers.models.autoencoders import autoencoder_kl_wan
    except ImportError as exc:
        raise StarflowError("the Wan2.2 VAE needs diffusers: pip install 'starflow-trt[media]'") from exc
    return autoencoder_kl_wan


# ---------------------------------------------------------------- upstream key layout → diffusers
_RESIDUAL_PARTS = {"residual.0.gamma": "norm1.gamma", "residual.2.weight": "conv1.weight",
                   "residual.2.bias": "conv1.bias", "residual.3.gamma": "norm2.gamma",
                   "residual.6.weight": "conv2.weight", "residual.6.bias": "conv2.bias",
                   "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias"}
_MIDDLE = {"0": "resnets.0", "2": "resnets.1"}
_HEAD = {"0.gamma": "norm_out.gamma", "2.weight": "conv_out.weight", "2.bias": "conv_out.bias"}
_TOP = {"conv1": "quant_conv", "conv2": "post_quant_conv"}
_STAGE = re.compile(r"^(encoder|decoder)\.(downsamples|upsamples)\.(\d+)\.(downsamples|upsamples)\.(\d+)\.(.+)$")


def _residual(rest: str) -> Optional[str]:
    return _RESIDUAL_PARTS.get(rest)


def rename_upstream_key(key: str) -> str:
    """One key of Wan's own VAE module (``Wan2.2_VAE.pth``) → the ``AutoencoderKLWan`` key.

    Wan nests each resolution stage as ``{encoder.downsamples|decoder.upsamples}.i.{…}.j``
    (residual blocks ``residual.{0,2,3,6}`` / ``shortcut``, then one resample);
    diffusers names them ``{down|up}_blocks.i.resnets.j`` (``norm1, conv1, norm2, conv2,
    conv_shortcut``) and ``…downsampler`` / ``…upsampler``. Raises CheckpointError on a key
    that fits neither layout.
    """
    head, _, rest = key.partition(".")
    if head in _TOP:
        return f"{_TOP[head]}.{rest}"
    if head not in ("encoder", "decoder"):
        raise CheckpointError(f"unexpected key {key!r} in a Wan2.2 VAE checkpoint; pass Wan2.2_VAE.pth or a "
                              "diffusers AutoencoderKLWan directory")
    part, _, tail = rest.partition(".")
    if part == "conv1":
        return f"{head}.conv_in.{tail}"
    if part == "head" and tail in _HEAD:
        return f"{head}.{_HEAD[tail]}"
    if part == "middle":
        index, _, leaf = tail.partition(".")
        if index == "1":  # the attention block keeps its leaf names
            return f"{head}.mid_block.attentions.0.{leaf}"
        if index in _MIDDLE and _residual(leaf):
            return f"{head}.mid_block.{_MIDDLE[index]}.{_residual(leaf)}"
    match = _STAGE.match(key)
    if match:
        _, outer, i, _, j, leaf = match.groups()
        blocks = "down_blocks" if outer == "downsamples" else "up_blocks"
        if _residual(leaf):
            return f"{head}.{blocks}.{i}.resnets.{j}.{_residual(leaf)}"
        if leaf.startswith(("resample.", "time_conv.")):
            sampler = "downsampler" if outer == "downsamples" else "upsampler"
            return f"{head}.{blocks}.{i}.{sampler}.{leaf}"
    raise CheckpointError(f"unexpected key {key!r} in a Wan2.2 VAE checkpoint; pass Wan2.2_VAE.pth or a "
                          "diffusers AutoencoderKLWan directory")


def is_upstream_layout(state: Mapping[str, torch.Tensor]) -> bool:
    return "encoder.conv1.weight" in state and "encoder.conv_in.weight" not in state


def convert_upstream_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename every key of an upstream (Wan) VAE state dict to the diffusers layout."""
    out = {rename_upstream_key(k): v for k, v in state.items()}
    if len(out) != len(state):
        raise CheckpointError("two keys of the VAE checkpoint map to the same diffusers key; the file is not a "
                              "Wan2.2 VAE state dict")
    return out


def infer_vae_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``AutoencoderKLWan`` arguments read from the tensors of a diffusers-layout state dict.

    Only the residual (Wan2.2) layout is supported. Latent statistics are Wan2.2's when
    ``z_dim`` is 48 (the dims of Wan2.2), else left to the caller.
    """
    try:
        conv_in = state["encoder.conv_in.weight"]
        base_dim, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
        z_dim = int(state["post_quant_conv.weight"].shape[0])
        conv_out = state["decoder.conv_out.weight"]
    except KeyError as exc:
        raise CheckpointError(f"VAE checkpoint lacks {exc}; pass Wan2.2_VAE.pth or a diffusers "
                              "AutoencoderKLWan directory") from exc
    stages = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.", k))})
    if not stages:
        raise CheckpointError("VAE checkpoint has no residual down blocks: only the Wan2.2 VAE (is_residual) "
                              "is supported, not Wan2.1's")
    dim_mult = [int(state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) // base_dim for i in stages]
    num_res_blocks = len({k.split(".")[4] for k in state if k.startswith("encoder.down_blocks.0.resnets.")})
    temporal = [f"encoder.down_blocks.{i}.downsampler.time_conv.weight" in state for i in stages[:-1]]
    patch = math.isqrt(in_channels // 3) if in_channels > 3 else None
    cfg: dict[str, Any] = dict(
        base_dim=base_dim, decoder_base_dim=int(conv_out.shape[1]) // dim_mult[0], z_dim=z_dim, dim_mult=dim_mult,
        num_res_blocks=num_res_blocks, temperal_downsample=temporal, is_residual=True, in_channels=in_channels,
        out_channels=int(conv_out.shape[0]), patch_size=patch,
        scale_factor_spatial=2 ** (len(dim_mult) - 1) * (patch or 1), scale_factor_temporal=2 ** sum(temporal))
    if z_dim == len(WAN22_LATENTS_MEAN):
        cfg.update(latents_mean=list(WAN22_LATENTS_MEAN), latents_std=list(WAN22_LATENTS_STD))
    return cfg


def _from_state(state: dict[str, torch.Tensor], source: Path):
    wan = diffusers_wan()
    cfg = infer_vae_config(state)
    with torch.device("meta"):
        vae = wan.AutoencoderKLWan(**cfg)
    expected = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    try:
        validate_state_dict(state, expected)
    except CheckpointError as exc:
        raise CheckpointError(f"VAE checkpoint {source} does not match the inferred Wan2.2 VAE: {exc}") from exc
    vae.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return vae.eval().requires_grad_(False)


def load_vae(path: PathLike):
    """``AutoencoderKLWan`` (float32, eval) from upstream's ``.pth`` or a diffusers directory; no download."""
    wan = diffusers_wan()
    p = Path(path)
    if p.is_dir():
        sub = p / "vae" if (p / "vae" / "config.json").is_file() and not (p / "config.json").is_file() else p
        if not (sub / "config.json").is_file():
            raise CheckpointError(f"{p} is not a diffusers VAE directory (no config.json); pass Wan2.2_VAE.pth "
                                  "or the diffusers AutoencoderKLWan directory")
        try:
            vae = wan.AutoencoderKLWan.from_pretrained(str(sub), local_files_only=True,
                                                                 torch_dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load a diffusers AutoencoderKLWan from {sub}: {exc}") from exc
        if not vae.config.is_residual:
            raise CheckpointError(f"{sub} is a Wan2.1 VAE (is_residual false); STARFlow-V uses the Wan2.2 VAE")
        return vae.float().eval().requires_grad_(False)
    state = load_state_dict(p)
    if is_upstream_layout(state):
        state = convert_upstream_state_dict(state)
    return _from_state(state, p)
