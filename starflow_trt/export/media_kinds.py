"""Graph kinds of the media stages: the T5 text encoder and the Wan2.2 VAE (decode first/step, image
encode, chunked video encode first/step).

Their weights come from outside the flow checkpoint (``export --text-encoder DIR --vae PATH``):
:class:`MediaSources` (``ExportContext.media``) loads each model once; a kind whose source is
absent plans no graph. Torch wrappers and graph contracts are in :mod:`starflow_trt.media.graphs`;
the latent normalisation and temporal scale stay outside the graphs (manifest ``vae.norm``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..config import VAE_SPATIAL_FACTOR
from ..errors import ConfigError, StarflowError
from . import names as n
from .manifest import DimRange, TensorInfo
from .registry import ExportContext, GraphKind, GraphPlan, register_graph


class MediaSources:
    """Local text-encoder directory and VAE path of an export; loads each model once, lazily."""

    def __init__(self, text_encoder: Optional[Union[str, os.PathLike]] = None,
                 vae: Optional[Union[str, os.PathLike]] = None) -> None:
        self.text_encoder = Path(text_encoder) if text_encoder else None   # a T5 directory, or the toy's file
        self.vae = Path(vae) if vae else None
        self._cache: dict[str, Any] = {}

    def text_graph(self, cfg):
        """The ``text_encoder`` :class:`~starflow_trt.media.graphs.MediaGraph` (templates from ``cfg``)."""
        if "text" not in self._cache:
            from ..media.graphs import text_encoder_graph
            from ..media.text import T5TextEncoder, TextTemplate

            enc = T5TextEncoder.from_pretrained(self.text_encoder, TextTemplate.from_config(cfg))
            if cfg.txt_dim and enc.dim != cfg.txt_dim:  # export has inferred txt_dim from the checkpoint
                raise ConfigError(f"text encoder {self.text_encoder} has width {enc.dim} but the model expects "
                                  f"txt_dim {cfg.txt_dim}; pass the encoder the checkpoint was trained with")
            self._cache["text"] = text_encoder_graph(enc)
        return self._cache["text"]

    @property
    def t5(self) -> bool:
        return self.text_encoder is not None and self.text_encoder.is_dir()

    @property
    def toy(self) -> bool:
        return self.text_encoder is not None and self.text_encoder.is_file()

    def toy_text(self, cfg):
        """The bundled toy's word-table encoder (``text_encoder.safetensors``)."""
        if "toy" not in self._cache:
            from ..toy.text import ToyTextEncoder

            try:
                enc = ToyTextEncoder.load(self.text_encoder)
            except Exception as exc:   # not a toy table: say what --text-encoder takes
                raise ConfigError(f"{self.text_encoder} is not a toy text encoder ({exc}); pass a Hugging Face T5 "
                                  "directory or the toy's text_encoder.safetensors") from exc
            if cfg.txt_dim and enc.dim != cfg.txt_dim:
                raise ConfigError(f"toy text encoder {self.text_encoder} has width {enc.dim}, the model txt_dim "
                                  f"{cfg.txt_dim}")
            self._cache["toy"] = enc
        return self._cache["toy"]

    def vae_graphs(self, cfg):
        """The VAE's :class:`~starflow_trt.media.graphs.MediaGraph` s by name, and its latent norm."""
        if "vae" not in self._cache:
            from ..media.graphs import vae_graphs
            from ..media.vae import LatentNorm, load_vae

            vae = load_vae(self.vae)
            if vae.config.z_dim != cfg.channel_size:
                raise ConfigError(f"VAE {self.vae} has {vae.config.z_dim} latent channels but the model expects "
                                  f"channel_size {cfg.channel_size}; pass the VAE the checkpoint was trained with")
            self._cache["vae"] = (vae_graphs(vae), LatentNorm.from_vae(vae, cfg.vae_temporal_scale))
        return self._cache["vae"]


