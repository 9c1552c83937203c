"""Graph kinds of the media stages: the T5 text encoder and the Wan2.2 VAE (decode first/step, image
encode, chunked video encode first/step).

Their weights come from outside the flow checkpoint (``export --text-encoder DIR --vae PATH``):
:class:`MediaSources` (``ExportContext.media``) loads each model once; a kind whose source is
absent plans no graph. Torch wrappers and graph contracts are in :mod:`starflow_trt.media.graphs`;
the latent normalisation and temporal scale stay outside the graphs (manifest ``vae.norm``).

The kinds implement :class:`~.registry.GraphKind` like the flow kinds; ``build`` gets the loaded
media graph instead of the flow checkpoint (:meth:`_MediaKind.export_weights`). Each graph's
manifest entry also records its ``source`` (path + sha256 of the weight files: the torch
backend rebuilds the module from it, :meth:`_MediaKind.runtime_weights`) and a ``cost_model`` (T5: Linear
weights, layers, heads; VAE: FLOPs / IO bytes per latent pixel counted at export) that the benchmarks'
cost formulas read (:mod:`starflow_trt.bench.kinds`). Precision per kind: :mod:`starflow_trt.calibration.policy`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..errors import ConfigError, ManifestError
from ..model_constants import VAE_SPATIAL_FACTOR
from . import names as n
from .manifest import DimRange, GraphSpec
from .registry import ExportContext, GraphKind, register_graph


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

    def toy_graph(self, cfg):
        """The toy encoder's ``text_encoder`` :class:`~starflow_trt.media.graphs.MediaGraph`."""
        if "toy_graph" not in self._cache:
            from ..media.graphs import toy_text_graph

            self._cache["toy_graph"] = toy_text_graph(self.toy_text(cfg), cfg.noise_std)
        return self._cache["toy_graph"]

    def vae_graphs(self, cfg):
        """The VAE's :class:`~starflow_trt.media.graphs.MediaGraph` s by name, and its latent norm."""
        if "vae" not in self._cache:
            from ..media.graphs import vae_graphs
            from ..media.latents import LatentNorm
            from ..media.vae_load import load_vae

            vae = load_vae(self.vae)
            if vae.config.z_dim != cfg.channel_size:
                raise ConfigError(f"VAE {self.vae} has {vae.config.z_dim} latent channels but the model expects "
                                  f"channel_size {cfg.channel_size}; pass the VAE the checkpoint was trained with")
            self._cache["vae"] = (vae_graphs(vae), LatentNorm.from_vae(vae, cfg.vae_temporal_scale))
        return self._cache["vae"]


def source_record(path: Path) -> dict:
    """``{"path", "sha256": {file: sha256}}`` of a media source (a file, or a directory's config/weight files),
    recorded in the manifest so the torch backend can rebuild the graph from the same weights."""
    from ..staging import sha256_file

    path = Path(path).resolve()
    if path.is_file():
        return {"path": str(path), "sha256": {path.name: sha256_file(path)}}
    files = sorted(f for f in path.rglob("*") if f.is_file() and (
        f.suffix in (".safetensors", ".bin", ".pth", ".pt") or f.name == "config.json"))
    return {"path": str(path), "sha256": {str(f.relative_to(path)): sha256_file(f) for f in files}}


def check_source(spec) -> Path:
    """The recorded source of a media graph, if it still holds the same files; else a one-line ManifestError."""
    rec = spec.extra.get("source")
    fix = f"re-export the {spec.name} graph (`starflow-trt export ... --text-encoder DIR / --vae PATH`) or use " \
          "--backend ort"
    if not rec:
        raise ManifestError(f"the torch backend rebuilds {spec.name} from its source weights, which this export does "
                            f"not record; {fix}")
    now = source_record(Path(rec["path"])) if Path(rec["path"]).exists() else None
    if now is None or now["sha256"] != rec["sha256"]:
        raise ManifestError(f"the source of {spec.name} ({rec['path']}) is {'gone' if now is None else 'changed'} "
                            f"since export; {fix}")
    return Path(rec["path"])


