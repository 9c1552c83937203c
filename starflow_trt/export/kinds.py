"""The built-in graph kinds: text prefill, step, forward (scoring) and denoiser.

Each class is the export contract of its graphs (see :mod:`.registry`); the torch wrappers
are in :mod:`.graphs`.
Notation: B max batch, T max frames, F = h·w tokens per frame, N = T·F, L text length,
D text width, c token channels, hd head dim. An export covering several grids (``--aspects``)
gets one range per dim over all of them: ``h`` / ``w`` from the smallest to the largest side,
F (and so S, P, rows) up to the largest grid's; opt values are the default grid's.
"""

from __future__ import annotations

from torch import nn

from ..geometry import Geometry
from . import names as n
from .graphs import DenoiserGraph, ForwardGraph, StepGraph, TextPrefillGraph
from .manifest import DimRange, TensorInfo
from .registry import ExportContext, GraphKind, kv_tensors, register_graph, tensor
from .trt_variant import FORM as TRT_FORM


#: ONNX tensor dtype of the K/V (and weights) of each export precision
KV_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _kv(ctx: ExportContext, prefix: str, seq, block: int) -> list[TensorInfo]:
    b = ctx.geo.blocks[block]
    dtype = KV_DTYPES[getattr(ctx.limits, "dtype", "fp32")]
    return [TensorInfo(t.name, dtype, t.shape) for t in kv_tensors(prefix, seq, b.layers, b.heads, ctx.geo.head_dim)]


def _grid(geo: Geometry) -> dict[str, DimRange]:
    """h / w from the smallest to the largest exported side (opt: the default grid)."""
    hs, ws = [h for h, _ in geo.grids], [w for _, w in geo.grids]
    return {"h": DimRange(min(hs), geo.h, max(hs)), "w": DimRange(min(ws), geo.w, max(ws))}


def _example_grid(geo: Geometry) -> tuple[int, int]:
    """Trace sizes of h, w: distinct from each other and from batch 3 / T 2, so the exporter
    keeps them two independent symbols (equal example sizes would be merged into one)."""
    if len(geo.grids) == 1 and geo.h != geo.w and {geo.h, geo.w}.isdisjoint({2, 3}):
        return geo.h, geo.w
    return 5, 7


def frame_local(geo: Geometry, block: int) -> bool:
    """Whether block ``block``'s forward graph runs one frame per sequence (frames folded into the batch)."""
    return block != geo.top_index and geo.frame_local


def text_rows(geo: Geometry, block: int) -> int:
    """Text tokens ahead of block ``block``'s video tokens in its forward graph (L, or 0 without text)."""
    return geo.text_length if geo.blocks[block].text else 0


def denoiser_frames(geo: Geometry) -> int:
    """Frames of one denoising chunk at most (the attention window, else the whole video)."""
    return geo.local_attn_window or geo.max_frames


@register_graph
class PrefillKind(GraphKind):
    """``deep_prefill``: text [batch, L, D] + RoPE rows [L, hd] → ``new_k_l`` / ``new_v_l`` [L, batch, heads, hd]."""

    kind = "prefill"
    wrapper = TextPrefillGraph
    trt_form = TRT_FORM

    def instances(self, ctx):
        return [(n.DEEP_PREFILL, ctx.geo.top_index)]

    def inputs(self, ctx, block):
        g = ctx.geo
        return [tensor(n.TEXT, "batch", g.text_length, g.text_width), tensor(n.ROPE_COS, g.text_length, g.head_dim),
                tensor(n.ROPE_SIN, g.text_length, g.head_dim)]

    def outputs(self, ctx, block):
        return _kv(ctx, n.NEW, ctx.geo.text_length, block)

    def dims(self, ctx, block):
        return {"batch": DimRange(1, 2, 2 * ctx.geo.max_batch)}   # guidance doubles the batch

    def example_sizes(self, ctx, block):
        return {"batch": 3}

    def build(self, geo, block, weights) -> nn.Module:
        return TextPrefillGraph(weights.block(block))

    def build_trt(self, geo, block, weights) -> nn.Module:
        return TextPrefillGraph(weights.block(block), concat_attention=True)

    def trt_attention(self, layers):
        return range(layers - 1), False   # no past; the last layer's attention output feeds nothing