def _media(ctx: ExportContext) -> MediaSources:
    return ctx.media if ctx.media is not None else MediaSources()


class _MediaKind(GraphKind):
    """A kind whose module comes from :class:`MediaSources` (not the flow checkpoint)."""

    int8 = False          # no INT8 for these graphs until a quality gate holds
    fp16_modules = ()     # calibration's flow-transformer default does not apply

    def graph(self, ctx: ExportContext, name: str):
        raise NotImplementedError

    def inputs(self, ctx, block):
        raise StarflowError(f"{self.kind} graphs are planned only through an export with media sources")

    outputs = inputs

    def plan(self, ctx: ExportContext, name: str, block, weights) -> GraphPlan:
        g = self.graph(ctx, name)

        def make() -> nn.Module:
            g.module.manifest_info = dict(g.extra, **self.extra(ctx))
            return g.module

        return GraphPlan(name=name, kind=self.kind, block=None, make=make, inputs=list(g.inputs),
                         outputs=list(g.outputs), dims=self.ranges(ctx, g.inputs), example=self.sizes(g.inputs))

    def extra(self, ctx: ExportContext) -> dict:
        return {}

    def manifest_extra(self, module: nn.Module) -> dict:
        return dict(getattr(module, "manifest_info", {}))

    def build(self, geo, block, weights) -> nn.Module:
        raise StarflowError(f"the torch backend cannot rebuild {self.kind} graphs (their weights are not in the "
                            "flow checkpoint); use --backend ort or trt")

    def bench_cases(self, spec, geo):
        return []   # no cost model yet

    def ranges(self, ctx: ExportContext, inputs) -> dict[str, DimRange]:
        raise NotImplementedError

    def sizes(self, inputs) -> dict[str, int]:
        raise NotImplementedError


def _dim_names(inputs) -> list[str]:
    return sorted({d for t in inputs for d in t.shape if isinstance(d, str)})


@register_graph
class TextEncoderKind(_MediaKind):
    """``text_encoder``: input_ids, attention_mask [batch, tokens] int64 → text [batch, tokens, D] (masked rows 0)."""

    kind = "text_encoder"

    def instances(self, ctx):
        return [(n.TEXT_ENCODER, None)] if _media(ctx).t5 else []

    def graph(self, ctx, name):
        return _media(ctx).text_graph(ctx.cfg)

    def extra(self, ctx):
        from ..media.text import tokenizer_files

        return {"tokenizer_dir": n.TOKENIZER_DIR, "tokenizer_files": tokenizer_files(_media(ctx).text_encoder)}

    def ranges(self, ctx, inputs):
        L = ctx.cfg.txt_size
        return {"batch": DimRange(1, 2, 2 * ctx.geo.max_batch), "tokens": DimRange(1, L, L)}

    def sizes(self, inputs):
        return {"batch": 2, "tokens": 3}

    def example_inputs(self, infos, sizes, geo, seed=0):
        g = torch.Generator().manual_seed(seed)
        b, t = sizes["batch"], sizes["tokens"]
        ids = torch.randint(0, 3, (b, t), generator=g)   # pad / eos / unk: valid in every vocabulary
        mask = torch.ones(b, t, dtype=torch.int64)
        mask[1:, -1] = 0
        return ids, mask