def t5_cost_model(encoder: nn.Module) -> dict:
    """The T5 encoder's sizes a cost formula needs: Linear weights per token, layers, heads, head width, bytes."""
    cfg = encoder.config
    linear = sum(m.weight.numel() for m in encoder.modules() if isinstance(m, nn.Linear))
    return {"linear_params": int(linear), "layers": int(cfg.num_layers), "heads": int(cfg.num_heads),
            "d_kv": int(cfg.d_kv), "d_model": int(cfg.d_model),
            "weight_bytes": int(sum(p.numel() * p.element_size() for p in encoder.parameters()))}


def vae_cost_model(graph) -> dict:
    """FLOPs and IO bytes per latent pixel (batch · h · w; every VAE op is linear in it), counted by
    ``torch.utils.flop_counter`` on the graph's example, and its weight bytes."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        outs = graph.module(*graph.example)
    x = graph.example[0]
    lat_hw = (x.shape[-2] * x.shape[-1]) // (1 if graph.inputs[0].name == "latents" else VAE_SPATIAL_FACTOR ** 2)
    units = x.shape[0] * lat_hw
    outs = outs if isinstance(outs, tuple) else (outs,)
    io = sum(t.numel() * t.element_size() for t in (*graph.example, *outs))
    return {"flops_per_unit": counter.get_total_flops() / units, "io_bytes_per_unit": io / units,
            "weight_bytes": int(sum(p.numel() * p.element_size() for p in graph.module.parameters()))}


def _media(ctx: ExportContext) -> MediaSources:
    return ctx.media if ctx.media is not None else MediaSources()


def _dim_names(inputs) -> list[str]:
    return sorted({d for t in inputs for d in t.shape if isinstance(d, str)})


class _MediaKind(GraphKind):
    """A kind whose weights come from its own source (:class:`MediaSources`), not the flow checkpoint.

    ``build`` gets the loaded :class:`~starflow_trt.media.graphs.MediaGraph`: at export the source's
    (:meth:`graph`), in the torch backend one rebuilt from the source its manifest entry records
    (:meth:`load_graph`). Its manifest entry: the graph's own fields, the kind's :meth:`extra`,
    the ``cost_model`` (when the kind has one) and the ``source`` record.
    """

    flow_weights = False

    # ------------------------------------------------------------ the kind's source
    def graph(self, ctx: ExportContext):
        """The export's :class:`~starflow_trt.media.graphs.MediaGraph` of this kind (loaded once)."""
        raise NotImplementedError

    def load_graph(self, spec: GraphSpec):
        """The :class:`~starflow_trt.media.graphs.MediaGraph` of exported ``spec``, from its recorded source."""
        raise NotImplementedError

    def source(self, ctx: ExportContext) -> dict:
        raise NotImplementedError

    def extra(self, ctx: ExportContext) -> dict:
        return {}

    def cost_model(self, g) -> Optional[dict]:
        """The sizes the manifest records for cost formulas (None: the kind has no cost model)."""
        raise NotImplementedError

    # ------------------------------------------------------------ the protocol
    def inputs(self, ctx, block):
        return list(self.graph(ctx).inputs)

    def outputs(self, ctx, block):
        return list(self.graph(ctx).outputs)

    def export_weights(self, ctx, weights):
        return self.graph(ctx)

    def runtime_weights(self, spec, weights):
        return self.load_graph(spec)

    def build(self, geo, block, weights) -> nn.Module:
        """``weights``: the :class:`~starflow_trt.media.graphs.MediaGraph` (:meth:`export_weights`)."""
        return weights.module

    def manifest_extra(self, ctx, block, module) -> dict:
        g = self.graph(ctx)
        model = self.cost_model(g)
        return dict(g.extra, **self.extra(ctx), **({} if model is None else {"cost_model": model}),
                    source=self.source(ctx))


