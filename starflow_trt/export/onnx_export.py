"""Export the stage graphs of a checkpoint to ONNX + ``manifest.json``.

Choices (also in the README):

* **Exporter**: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript),
  the default from torch 2.9; dynamic axes via ``Dim.AUTO``.
* **Opset 18**: parsed by TensorRT 8.6 → 11 (10.0 reads up to 20) and ORT. Attention
  stays decomposed (MatMul / Softmax): the opset-23 ``Attention`` op is poorly
  supported by TensorRT with KV outputs.
* One block at a time: the state dict is memory-mapped and only the exported
  block's tensors are touched, so a 7B checkpoint exports within 24 GB.
* Weights the exporter folds into strided views (each Linear's ``Transpose(W)``) are written through
  a contiguous torch copy, one tensor at a time (:func:`_contiguous_weights`): the same bytes, but
  numpy's ``tofile`` walks a strided view element by element (half of a 2 GB graph's export time).
* ``limits.dtype`` fp16 / bf16: the Linear weights and the K/V in that dtype (half-size
  files and caches), FP32 islands in the reference layers (norms, softmax, RoPE, the affine
  head); graph inputs other than K/V and the scale / shift / z / logdet outputs stay float32.
  Weights are converted tensor by tensor from the checkpoint's dtype (:mod:`.weights`).
* ``trt_variants``: the step / prefill graphs are traced a second time in TensorRT's fused-attention
  form (``<name>.trt.onnx``, :mod:`.trt_variant`), checked for the form in every layer, recorded as
  the graph's ``trt_variant``; over 2 GB it shares the portable graph's external data file.
* Everything is written into a temp directory next to OUT_DIR and renamed at
  the end: an interrupted export leaves no OUT_DIR that looks complete.
* Which graphs, their IO, dims and example inputs come from the graph registry
  (:mod:`.registry`, kinds in :mod:`.kinds`); this module only traces and checks them.
"""

from __future__ import annotations

import gc
import inspect
import os
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from .. import __version__
from ..config import ModelConfig, load_config
from ..errors import StarflowError
from ..geometry import Geometry
from ..reference import load_weights
from .limits import ExportLimits, geometry_for
from ..staging import sha256_file, staged_directory
from .manifest import GraphSpec, Manifest, TensorInfo
from .registry import GraphPlan, graph_kind, plan_graphs
from .weights import BlockLoader

__all__ = ["ExportLimits", "geometry_for", "plan_graphs", "BlockLoader", "trace_onnx", "export_one", "export_graphs"]

DEFAULT_OPSET = 18
SUPPORTED_OPSETS = range(17, 21)
EXPORTER = "torch.onnx.export(dynamo=True)"
TWO_GB = 2 * 1024 ** 3
#: graph kinds exported in ``limits.dtype`` (the media graphs stay float32)
HALF_KINDS = ("prefill", "step", "forward", "denoiser")
KV_LAYOUT = "per layer past_k_l / past_v_l [P, batch, heads, head_dim] (new_k_l / new_v_l [S, …]), K after RoPE"


def dynamic_axes(inputs: Sequence[TensorInfo]) -> list[list[int]]:
    """Per input: the indices of its symbolic dims (the axes exported dynamic)."""
    return [[i for i, d in enumerate(t.shape) if isinstance(d, str)] for t in inputs]