class ToyTextGraph(nn.Module):
    """The toy's word table as a ``text_encoder`` graph: ``table[input_ids] * attention_mask`` [B, L, D]."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table.float().clone(), requires_grad=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.table[input_ids] * attention_mask.unsqueeze(-1).to(self.table.dtype)


@register_graph
class ToyTextEncoderKind(TextEncoderKind):
    """The bundled toy's ``text_encoder`` graph (same contract; word tokenizer, no template, uncond = zeros)."""

    kind = "toy_text_encoder"

    def instances(self, ctx):
        return [(n.TEXT_ENCODER, None)] if _media(ctx).toy else []

    def plan(self, ctx, name, block, weights) -> GraphPlan:
        enc = _media(ctx).toy_text(ctx.cfg)
        shape = ("batch", "tokens")
        inputs = [TensorInfo(n.INPUT_IDS, "int64", shape), TensorInfo(n.ATTENTION_MASK, "int64", shape)]
        extra = {"d_model": enc.dim, "tokenizer": "words", "vocab": list(enc.vocab),
                 "template": {"fps_cond": False, "cond_noise_level": False, "noise_std": float(ctx.cfg.noise_std),
                              "mix_aspect": False, "txt_size": enc.length}}

        def make() -> nn.Module:
            module = ToyTextGraph(enc.table)
            module.manifest_info = extra
            return module

        L = enc.length
        return GraphPlan(name=name, kind=self.kind, block=None, make=make, inputs=inputs,
                         outputs=[TensorInfo(n.TEXT, "float32", (*shape, enc.dim))],
                         dims={"batch": DimRange(1, 2, 2 * ctx.geo.max_batch), "tokens": DimRange(1, L, L)},
                         example=self.sizes(inputs))


class _VaeKind(_MediaKind):
    """Shared dims: latent grid h × w (token grid · patch), cache grids h_xR = R·h, pixels H = s·h."""

    def instances(self, ctx):
        return [(self.kind, None)] if _media(ctx).vae else []

    def graph(self, ctx, name):
        return _media(ctx).vae_graphs(ctx.cfg)[0][name]

    def extra(self, ctx):
        return {"norm": _media(ctx).vae_graphs(ctx.cfg)[1].to_dict()}

    def _factor(self, dim: str, s: int) -> int:
        if dim in ("H", "W"):
            return s
        return int(dim.split("_x")[1]) if "_x" in dim else 1

    def ranges(self, ctx, inputs):
        p = ctx.cfg.patch_size
        grid = {"h": ctx.geo.h * p, "w": ctx.geo.w * p}
        largest = {"h": max(h for h, _ in ctx.geo.grids) * p, "w": max(w for _, w in ctx.geo.grids) * p}  # --aspects
        s = VAE_SPATIAL_FACTOR
        out = {}
        for d in _dim_names(inputs):
            if d == "batch":
                out[d] = DimRange(1, 1, ctx.geo.max_batch)
            else:
                base, r = grid[d[0].lower()], self._factor(d, s)
                out[d] = DimRange(r, base * r, largest[d[0].lower()] * r)
        return out

    def sizes(self, inputs):
        out = {}
        for d in _dim_names(inputs):
            out[d] = 2 if d == "batch" else (2 if d[0].lower() == "h" else 3) * self._factor(d, VAE_SPATIAL_FACTOR)
        return out


@register_graph
class VaeDecodeFirstKind(_VaeKind):
    """``vae_decode_first``: latents [batch, 1, z, h, w] → frames [batch, 1, 3, H, W], new_cache_i."""

    kind = n.VAE_DECODE_FIRST


@register_graph
class VaeDecodeStepKind(_VaeKind):
    """``vae_decode_step``: latents [batch, 1, z, h, w], cache_i → frames [batch, 4, 3, H, W], new_cache_i."""

    kind = n.VAE_DECODE_STEP


@register_graph
class VaeEncodeKind(_VaeKind):
    """``vae_encode`` (images): frames [batch, 1, 3, H, W] → latent_mean, latent_logvar [batch, 1, z, h, w]."""

    kind = n.VAE_ENCODE


@register_graph
class VaeEncodeFirstKind(_VaeKind):
    """``vae_encode_first`` (video): frames [batch, 1, 3, H, W] → latent_mean, latent_logvar, new_cache_i."""

    kind = n.VAE_ENCODE_FIRST


@register_graph
class VaeEncodeStepKind(_VaeKind):
    """``vae_encode_step``: frames [batch, 4, 3, H, W], cache_i → latent_mean, latent_logvar [batch, 1, z, h, w], new_cache_i."""

    kind = n.VAE_ENCODE_STEP