@register_graph
class TextEncoderKind(_MediaKind):
    """``text_encoder``: input_ids, attention_mask [batch, tokens] int64 → text [batch, tokens, D] (masked rows 0)."""

    kind = "text_encoder"

    def instances(self, ctx):
        return [(n.TEXT_ENCODER, None)] if _media(ctx).t5 else []

    def graph(self, ctx):
        return _media(ctx).text_graph(ctx.cfg)

    def load_graph(self, spec):
        from ..media.graphs import text_encoder_graph
        from ..media.text import T5TextEncoder, TextTemplate

        return text_encoder_graph(T5TextEncoder.from_pretrained(check_source(spec),
                                                                TextTemplate.from_dict(spec.extra["template"])))

    def source(self, ctx):
        return source_record(_media(ctx).text_encoder)

    def extra(self, ctx):
        from ..media.text import tokenizer_files

        return {"tokenizer_dir": n.TOKENIZER_DIR, "tokenizer_files": tokenizer_files(_media(ctx).text_encoder)}

    def cost_model(self, g):
        return t5_cost_model(g.module.encoder)

    def _length(self, ctx: ExportContext) -> int:
        return ctx.cfg.txt_size

    def dims(self, ctx, block):
        L = self._length(ctx)
        return {"batch": DimRange(1, 2, 2 * ctx.geo.max_batch), "tokens": DimRange(1, L, L)}

    def example_sizes(self, ctx, block):
        return {"batch": 2, "tokens": 3}

    def example_inputs(self, infos, sizes, geo, seed=0):
        g = torch.Generator().manual_seed(seed)
        b, t = sizes["batch"], sizes["tokens"]
        ids = torch.randint(0, 3, (b, t), generator=g)   # pad / eos / unk: valid in every vocabulary
        mask = torch.ones(b, t, dtype=torch.int64)
        mask[1:, -1] = 0
        return ids, mask


@register_graph
class ToyTextEncoderKind(TextEncoderKind):
    """The bundled toy's ``text_encoder`` graph (same contract; word tokenizer, no template, uncond = zeros)."""

    kind = "toy_text_encoder"

    def instances(self, ctx):
        return [(n.TEXT_ENCODER, None)] if _media(ctx).toy else []

    def graph(self, ctx):
        return _media(ctx).toy_graph(ctx.cfg)

    def load_graph(self, spec):
        from ..media.graphs import toy_text_graph
        from ..toy.text import ToyTextEncoder

        return toy_text_graph(ToyTextEncoder.load(check_source(spec)), spec.extra["template"]["noise_std"])

    def extra(self, ctx):
        return {}   # no tokenizer files: the vocabulary is in the manifest

    def cost_model(self, g):
        return None

    def _length(self, ctx):
        return _media(ctx).toy_text(ctx.cfg).length


class _VaeKind(_MediaKind):
    """Shared dims: latent grid h × w (token grid · patch), cache grids h_xR = R·h, pixels H = s·h."""

    def instances(self, ctx):
        return [(self.kind, None)] if _media(ctx).vae else []

    def graph(self, ctx):
        return _media(ctx).vae_graphs(ctx.cfg)[0][self.kind]

    def load_graph(self, spec):
        from ..media.graphs import vae_graphs
        from ..media.vae_load import load_vae

        k = int(spec.extra.get("frames_per_step", 1))
        g = vae_graphs(load_vae(check_source(spec)), frames_per_step=k)[spec.name]
        if g.extra.get("cache_plan") != spec.extra.get("cache_plan"):
            raise ManifestError(f"the VAE at {spec.extra['source']['path']} gives another cache plan than {spec.name} "
                                "was exported with; re-export")
        return g

    def source(self, ctx):
        return source_record(_media(ctx).vae)

    def extra(self, ctx):
        return {"norm": _media(ctx).vae_graphs(ctx.cfg)[1].to_dict()}

    def cost_model(self, g):
        return vae_cost_model(g)

    def _factor(self, dim: str, s: int) -> int:
        if dim in ("H", "W"):
            return s
        return int(dim.split("_x")[1]) if "_x" in dim else 1

    def dims(self, ctx, block):
        p = ctx.cfg.patch_size
        grid = {"h": ctx.geo.h * p, "w": ctx.geo.w * p}
        largest = {"h": max(h for h, _ in ctx.geo.grids) * p, "w": max(w for _, w in ctx.geo.grids) * p}  # --aspects
        s = VAE_SPATIAL_FACTOR
        out = {}
        for d in _dim_names(self.inputs(ctx, block)):
            if d == "batch":
                out[d] = DimRange(1, 1, ctx.geo.max_batch)
            else:
                base, r = grid[d[0].lower()], self._factor(d, s)
                out[d] = DimRange(r, base * r, largest[d[0].lower()] * r)
        return out

    def example_sizes(self, ctx, block):
        out = {}
        for d in _dim_names(self.inputs(ctx, block)):
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
    """``vae_encode_step``: frames [batch, 4, 3, H, W], cache_i → latent_mean, latent_logvar [batch, 1, z, h, w],
    new_cache_i."""

    kind = n.VAE_ENCODE_STEP
