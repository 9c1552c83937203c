"""Graph registry: one :class:`GraphKind` per kind of graph declares its graphs' export contract.

A kind declares (the per-model classes of TensorRT's demo_diffusion, optimum's OnnxConfig):

* ``kind`` and the graphs it yields (:meth:`GraphKind.instances`: name and block),
* the torch wrapper with its weights (:meth:`GraphKind.build`; the weights are the flow
  checkpoint's unless the kind loads its own: :meth:`export_weights`, :meth:`runtime_weights`),
* IO: :class:`TensorInfo` names, dtypes and symbolic dims (:meth:`inputs`, :meth:`outputs`;
  names from :mod:`.names`), and the dims' min/opt/max from the export limits (:meth:`dims`),
* example sizes and tensors for tracing (:meth:`example_sizes`, :meth:`example_inputs`),
* manifest extras (:meth:`manifest_extra`).

Every kind — flow and media alike — implements this one protocol; :meth:`GraphKind.plan` is
written once, here.

Export plans its graphs with :func:`plan_graphs`; the torch backend, verify and the benchmarks
look a graph's kind up by ``GraphSpec.kind`` (:func:`graph_kind`) to rebuild its module or make
example inputs, so a new kind is one decorated class::

    @register_graph
    class MyKind(GraphKind):
        kind = "mine"
        ...

Built-in kinds live in the modules of :data:`BUILTIN_MODULES` (the one list to extend when a
new built-in module of kinds is added). What the layers above export know of a kind is theirs,
keyed by its name: precision policy in :mod:`starflow_trt.calibration.policy`, cost and
benchmark sizes in :mod:`starflow_trt.bench.kinds`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping, Optional, Sequence

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ManifestError, StarflowError
from ..geometry import Geometry
from .dtypes import TORCH_DTYPES
from .limits import ExportLimits
from .manifest import DimRange, GraphSpec, TensorInfo
from .names import ROPE_COS, ROPE_INPUTS, kv_names

#: modules whose import registers the built-in kinds, in manifest order
BUILTIN_MODULES: tuple[str, ...] = ("starflow_trt.export.kinds", "starflow_trt.export.media_kinds")

_KINDS: dict[str, "GraphKind"] = {}
_builtins_loaded = False


@dataclass(frozen=True)
class ExportContext:
    """What a kind plans its graphs from: the model config, the export geometry and limits."""

    cfg: ModelConfig
    geo: Geometry
    limits: ExportLimits
    #: :class:`~.media_kinds.MediaSources` (text encoder, VAE) or None: no media graphs
    media: Optional[object] = None


@dataclass
class GraphPlan:
    """One graph to export: its contract (IO, dims), example sizes, a factory of its torch module
    and the extra fields of its manifest entry (computed from that module, once exported)."""

    name: str
    kind: str
    block: Optional[int]
    make: Callable[[], nn.Module]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    dims: dict[str, DimRange]
    example: dict[str, int]
    manifest_extra: Callable[[nn.Module], dict]
    #: factory of the same graph in TensorRT's fused-attention form (None: the kind has none)
    make_trt: Optional[Callable[[], nn.Module]] = None


def tensor(name: str, *shape, dtype: str = "float32") -> TensorInfo:
    """A graph tensor: ``tensor("tokens", "batch", "S", 4)`` (str dims are symbolic)."""
    return TensorInfo(name, dtype, tuple(shape))


def kv_tensors(prefix: str, seq, layers: int, heads: int, head_dim: int) -> list[TensorInfo]:
    """Per-layer K/V tensors ``{prefix}_k_l`` / ``{prefix}_v_l`` [seq, batch, heads, head_dim]."""
    return [tensor(n, seq, "batch", heads, head_dim) for n in kv_names(layers, prefix)]


class GraphKind:
    """Base of a graph kind. Subclasses set ``kind`` and implement the abstract methods.

    ``block`` is the flow-block index a graph belongs to (None for graphs of no block).
    Sizes are dicts of symbolic dim name → int (``{"batch": 2, "S": 16, "P": 40}``).
    """

    kind: ClassVar[str] = ""
    #: the torch wrapper class (what :meth:`build` returns); inputs are its positional arguments in order
    wrapper: ClassVar[Optional[type]] = None
    #: attention form of this kind's TensorRT variant (:meth:`build_trt`; None: no variant)
    trt_form: ClassVar[Optional[str]] = None
    #: :meth:`build` takes the flow checkpoint's weights (False: the kind loads its own, e.g. T5 or the VAE)
    flow_weights: ClassVar[bool] = True

    # ----------------------------------------------------------- export contract
    def instances(self, ctx: ExportContext) -> list[tuple[str, Optional[int]]]:
        """(graph name, block) of every graph of this kind for the export."""
        raise NotImplementedError

    def inputs(self, ctx: ExportContext, block: Optional[int]) -> list[TensorInfo]:
        raise NotImplementedError

    def outputs(self, ctx: ExportContext, block: Optional[int]) -> list[TensorInfo]:
        raise NotImplementedError

    def dims(self, ctx: ExportContext, block: Optional[int]) -> dict[str, DimRange]:
        """min / opt / max of every symbolic input dim (the TensorRT profile and the runtime check)."""
        raise NotImplementedError

    def example_sizes(self, ctx: ExportContext, block: Optional[int]) -> dict[str, int]:
        """Sizes for tracing: inside the ranges and distinct (>= 2) so no dim is specialised."""
        raise NotImplementedError

    def build(self, geo: Geometry, block: Optional[int], weights: Any) -> nn.Module:
        """The torch wrapper with its weights: what :meth:`export_weights` / :meth:`runtime_weights` give
        (an :class:`~.weights.BlockLoader` of the flow checkpoint unless the kind loads its own)."""
        raise NotImplementedError

    def build_trt(self, geo: Geometry, block: Optional[int], weights) -> nn.Module:
        """The wrapper in TensorRT's fused-attention form (same IO and maths; kinds with ``trt_form``)."""
        raise NotImplementedError

    def trt_attention(self, layers: int) -> tuple[Sequence[int], bool]:
        """(layers whose attention the graph holds, whether it attends over past K/V inputs): what
        :func:`~.trt_variant.form_problems` checks the TensorRT variant against."""
        return range(layers), True

    def export_weights(self, ctx: ExportContext, weights: Any) -> Any:
        """What :meth:`build` gets at export; ``weights``: the flow checkpoint's :class:`~.weights.BlockLoader`."""
        return weights

    def runtime_weights(self, spec: GraphSpec, weights: Any) -> Any:
        """What :meth:`build` gets when a backend rebuilds exported graph ``spec`` in torch (``weights``: as above)."""
        return weights

    def manifest_extra(self, ctx: ExportContext, block: Optional[int], module: nn.Module) -> dict:
        """Extra fields of the graph's manifest entry (e.g. the SOS vector of step graphs)."""
        return {}

    # ------------------------------------------------------------------ tensors
    def example_inputs(self, infos: Sequence[TensorInfo], sizes: Mapping[str, int], geo: Geometry,
                       seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Tensors in ``infos`` order: real RoPE rows for RoPE inputs, seeded normal values otherwise."""
        from ..reference.rope import rope_table

        g = torch.Generator().manual_seed(seed)
        out = []
        for t in infos:
            shape = t.concrete(sizes)
            if t.name in ROPE_INPUTS:
                cos, sin = rope_table(geo.head_dim, 1, 1, shape[0], 0, geo.rope_length)
                out.append((cos if t.name == ROPE_COS else sin).contiguous())
            else:
                out.append(torch.randn(*shape, generator=g).to(TORCH_DTYPES[t.dtype]))
        return tuple(out)

    # ------------------------------------------------------------------ plan
    def plan(self, ctx: ExportContext, name: str, block: Optional[int], weights: Any) -> GraphPlan:
        """Graph ``name`` of ``block`` as export needs it (the one plan of every kind; not overridden)."""
        return GraphPlan(name=name, kind=self.kind, block=block,
                         make=lambda: self.build(ctx.geo, block, self.export_weights(ctx, weights)),
                         inputs=self.inputs(ctx, block), outputs=self.outputs(ctx, block),
                         dims=self.dims(ctx, block), example=self.example_sizes(ctx, block),
                         make_trt=(lambda: self.build_trt(ctx.geo, block, weights)) if self.trt_form else None,
                         manifest_extra=lambda module: self.manifest_extra(ctx, block, module))


# -------------------------------------------------------------------- registry
def _load_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True  # before importing: their modules call register_graph
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def register_graph(cls: type[GraphKind]) -> type[GraphKind]:
    """Class decorator: register a :class:`GraphKind` subclass under its ``kind``."""
    _load_builtins()
    if not cls.kind:
        raise ValueError(f"{cls.__name__} must set `kind`")
    if cls.kind in _KINDS:
        raise ValueError(f"graph kind {cls.kind!r} is already registered ({type(_KINDS[cls.kind]).__name__})")
    _KINDS[cls.kind] = cls()
    return cls


def unregister_graph(kind: str) -> None:
    """Remove a registered kind (tests, plug-ins)."""
    _KINDS.pop(kind, None)


def graph_kinds() -> list[GraphKind]:
    """Every registered kind (the manifest's graph order): the built-ins in :data:`BUILTIN_MODULES` order,
    then the others, each group in registration order."""
    _load_builtins()
    # whichever built-in module is imported first registers its kinds first (it loads the others mid-way)
    rank = {module: i for i, module in enumerate(BUILTIN_MODULES)}
    return sorted(_KINDS.values(), key=lambda kind: rank.get(type(kind).__module__, len(rank)))


def find_graph_kind(kind: str) -> Optional[GraphKind]:
    _load_builtins()
    return _KINDS.get(kind)


def graph_kind(kind: str) -> GraphKind:
    """The registered kind named ``kind`` (ManifestError if none is)."""
    found = find_graph_kind(kind)
    if found is None:
        raise ManifestError(f"graph kind {kind!r} is not registered here (known: {', '.join(_KINDS)}); "
                            "import the module that registers it or upgrade starflow-trt")
    return found


def plan_graphs(cfg: ModelConfig, geo: Geometry, limits: ExportLimits, weights,
                media: Optional[object] = None) -> list[GraphPlan]:
    """Every graph of every registered kind, with its contract, dims and example sizes."""
    ctx = ExportContext(cfg, geo, limits, media)
    plans = [kind.plan(ctx, name, block, weights) for kind in graph_kinds() for name, block in kind.instances(ctx)]
    names = [p.name for p in plans]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise StarflowError(f"graph name(s) {', '.join(dup)} are declared by more than one kind; rename one")
    return plans