@register_graph
class StepKind(GraphKind):
    """``deep_step`` / ``shallow_step_k``: S shifted tokens + past K/V → (scale, shift, new K/V).

    tokens [batch, S, c], rope_cos/sin [S, hd], past_k_l / past_v_l [P, batch, heads, hd] →
    scale, shift [batch, S, c], new_k_l / new_v_l [S, batch, heads, hd].
    """

    kind = "step"
    wrapper = StepGraph
    trt_form = TRT_FORM

    def instances(self, ctx):
        g = ctx.geo
        return [(n.DEEP_STEP, g.top_index), *((n.shallow_step_graph(k), k) for k in g.shallow_blocks)]

    def inputs(self, ctx, block):
        g = ctx.geo
        return [tensor(n.TOKENS, "batch", "S", g.token_channels), tensor(n.ROPE_COS, "S", g.head_dim),
                tensor(n.ROPE_SIN, "S", g.head_dim), *_kv(ctx, n.PAST, "P", block)]

    def outputs(self, ctx, block):
        c = ctx.geo.token_channels
        return [tensor(n.SCALE, "batch", "S", c), tensor(n.SHIFT, "batch", "S", c), *_kv(ctx, n.NEW, "S", block)]

    def dims(self, ctx, block):
        g = ctx.geo
        F, T, B, L = g.max_tokens_per_frame, g.max_frames, g.max_batch, g.text_length
        N = T * F
        opt_s = min(ctx.limits.opt_chunk, N)
        if block == g.top_index:   # text prefix + every video token, guidance-doubled batch
            return {"batch": DimRange(1, 2, 2 * B), "S": DimRange(1, opt_s, N), "P": DimRange(0, L + N // 2, L + N)}
        if g.frame_local:          # one frame per sequence, frames folded into the batch
            return {"batch": DimRange(1, T, B * T), "S": DimRange(1, min(opt_s, F), F),
                    "P": DimRange(0, F // 2, max(F - 1, 0))}
        return {"batch": DimRange(1, 1, B), "S": DimRange(1, opt_s, N), "P": DimRange(0, N // 2, N - 1)}

    def example_sizes(self, ctx, block):
        return {"batch": 3, "S": 5, "P": 7}

    def build(self, geo, block, weights) -> nn.Module:
        return StepGraph(weights.block(block))

    def build_trt(self, geo, block, weights) -> nn.Module:
        return StepGraph(weights.block(block), concat_attention=True)

    def manifest_extra(self, ctx, block, module: nn.Module) -> dict:
        return {n.SOS: module.block.sos_embed.detach().flatten().tolist()}  # the runtime feeds SOS first


@register_graph
class ForwardKind(GraphKind):
    """``forward_k``: block input x [batch, T, h, w, c] (+ text) → (z [batch, T, h, w, c], logdet).

    Frame-local shallow blocks: rope rows [F, hd], logdet [batch, T, F, c]; the top block:
    rope rows [L + T·F, hd], logdet [batch, N, c].
    """

    kind = "forward"
    wrapper = ForwardGraph

    def instances(self, ctx):
        g = ctx.geo
        return [(n.forward_graph(k), k) for k in range(g.num_blocks) if k not in g.identity_blocks]

    def inputs(self, ctx, block):
        g = ctx.geo
        c, hd = g.token_channels, g.head_dim
        out = [tensor(n.X, "batch", "T", "h", "w", c), tensor(n.ROPE_COS, "rows", hd), tensor(n.ROPE_SIN, "rows", hd)]
        if g.blocks[block].text:
            out.append(tensor(n.TEXT, "batch", g.text_length, g.text_width))
        return out

    def outputs(self, ctx, block):
        c = ctx.geo.token_channels
        local = frame_local(ctx.geo, block)
        logdet = tensor(n.LOGDET, "batch", "T", "F", c) if local else tensor(n.LOGDET, "batch", "N", c)
        return [tensor(n.Z, "batch", "T", "h", "w", c), logdet]

    def dims(self, ctx, block):
        g = ctx.geo
        F, T, text = g.tokens_per_frame, g.max_frames, text_rows(g, block)
        per_seq = (lambda f: f) if frame_local(g, block) else (lambda f: T * f)
        return {"batch": DimRange(1, 1, g.max_batch), "T": DimRange(1, T, T), **_grid(g),
                "rows": DimRange(g.min_tokens_per_frame + text, per_seq(F) + text,
                                 per_seq(g.max_tokens_per_frame) + text)}

    def example_sizes(self, ctx, block):
        g = ctx.geo
        frames = 1 if frame_local(g, block) else 2
        h, w = _example_grid(g)
        return {"batch": 3, "T": 2, "h": h, "w": w, "rows": frames * h * w + text_rows(g, block)}

    def build(self, geo, block, weights) -> nn.Module:
        return ForwardGraph(weights.block(block), frame_local(geo, block))


@register_graph
class DenoiserKind(GraphKind):
    """``denoiser``: x [batch, T, h, w, c], text [batch, L, D], rope rows [L + T·F, hd] → d [batch, T, h, w, c]."""

    kind = "denoiser"
    wrapper = DenoiserGraph

    def instances(self, ctx):
        return [(n.DENOISER, None)] if ctx.geo.has_denoiser else []

    def inputs(self, ctx, block):
        g = ctx.geo
        c = g.token_channels
        return [tensor(n.X, "batch", "T", "h", "w", c), tensor(n.TEXT, "batch", g.text_length, g.text_width),
                tensor(n.ROPE_COS, "rows", g.head_dim), tensor(n.ROPE_SIN, "rows", g.head_dim)]

    def outputs(self, ctx, block):
        return [tensor(n.D, "batch", "T", "h", "w", ctx.geo.token_channels)]

    def dims(self, ctx, block):
        g = ctx.geo
        dt, F, L = denoiser_frames(g), g.tokens_per_frame, g.text_length
        return {"batch": DimRange(1, 1, g.max_batch), "T": DimRange(1, dt, dt), **_grid(g),
                "rows": DimRange(L + g.min_tokens_per_frame, L + dt * F, L + dt * g.max_tokens_per_frame)}

    def example_sizes(self, ctx, block):
        g = ctx.geo
        h, w = _example_grid(g)
        return {"batch": 3, "T": 2, "h": h, "w": w, "rows": g.text_length + 2 * h * w}

    def build(self, geo, block, weights) -> nn.Module:
        return DenoiserGraph(weights.denoiser())

