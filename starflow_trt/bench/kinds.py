"""What the benchmarks know of each graph kind: the cost of one call and the sizes they time.

Keyed by graph kind (``GraphSpec.kind``): :func:`register_bench` files a :class:`KindBench` under
kind names, :func:`kind_bench` looks one up. The export contract of a kind
(:mod:`starflow_trt.export.registry`) knows nothing of this; a graph of a kind with no entry here
is not timed. The flow graphs' FLOP / byte formulas are in :mod:`starflow_trt.costs`; the media
graphs' costs read the sizes their manifest entry records (``cost_model``, counted at export).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping, Optional

from .. import costs
from ..config import ModelConfig
from ..costs import Cost
from ..errors import StarflowError
from ..export import names as n
from ..export.kinds import denoiser_frames, frame_local, text_rows
from ..export.manifest import GraphSpec
from ..geometry import Geometry


class KindBench:
    """How the per-graph benchmark treats one kind's graphs. Sizes: symbolic dim → int
    (``{"batch": 2, "S": 16, "P": 40}``)."""

    #: dims named in a row's shape label (None: every dim of the case)
    label_dims: ClassVar[Optional[tuple[str, ...]]] = None

    def cost(self, cfg: ModelConfig, block: Optional[int], sizes: Mapping[str, Any]) -> Cost:
        """FLOPs and bytes of one call with these sizes."""
        raise NotImplementedError

    def cases(self, spec: GraphSpec, geo: Geometry) -> list[dict[str, Any]]:
        """Sizes the per-graph benchmark times (default: the opt of every dim; [] skips the graph)."""
        return [{k: r.opt for k, r in spec.dims.items()}]


_BENCHES: dict[str, KindBench] = {}


def register_bench(*kinds: str) -> Callable[[type[KindBench]], type[KindBench]]:
    """Class decorator: file the :class:`KindBench` subclass under each graph kind of ``kinds``."""

    def register(cls: type[KindBench]) -> type[KindBench]:
        for kind in kinds:
            if kind in _BENCHES:
                raise ValueError(f"graph kind {kind!r} already has a benchmark entry ({type(_BENCHES[kind]).__name__})")
            _BENCHES[kind] = cls()
        return cls

    return register


def unregister_bench(kind: str) -> None:
    """Remove a kind's entry (tests, plug-ins)."""
    _BENCHES.pop(kind, None)


def find_kind_bench(kind: str) -> Optional[KindBench]:
    """The entry of graph kind ``kind`` (None: its graphs are not timed)."""
    return _BENCHES.get(kind)


def kind_bench(kind: str) -> KindBench:
    """The entry of graph kind ``kind`` (StarflowError if it has none)."""
    found = find_kind_bench(kind)
    if found is None:
        raise StarflowError(f"graph kind {kind!r} has no benchmark entry (known: {', '.join(_BENCHES)})")
    return found


# -------------------------------------------------------------------- flow graphs
@register_bench("prefill")
class PrefillBench(KindBench):
    def cost(self, cfg, block, sizes):
        return costs.prefill_cost(cfg, sizes["batch"])

    def cases(self, spec, geo):
        return []   # once per call: not a hot-loop graph