def _dynamic_shapes(module: nn.Module, axes: Sequence[Sequence[int]]) -> tuple:
    """Positional, like the example args; a ``*past`` vararg gets its specs as one nested tuple."""
    auto = torch.export.Dim.AUTO
    specs = [{i: auto for i in a} for a in axes]
    params = inspect.signature(module.forward).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        named = sum(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
        return (*specs[:named], tuple(specs[named:]))
    return tuple(specs)


def trace_onnx(module: nn.Module, args: Sequence[torch.Tensor], path: Path, input_names: Sequence[str],
               output_names: Sequence[str], axes: Sequence[Sequence[int]], opset: int = DEFAULT_OPSET,
               external: bool = False) -> None:
    """``module(*args)`` → ``path`` with the project's exporter choices (module docstring); ``axes[i]``: the
    dynamic axes of input ``i``. Every dynamic axis needs an example size >= 2 (a size-1 axis is specialised)."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, tuple(args), dynamo=True, opset_version=opset, dynamic_shapes=_dynamic_shapes(module, axes),
            input_names=list(input_names), output_names=list(output_names), optimize=True, verbose=False)
        _contiguous_weights(program.model)
        program.save(path, external_data=external)
    del program
    gc.collect()


def _contiguous_weights(model) -> None:
    """Have every strided initializer written through a contiguous copy made by torch, one tensor at a time.

    The exporter folds each Linear's ``Transpose(W)`` into a strided numpy view of the checkpoint, and
    ``ndarray.tofile`` walks such a view element by element: ~60 MB/s measured, half of a 2 GB export's time.
    torch's copy kernel transposes it in blocks (~1 GB/s). The bytes written are the same (C order)."""
    import numpy as np
    import onnx_ir as ir

    for value in model.graph.initializers.values():
        tensor = value.const_value
        if type(tensor) is ir.Tensor and isinstance(tensor.raw, np.ndarray) and not tensor.raw.flags.c_contiguous:
            value.const_value = ir.LazyTensor(partial(_contiguous_copy, tensor.raw, tensor.dtype, tensor.name),
                                              dtype=tensor.dtype, shape=tensor.shape, name=tensor.name,
                                              doc_string=tensor.doc_string, metadata_props=tensor.metadata_props)


def _contiguous_copy(raw, dtype, name: Optional[str]):
    """``raw`` (a strided ndarray) in C order, as an ``onnx_ir`` tensor."""
    import numpy as np
    import onnx_ir as ir

    same_size = {1: np.int8, 2: np.int16, 4: np.int32, 8: np.int64}.get(raw.dtype.itemsize)
    if same_size is None or any(st < 0 for st in raw.strides):
        return ir.Tensor(np.ascontiguousarray(raw), dtype=dtype, name=name)
    # through a same-size integer view: torch has no twin of numpy's ml_dtypes (bfloat16, float8)
    copy = torch.from_numpy(raw.view(same_size)).contiguous().numpy().view(raw.dtype)
    return ir.Tensor(copy, dtype=dtype, name=name)


def export_one(plan: GraphPlan, geo: Geometry, directory: Path, opset: int, external_data: str,
               simplify: bool, precision: str = "fp32", trt_variant: bool = False) -> tuple[GraphSpec, float]:
    """Export one planned graph into ``directory``; returns its spec and export seconds.

    ``trt_variant``: also trace the kind's TensorRT form (:mod:`.trt_variant`) into ``<name>.trt.onnx``
    and record it as the spec's ``trt_variant`` (kinds without one: ignored).
    """
    start = time.perf_counter()
    kind = graph_kind(plan.kind)
    module = plan.make()
    extra = plan.manifest_extra(module)
    params = sum(p.numel() for p in module.parameters())
    path = directory / f"{plan.name}.onnx"
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    use_external = external_data == "always" or weight_bytes > TWO_GB - (64 << 20)
    _write_graph(module, plan, geo, path, opset, use_external, simplify)
    del module
    _check_graph(path)
    externals = sorted({e.location for e in _external_refs(path)}) if use_external else []
    spec = GraphSpec(name=plan.name, file=path.name, sha256=sha256_file(path), kind=plan.kind, block=plan.block,
                     precision=precision, inputs=plan.inputs, outputs=plan.outputs, dims=plan.dims,
                     external_data=externals,
                     extra={"params": params, "bytes": _dir_bytes(directory, [path.name, *externals]), **extra})
    if trt_variant and plan.make_trt is not None:
        spec.trt_variant = _export_trt_variant(plan, geo, path, opset, use_external, simplify)
    return spec, time.perf_counter() - start


def _write_graph(module: nn.Module, plan: GraphPlan, geo: Geometry, path: Path, opset: int, use_external: bool,
                 simplify: bool) -> None:
    """Trace ``module`` on the plan's example inputs and save it (IO names and dynamic dims from the plan)."""
    args = graph_kind(plan.kind).example_inputs(plan.inputs, plan.example, geo)
    trace_onnx(module, args, path, [t.name for t in plan.inputs], [t.name for t in plan.outputs],
               dynamic_axes(plan.inputs), opset, use_external)
    del args
    gc.collect()
    if simplify:
        _simplify(path, use_external)


def _check_graph(path: Path) -> None:
    """Full checker + strict shape inference on every output (path-based: works past 2 GB)."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    inferred = path.with_name(f".{path.name}.inferred.onnx")
    onnx.shape_inference.infer_shapes_path(str(path), str(inferred), check_type=True, strict_mode=True)
    inferred.unlink()


def _export_trt_variant(plan: GraphPlan, geo: Geometry, portable: Path, opset: int, use_external: bool,
                        simplify: bool) -> dict:
    """Trace the plan's TensorRT form beside ``portable`` (sharing its external data); its manifest record.

    Refuses (StarflowError) a traced graph whose attention is not in the form in every layer
    (an exporter or simplifier that rewrote it)."""
    import onnx

    from .trt_variant import form_problems, share_external_data, trt_variant_entry, variant_path

    kind = graph_kind(plan.kind)
    dst = variant_path(portable)
    _write_graph(plan.make_trt(), plan, geo, dst, opset, use_external, simplify)
    if use_external:
        share_external_data(dst, portable)
    _check_graph(dst)
    attended, past = kind.trt_attention(geo.blocks[plan.block].layers)
    problems = form_problems(onnx.load(str(dst), load_external_data=False), geo.blocks[plan.block].layers,
                             geo.head_dim, past, attended)
    if problems:
        raise StarflowError(f"{dst.name} is not in TensorRT's fused-attention form: {'; '.join(problems)}")
    return trt_variant_entry(dst, sorted({e.location for e in _external_refs(dst)}) if use_external else [])


@dataclass
class _ExtRef:
    location: str


def _external_refs(path: Path) -> list[_ExtRef]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    refs = []
    for init in model.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                refs.append(_ExtRef(entry.value))
    return refs


def _dir_bytes(directory: Path, names: Iterable[str]) -> int:
    return sum((directory / n).stat().st_size for n in names if (directory / n).exists())


def _simplify(path: Path, external: bool) -> None:
    """onnxslim in place (a maintained simplifier); parity tests cover its output too."""
    try:
        import onnxslim
    except ImportError as exc:
        raise StarflowError("--simplify needs onnxslim: pip install 'starflow-trt[cpu]'") from exc
    import onnx

    model = onnxslim.slim(str(path))
    onnx.save(model, str(path), save_as_external_data=external,
              location=f"{path.name}.data" if external else None)


def export_graphs(config: Union[str, os.PathLike, ModelConfig], checkpoint: Union[str, os.PathLike],
                  out_dir: Union[str, os.PathLike], graphs: Optional[Sequence[str]] = None,
                  opset: int = DEFAULT_OPSET, external_data: str = "auto", simplify: bool = False,
                  limits: ExportLimits = ExportLimits(), force: bool = False,
                  progress: Optional[Callable[[str], None]] = None,
                  text_encoder: Optional[Union[str, os.PathLike]] = None,
                  vae: Optional[Union[str, os.PathLike]] = None,
                  trt_variants: bool = False) -> tuple[Manifest, list[dict]]:
    """Export the stage graphs; returns the manifest and one summary row per graph.

    ``trt_variants``: also write the step / prefill graphs in TensorRT's fused-attention form
    (``<name>.trt.onnx``, the manifest's ``trt_variant``, what ``build`` parses; :mod:`.trt_variant`).

    graphs: names to export (default all); ``external_data``: ``auto`` (only graphs
    over 2 GB) or ``always``. ``text_encoder`` (a local Hugging Face T5 directory) and
    ``vae`` (upstream's ``Wan2.2_VAE.pth`` or a diffusers directory) add the media graphs;
    the tokenizer files are copied into ``OUT/tokenizer``.
    """
    if opset not in SUPPORTED_OPSETS:
        raise StarflowError(f"opset {opset} is not supported: choose 17-20 (TensorRT 10.0 parses up to 20)")
    if external_data not in ("auto", "always"):
        raise StarflowError(f"--external-data must be auto or always, got {external_data!r}")
    out = Path(out_dir)
    from ..staging import check_output_dir

    media_inputs = [p for p in (text_encoder, vae) if p]
    check_output_dir(out, force, inputs=[config, checkpoint, *media_inputs])  # before any work: refuse, touch nothing
    cfg, geo, plans = _plans(config, checkpoint, graphs, limits, text_encoder, vae)
    rows = []
    with staged_directory(out, force=force, inputs=[config, checkpoint, *media_inputs]) as tmp:
        if text_encoder and any(p.kind == "text_encoder" for p in plans):   # T5: its tokenizer files
            from ..media.text import copy_tokenizer
            from .names import TOKENIZER_DIR

            copy_tokenizer(text_encoder, tmp / TOKENIZER_DIR)
        specs = {}
        for i, plan in enumerate(plans):
            if progress:
                progress(f"[{i + 1}/{len(plans)}] {plan.name}")
            precision = limits.dtype if graph_kind(plan.kind).kind in HALF_KINDS else "fp32"
            spec, seconds = export_one(plan, geo, tmp, opset, external_data, simplify, precision, trt_variants)
            spec.extra["export_seconds"] = round(seconds, 2)
            specs[plan.name] = spec
            rows.append({"graph": plan.name, "params": spec.extra["params"], "bytes": spec.extra["bytes"],
                         "seconds": round(seconds, 2)})
        manifest = _manifest(out, cfg, geo, checkpoint, limits, opset, specs, simplify)
        manifest.save(tmp)
    return manifest, rows


def _plans(config, checkpoint, graphs: Optional[Sequence[str]], limits: ExportLimits, text_encoder=None, vae=None
           ) -> tuple[ModelConfig, Geometry, list[GraphPlan]]:
    """The checked config, the geometry and the plans of the graphs to export (``graphs``: names, None: all)."""
    cfg = config if isinstance(config, ModelConfig) else load_config(config)
    cfg, state, _ = load_weights(cfg, checkpoint, text_encoder)
    geo = geometry_for(cfg, limits)
    from .media_kinds import MediaSources

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[limits.dtype]
    plans = plan_graphs(cfg, geo, limits, BlockLoader(cfg, state, dtype), MediaSources(text_encoder, vae))
    if graphs:
        unknown = sorted(set(graphs) - {p.name for p in plans})
        if unknown:
            raise StarflowError(f"unknown graph(s) {', '.join(unknown)}; choose from {', '.join(p.name for p in plans)}")
        plans = [p for p in plans if p.name in set(graphs)]
    return cfg, geo, plans


def _manifest(root: Path, cfg: ModelConfig, geo: Geometry, checkpoint, limits: ExportLimits, opset: int,
              specs: dict[str, GraphSpec], simplify: bool) -> Manifest:
    manifest = Manifest(
        root=root, precision=limits.dtype, config=cfg, config_hash=cfg.hash(),
        checkpoint={"file": Path(checkpoint).name, "path": str(Path(checkpoint).resolve()),
                    "sha256": sha256_file(checkpoint)},
        geometry=geo, opset=opset, exporter=EXPORTER, versions=_versions(), graphs=specs,
        extra={"simplified": simplify, "kv_layout": KV_LAYOUT})
    for spec in specs.values():
        spec.root = root
    return manifest


def graphless_manifest(config: Union[str, os.PathLike, ModelConfig], checkpoint: Union[str, os.PathLike],
                       limits: ExportLimits = ExportLimits(), graphs: Optional[Sequence[str]] = None) -> Manifest:
    """The manifest :func:`export_graphs` would write, in memory and without ONNX files: what
    ``backend="torch"`` needs (``Pipeline(graphless_manifest(...), TorchBackend(...))``), in seconds
    instead of an export's minutes. Media graphs are left out (they need their source weights)."""
    cfg, geo, plans = _plans(config, checkpoint, graphs, limits)
    specs = {}
    for plan in plans:
        kind = graph_kind(plan.kind)
        precision = limits.dtype if kind.kind in HALF_KINDS else "fp32"
        specs[plan.name] = GraphSpec(name=plan.name, file="", sha256="", kind=plan.kind, block=plan.block,
                                     precision=precision, inputs=plan.inputs, outputs=plan.outputs, dims=plan.dims,
                                     extra=plan.manifest_extra(plan.make()))
    return _manifest(Path(checkpoint).parent, cfg, geo, checkpoint, limits, DEFAULT_OPSET, specs, False)


def _versions() -> dict[str, str]:
    import onnx

    versions = {"starflow_trt": __version__, "torch": torch.__version__, "onnx": onnx.__version__}
    try:
        import onnxscript

        versions["onnxscript"] = onnxscript.__version__
    except ImportError:
        pass
    return versions
