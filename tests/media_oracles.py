"""Test oracles of the VAE graphs: diffusers' own whole-clip decode / encode, run eagerly."""

from __future__ import annotations

import torch

from starflow_trt.media.vae_graphs import unpatchify


@torch.no_grad()
def decode_whole(vae, latents: torch.Tensor) -> torch.Tensor:
    """diffusers' own whole-clip loop, without its clamp. [B, T, z, h, w] → [B, 1+4(T-1), 3, H, W]."""
    vae.clear_cache()
    x = vae.post_quant_conv(latents.permute(0, 2, 1, 3, 4))
    outs = []
    for i in range(x.shape[2]):
        vae._conv_idx = [0]
        outs.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                first_chunk=i == 0))
    vae.clear_cache()
    return unpatchify(vae, torch.cat(outs, dim=2)).permute(0, 2, 1, 3, 4)


@torch.no_grad()
def encode_whole(vae, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' ``encode`` → mean, logvar [B, T, z, h, w] (its logvar is clamped to [-30, 20])."""
    dist = vae.encode(frames.permute(0, 2, 1, 3, 4)).latent_dist
    return dist.mean.permute(0, 2, 1, 3, 4), dist.logvar.permute(0, 2, 1, 3, 4)