@register_bench("step")
class StepBench(KindBench):
    label_dims = ("batch", "S", "P")

    def cost(self, cfg, block, sizes):
        return costs.step_cost(cfg, block, sizes["batch"], sizes["S"], sizes["P"])

    def cases(self, spec, geo):
        L, F, T = geo.text_length, geo.tokens_per_frame, geo.max_frames
        N = T * F
        if spec.block == geo.top_index:   # one prompt with guidance: decode, small and large chunks
            bp = 2 * min(1, geo.max_batch)
            return [{"batch": bp, "S": s, "P": p} for s in (1, 16, 64) for p in sorted({L, L + N // 2, L + N - s})]
        if spec.block in geo.shallow_blocks[:1]:   # all frames of a video batched, from an empty cache
            return [{"batch": T, "S": min(s, F), "P": 0} for s in (16, F)]
        return []


@register_bench("forward")
class ForwardBench(KindBench):
    label_dims = ("batch", "T")

    def cost(self, cfg, block, sizes):
        """Per sequence: one frame (frame-local, frames folded into the batch) or the whole video (+ text)."""
        frames, F = sizes["T"], sizes["h"] * sizes["w"]
        local = block != cfg.top_index and bool(cfg.shallow_block_local)
        text = cfg.txt_size if cfg.block_has_text(block) else 0
        return costs.step_cost(cfg, block, sizes["batch"] * (frames if local else 1),
                               (F if local else frames * F) + text, 0)

    def cases(self, spec, geo):
        if spec.block not in (*geo.shallow_blocks[:1], geo.top_index):
            return []
        T, F = geo.max_frames, geo.tokens_per_frame
        rows = (F if frame_local(geo, spec.block) else T * F) + text_rows(geo, spec.block)
        return [{"batch": 1, "T": T, "h": geo.h, "w": geo.w, "rows": rows, "F": F, "N": T * F}]


@register_bench("denoiser")
class DenoiserBench(KindBench):
    label_dims = ("batch", "T")

    def cost(self, cfg, block, sizes):
        return costs.denoiser_cost(cfg, sizes["batch"], sizes["T"], sizes["h"] * sizes["w"])

    def cases(self, spec, geo):
        T = min(geo.max_frames, denoiser_frames(geo))
        return [{"batch": 1, "T": T, "h": geo.h, "w": geo.w, "rows": geo.text_length + T * geo.tokens_per_frame}]


# -------------------------------------------------------------------- media graphs
class _RecordedCostBench(KindBench):
    """A kind whose cost reads the sizes its manifest entry records: each case carries them as ``cost_*``."""

    def cases(self, spec, geo):
        model = spec.extra.get("cost_model")
        if not model:
            return []   # exported before cost models were recorded
        return [{**{k: r.opt for k, r in spec.dims.items()}, **{f"cost_{k}": v for k, v in model.items()}}]

    @staticmethod
    def recorded(sizes: Mapping[str, Any]) -> dict[str, Any]:
        """The ``cost_*`` entries of ``sizes``, prefix dropped."""
        model = {k[len("cost_"):]: v for k, v in sizes.items() if k.startswith("cost_")}
        if not model:
            raise StarflowError("the cost of a media graph needs its manifest cost_model (pass the sizes "
                                "KindBench.cases gives, or re-export)")
        return model


@register_bench("text_encoder")
class TextEncoderBench(_RecordedCostBench):
    label_dims = ("batch", "tokens")

    def cost(self, cfg, block, sizes):
        """Linear layers 2 · B · L · weights; attention (QKᵀ and AV) 2 · 2 · B · heads · L² · d_kv per layer."""
        m = self.recorded(sizes)
        b, t = sizes["batch"], sizes["tokens"]
        flops = costs.text_encoder_flops(b, t, m["linear_params"], m["layers"], m["heads"], m["d_kv"])
        return Cost(float(flops), float(m["weight_bytes"]), 0.0, float(b * t * (16 + 4 * m["d_model"])))


@register_bench("toy_text_encoder")
class ToyTextEncoderBench(TextEncoderBench):
    def cases(self, spec, geo):
        return []   # a table lookup: nothing to time


@register_bench(*n.VAE_GRAPHS)
class VaeBench(_RecordedCostBench):
    label_dims = ("batch", "h", "w")

    def cost(self, cfg, block, sizes):
        """Linear in the latent pixels batch · h · w (per-unit numbers counted at export)."""
        m = self.recorded(sizes)
        units = sizes["batch"] * sizes["h"] * sizes["w"]
        return Cost(m["flops_per_unit"] * units, float(m["weight_bytes"]), 0.0, m["io_bytes_per_unit"] * units)
