"""Graph contracts of the media stages: wrapper, example inputs, tensor names, symbolic shapes.

One :class:`MediaGraph` per ONNX graph, ready for the graph registry / manifest:

* ``text_encoder``: input_ids, attention_mask [batch, tokens] int64 → text [batch, tokens, D]
  (the T5 encoder, or the bundled toy's word table: :func:`toy_text_graph`).
* ``vae_decode_first``: latents [batch, 1, z, h, w] → frames [batch, 1, 3, H, W], new_cache_i.
* ``vae_decode_step``: latents [batch, k, z, h, w], cache_i → frames [batch, 4k, 3, H, W], new_cache_i.
* ``vae_encode``: frames [batch, 1, 3, H, W] → latent_mean, latent_logvar [batch, 1, z, h, w] (images;
  not ``mean``: the exporter also names an internal value ``mean`` and ORT rejects the duplicate).
* ``vae_encode_first`` / ``vae_encode_step``: the chunked video encoder (1 frame, then 4k
  frames per step) with explicit caches.

``H = s·h`` with ``s`` the VAE's spatial factor (16). Cache ``i`` is
``[batch, C_i, T_i, h·r_i, w·r_i]`` (:class:`~starflow_trt.media.vae_graphs.CachePlan`; dims named
``h``, ``h_x2``, … so each is one optimisation-profile axis). ``k`` (latent frames per step)
is **static** in a step graph: diffusers' cache update branches on whether a chunk has one
frame or more, and an exporter given a symbolic ``k`` silently keeps one branch. Export one
step graph per chunk size (1 for streaming). Latents here are raw VAE latents: the
per-channel normalisation and the temporal scale stay outside the graphs, in float32
(:class:`~starflow_trt.media.latents.LatentNorm`).
The graph kinds (:mod:`starflow_trt.export.media_kinds`) plan and export these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..export.manifest import TensorInfo
from .text import T5TextEncoder
from .vae_graphs import (CachePlan, VaeDecodeFirst, VaeDecodeStep, VaeEncode, VaeEncodeFirst, VaeEncodeStep,
                         probe_cache_plan)


@dataclass
class MediaGraph:
    """One exportable graph: ``module(*example)`` with named, partly symbolic inputs/outputs."""

    name: str
    module: nn.Module
    example: tuple[torch.Tensor, ...]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    extra: dict[str, Any] = field(default_factory=dict)


def text_encoder_graph(encoder: T5TextEncoder, batch: int = 2) -> MediaGraph:
    """``text_encoder`` with example inputs of ``batch`` ≥ 2 rows (1 would bake the batch dim)."""
    if batch < 2:
        raise ValueError("export the text encoder with batch >= 2, or the batch dim is fixed to 1")
    ids, mask = encoder.tokenize(encoder.template.captions(["an example prompt"] * ((batch + 1) // 2))[:batch])
    shape = ("batch", "tokens")
    return MediaGraph(
        "text_encoder", encoder.graph(), (ids, mask),
        [TensorInfo("input_ids", "int64", shape), TensorInfo("attention_mask", "int64", shape)],
        [TensorInfo("text", "float32", (*shape, encoder.dim))],
        {"d_model": encoder.dim, "template": encoder.template.to_dict()})


class ToyTextGraph(nn.Module):
    """The toy's word table as a ``text_encoder`` graph: ``table[input_ids] * attention_mask`` [B, L, D]."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table.float().clone(), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.table[input_ids] * attention_mask.unsqueeze(-1).to(self.table.dtype)


def toy_text_graph(encoder, noise_std: float) -> MediaGraph:
    """The bundled toy's ``text_encoder`` (a :class:`~starflow_trt.toy.text.ToyTextEncoder`): the T5 graph's
    contract, a word tokenizer, no caption template; ``noise_std``: the flow config's (recorded in the template)."""
    shape = ("batch", "tokens")
    ids = torch.zeros(2, encoder.length, dtype=torch.int64)
    return MediaGraph(
        "text_encoder", ToyTextGraph(encoder.table), (ids, torch.ones_like(ids)),
        [TensorInfo("input_ids", "int64", shape), TensorInfo("attention_mask", "int64", shape)],
        [TensorInfo("text", "float32", (*shape, encoder.dim))],
        {"d_model": encoder.dim, "tokenizer": "words", "vocab": list(encoder.vocab),
         "template": {"fps_cond": False, "cond_noise_level": False, "noise_std": float(noise_std),
                      "mix_aspect": False, "txt_size": encoder.length}})


def _caches(plan: CachePlan, names: list[str]) -> list[TensorInfo]:
    return [TensorInfo(n, "float32", e.symbolic()) for n, e in zip(names, plan.entries)]


def vae_graphs(vae, height: int = 2, width: int = 3, batch: int = 2,
               frames_per_step: int = 1) -> dict[str, MediaGraph]:
    """The five VAE graphs for an ``AutoencoderKLWan``; example latent frame ``height × width`` (≥ 2 each;
    the graphs' dims ``h`` / ``w``).

    ``frames_per_step`` is the static latent-frame count ``k`` of the step graphs.
    """
    if min(height, width, batch) < 2:
        raise ValueError("example batch, height and width must be >= 2 (a size-1 axis is specialised)")
    z, s = vae.config.z_dim, vae.config.scale_factor_spatial
    k = int(frames_per_step)
    dec_plan, enc_plan = probe_cache_plan(vae, "decoder"), probe_cache_plan(vae, "encoder")
    lat = ("batch", 1, z, "h", "w")
    pix = ("batch", 1, 3, "H", "W")
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 1 + k, z, height, width, generator=g)
    frames = torch.rand(batch, 1 + 4 * k, 3, height * s, width * s, generator=g) * 2 - 1
    dec_caches = dec_plan.zeros(batch, height, width)
    enc_caches = enc_plan.zeros(batch, height, width)
    extra = {"spatial_factor": s, "temporal_factor": vae.config.scale_factor_temporal, "z_dim": z,
             "frames_per_step": k}
    return {
        "vae_decode_first": MediaGraph(
            "vae_decode_first", VaeDecodeFirst(vae, dec_plan), (latents[:, :1],),
            [TensorInfo("latents", "float32", lat)],
            [TensorInfo("frames", "float32", pix), *_caches(dec_plan, dec_plan.output_names())],
            {**extra, "cache_plan": dec_plan.to_dict()}),
        "vae_decode_step": MediaGraph(
            "vae_decode_step", VaeDecodeStep(vae, dec_plan), (latents[:, 1:], *dec_caches),
            [TensorInfo("latents", "float32", ("batch", k, z, "h", "w")), *_caches(dec_plan, dec_plan.input_names())],
            [TensorInfo("frames", "float32", ("batch", 4 * k, 3, "H", "W")),
             *_caches(dec_plan, dec_plan.output_names())],
            {**extra, "cache_plan": dec_plan.to_dict()}),
        "vae_encode": MediaGraph(
            "vae_encode", VaeEncode(vae), (frames[:, :1],),
            [TensorInfo("frames", "float32", pix)],
            [TensorInfo("latent_mean", "float32", lat), TensorInfo("latent_logvar", "float32", lat)], dict(extra)),
        "vae_encode_first": MediaGraph(
            "vae_encode_first", VaeEncodeFirst(vae, enc_plan), (frames[:, :1],),
            [TensorInfo("frames", "float32", pix)],
            [TensorInfo("latent_mean", "float32", lat), TensorInfo("latent_logvar", "float32", lat),
             *_caches(enc_plan, enc_plan.output_names())],
            {**extra, "cache_plan": enc_plan.to_dict()}),
        "vae_encode_step": MediaGraph(
            "vae_encode_step", VaeEncodeStep(vae, enc_plan), (frames[:, 1:], *enc_caches),
            [TensorInfo("frames", "float32", ("batch", 4 * k, 3, "H", "W")),
             *_caches(enc_plan, enc_plan.input_names())],
            [TensorInfo("latent_mean", "float32", ("batch", k, z, "h", "w")),
             TensorInfo("latent_logvar", "float32", ("batch", k, z, "h", "w")),
             *_caches(enc_plan, enc_plan.output_names())],
            {**extra, "cache_plan": enc_plan.to_dict()}),
    }
