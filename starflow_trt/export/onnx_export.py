"""Export the stage graphs of a checkpoint to ONNX + ``manifest.json``.

Choices (also in the README):

* **Exporter**: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript),
  the default from torch 2.9; dynamic axes via ``Dim.AUTO``.
* **Opset 18**: parsed by TensorRT 8.6 → 11 (10.0 reads up to 20) and ORT. Attention
  stays decomposed (MatMul / Softmax): the opset-23 ``Attention`` op is poorly
  supported by TensorRT with KV outputs.
* One block at a time: the state dict is memory-mapped and only the exported
  block's tensors are touched, so a 7B checkpoint exports within 24 GB.
* Everything is written into a temp directory next to OUT_DIR and renamed at
  the end: an interrupted export leaves no OUT_DIR that looks complete.
"""

from __future__ import annotations

import gc
import inspect
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from .. import __version__
from ..checkpoint import load_state_dict, sha256_file, strip_wrapper_prefixes, validate_state_dict
from ..config import ModelConfig, load_config
from ..errors import StarflowError
from ..geometry import Geometry
from ..reference import build_model, infer_text_width
from ..reference.denoiser import Denoiser
from ..reference.flow import FlowBlock
from ..reference.model import deprecated_buffer_values
from ..reference.rope import rope_table
from .graphs import DenoiserGraph, ForwardGraph, StepGraph, TextPrefillGraph, kv_names
from .manifest import DimRange, GraphSpec, Manifest, TensorInfo, sha256_path, staged_directory

DEFAULT_OPSET = 18
SUPPORTED_OPSETS = range(17, 21)
EXPORTER = "torch.onnx.export(dynamo=True)"
TWO_GB = 2 * 1024 ** 3


@dataclass(frozen=True)
class ExportLimits:
    """Shape limits recorded as the graphs' max dims (TensorRT profiles come from them)."""

    max_batch: int = 4          # prompts per call (guidance doubles the deep batch)
    max_frames: Optional[int] = None  # latent frames (None: config's vid_size, or the window)
    opt_chunk: int = 64         # opt S of step graphs (a Jacobi chunk)
    height: Optional[int] = None  # token grid (None: config geometry)
    width: Optional[int] = None
    aspect: str = "16:9"        # VAE configs: frame aspect for the default grid


@dataclass
class _Plan:
    name: str
    kind: str
    block: Optional[int]
    make: Callable[[], nn.Module]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    dims: dict[str, DimRange]
    example: dict[str, int]
    params: int


KV_LAYOUT = "per layer past_k_l / past_v_l [P, batch, heads, head_dim] (new_k_l / new_v_l [S, …]), K after RoPE"


def geometry_for(cfg: ModelConfig, limits: ExportLimits) -> Geometry:
    """Token grid, sequence lengths and block layout recorded in the manifest."""
    frame = cfg.frame_geometry(limits.aspect)
    grid = (limits.height or frame["h"], limits.width or frame["w"])
    frames = limits.max_frames or max(cfg.latent_frames, cfg.local_attn_window or 0)
    return Geometry.from_config(cfg, grid, frames, limits.max_batch)


def _t(name: str, *shape, dtype: str = "float32") -> TensorInfo:
    return TensorInfo(name, dtype, tuple(shape))


def plan_graphs(cfg: ModelConfig, geo: Geometry, limits: ExportLimits,
                block_factory: Callable[[str], nn.Module]) -> list[_Plan]:
    """Every graph of the model with its contract, dims and example sizes."""
    c, hd, L, D = cfg.token_channels, cfg.head_dim, cfg.txt_size, cfg.text_width
    F, T, B = geo.tokens_per_frame, geo.max_frames, limits.max_batch
    h, w = geo.h, geo.w
    N = T * F
    opt_s = min(limits.opt_chunk, N)
    meta = build_model(cfg, "meta")
    nparams = lambda prefix: sum(p.numel() for k, p in meta.named_parameters() if k.startswith(prefix))
    plans: list[_Plan] = []
    top = cfg.top_index
    deep_batch = DimRange(1, 2, 2 * B)
    grid = {"h": DimRange(h, h, h), "w": DimRange(w, w, w)}
    ex_grid = {"h": h, "w": w}

    def kv(prefix: str, seq, k: int) -> list[TensorInfo]:
        """Per-layer K/V tensors ``{prefix}_k_l`` / ``{prefix}_v_l`` [seq, batch, heads, hd]."""
        return [_t(n, seq, "batch", cfg.block_heads(k), hd) for n in kv_names(cfg.layers[k], prefix)]

    def step_io(k: int) -> tuple[list[TensorInfo], list[TensorInfo]]:
        return ([_t("tokens", "batch", "S", c), _t("rope_cos", "S", hd), _t("rope_sin", "S", hd), *kv("past", "P", k)],
                [_t("scale", "batch", "S", c), _t("shift", "batch", "S", c), *kv("new", "S", k)])

    # deep block: text prefill + step
    plans.append(_Plan(
        "deep_prefill", "prefill", top, lambda: TextPrefillGraph(block_factory(f"blocks.{top}.")),
        [_t("text", "batch", L, D), _t("rope_cos", L, hd), _t("rope_sin", L, hd)],
        kv("new", L, top), {"batch": deep_batch}, {"batch": 3}, nparams(f"blocks.{top}.")))
    plans.append(_Plan(
        "deep_step", "step", top, lambda: StepGraph(block_factory(f"blocks.{top}.")), *step_io(top),
        {"batch": deep_batch, "S": DimRange(1, opt_s, N), "P": DimRange(0, L + N // 2, L + N)},
        {"batch": 3, "S": 5, "P": 7}, nparams(f"blocks.{top}.")))
    for k in geo.shallow_blocks:
        fb = DimRange(1, T, B * T)
        plans.append(_Plan(
            f"shallow_step_{k}", "step", k, lambda k=k: StepGraph(block_factory(f"blocks.{k}.")), *step_io(k),
            {"batch": fb, "S": DimRange(1, min(opt_s, F), F), "P": DimRange(0, F // 2, max(F - 1, 0))},
            {"batch": 3, "S": 5, "P": 7}, nparams(f"blocks.{k}.")))
    frames = DimRange(1, T, T)
    for k in range(cfg.num_blocks):
        if k != top and cfg.layers[k] == 0:
            continue  # identity block: nothing to run
        local = k != top and bool(cfg.shallow_block_local)
        has_text = cfg.block_has_text(k)
        rows = (F if local else N) + (L if has_text else 0)
        rows_min = (F if local else F) + (L if has_text else 0)
        inputs = [_t("x", "batch", "T", "h", "w", c), _t("rope_cos", "rows", hd), _t("rope_sin", "rows", hd)]
        if has_text:
            inputs.append(_t("text", "batch", L, D))
        logdet = _t("logdet", "batch", "T", "F", c) if local else _t("logdet", "batch", "N", c)
        ex = {"batch": 3, "T": 2, **ex_grid}
        ex["rows"] = (ex["h"] * ex["w"] if local else 2 * ex["h"] * ex["w"]) + (L if has_text else 0)
        plans.append(_Plan(
            f"forward_{k}", "forward", k, lambda k=k, local=local: ForwardGraph(block_factory(f"blocks.{k}."), local),
            inputs, [_t("z", "batch", "T", "h", "w", c), logdet],
            {"batch": DimRange(1, 1, B), "T": frames, **grid, "rows": DimRange(rows_min, rows, rows)},
            ex, nparams(f"blocks.{k}.")))
    if cfg.learnable_self_denoiser:
        dt = cfg.local_attn_window or T
        rows = L + dt * F
        plans.append(_Plan(
            "denoiser", "denoiser", None, lambda: DenoiserGraph(block_factory("learnable_self_denoiser.")),
            [_t("x", "batch", "T", "h", "w", c), _t("text", "batch", L, D),
             _t("rope_cos", "rows", hd), _t("rope_sin", "rows", hd)],
            [_t("d", "batch", "T", "h", "w", c)],
            {"batch": DimRange(1, 1, B), "T": DimRange(1, dt, dt), **grid, "rows": DimRange(L + F, rows, rows)},
            {"batch": 3, "T": 2, **ex_grid, "rows": L + 2 * ex_grid["h"] * ex_grid["w"]},
            nparams("learnable_self_denoiser.")))
    return plans


def _example_tensors(plan: _Plan, cfg: ModelConfig) -> tuple[torch.Tensor, ...]:
    """Inputs for tracing: random tokens, real RoPE rows, a random past."""
    g = torch.Generator().manual_seed(0)
    sizes = plan.example
    out = []
    for t in plan.inputs:
        shape = t.concrete(sizes)
        if t.name in ("rope_cos", "rope_sin"):
            cos, sin = rope_table(cfg.head_dim, 1, 1, shape[0], 0, cfg.rope_seq_len)
            out.append((cos if t.name == "rope_cos" else sin).contiguous())
        else:
            out.append(torch.randn(*shape, generator=g))
    return tuple(out)


class BlockLoader:
    """Builds one block (or the denoiser) with only its tensors taken from the state dict."""

    def __init__(self, cfg: ModelConfig, state: dict[str, torch.Tensor]):
        self.cfg = cfg
        self.state = state
        self.defaults = deprecated_buffer_values(cfg)

    def __call__(self, prefix: str) -> nn.Module:
        with torch.device("meta"):
            if prefix.startswith("learnable_self_denoiser"):
                module: nn.Module = Denoiser(self.cfg)
            else:
                module = FlowBlock(self.cfg, int(prefix.split(".")[1]))
        sub = {k[len(prefix):]: v for k, v in self.state.items() if k.startswith(prefix)}
        for k, v in self.defaults.items():
            if k.startswith(prefix):
                sub.setdefault(k[len(prefix):], v)
        sub = {k: v.float() for k, v in sub.items()}
        module.load_state_dict(sub, strict=True, assign=True)
        return module.eval().requires_grad_(False)


def _dynamic_shapes(plan: _Plan, module: nn.Module) -> tuple:
    """Positional, like the example args; a ``*past`` vararg gets its specs as one nested tuple."""
    auto = torch.export.Dim.AUTO
    specs = [{i: auto for i, d in enumerate(t.shape) if isinstance(d, str)} for t in plan.inputs]
    params = inspect.signature(module.forward).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        named = sum(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
        return (*specs[:named], tuple(specs[named:]))
    return tuple(specs)


def export_one(plan: _Plan, cfg: ModelConfig, directory: Path, opset: int, external_data: str,
               simplify: bool) -> tuple[GraphSpec, float]:
    """Export one planned graph into ``directory``; returns its spec and export seconds."""
    import onnx

    start = time.perf_counter()
    module = plan.make()
    sos = module.block.sos_embed.detach().flatten().tolist() if plan.kind == "step" else None
    args = _example_tensors(plan, cfg)
    path = directory / f"{plan.name}.onnx"
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    use_external = external_data == "always" or weight_bytes > TWO_GB - (64 << 20)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module, args, dynamo=True, opset_version=opset, dynamic_shapes=_dynamic_shapes(plan, module),
            input_names=[t.name for t in plan.inputs], output_names=[t.name for t in plan.outputs],
            optimize=True, verbose=False)
        program.save(path, external_data=use_external)
    del program, module, args
    gc.collect()
    if simplify:
        _simplify(path, use_external)
    # full checker + shape inference on every output (path-based: works past 2 GB)
    onnx.checker.check_model(str(path), full_check=True)
    inferred = directory / f".{plan.name}.inferred.onnx"
    onnx.shape_inference.infer_shapes_path(str(path), str(inferred), check_type=True, strict_mode=True)
    inferred.unlink()
    externals = sorted({e.location for e in _external_refs(path)}) if use_external else []
    spec = GraphSpec(name=plan.name, file=path.name, sha256=sha256_path(path), kind=plan.kind, block=plan.block,
                     precision="fp32", inputs=plan.inputs, outputs=plan.outputs, dims=plan.dims,
                     external_data=externals,
                     extra={"params": plan.params, "bytes": _dir_bytes(directory, [path.name, *externals])})
    if sos is not None:
        spec.extra["sos"] = sos  # the runtime feeds SOS as the first input token
    return spec, time.perf_counter() - start


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
                  progress: Optional[Callable[[str], None]] = None) -> tuple[Manifest, list[dict]]:
    """Export the stage graphs; returns the manifest and one summary row per graph.

    graphs: names to export (default all); ``external_data``: ``auto`` (only graphs
    over 2 GB) or ``always``.
    """
    if opset not in SUPPORTED_OPSETS:
        raise StarflowError(f"opset {opset} is not supported: choose 17-20 (TensorRT 10.0 parses up to 20)")
    if external_data not in ("auto", "always"):
        raise StarflowError(f"--external-data must be auto or always, got {external_data!r}")
    out = Path(out_dir)
    from ..staging import check_output_dir

    check_output_dir(out, force, inputs=[config, checkpoint])  # before any work: refuse, touch nothing
    cfg = config if isinstance(config, ModelConfig) else load_config(config)
    state = load_state_dict(checkpoint, mmap=True)
    state, _ = strip_wrapper_prefixes(state)
    cfg = infer_text_width(cfg, state)
    validate_state_dict(state, {k: tuple(v.shape) for k, v in build_model(cfg, "meta").state_dict().items()})
    geo = geometry_for(cfg, limits)
    plans = plan_graphs(cfg, geo, limits, BlockLoader(cfg, state))
    if graphs:
        unknown = sorted(set(graphs) - {p.name for p in plans})
        if unknown:
            raise StarflowError(f"unknown graph(s) {', '.join(unknown)}; choose from {', '.join(p.name for p in plans)}")
        plans = [p for p in plans if p.name in set(graphs)]
    rows = []
    with staged_directory(out, force=force, inputs=[config, checkpoint]) as tmp:
        specs = {}
        for i, plan in enumerate(plans):
            if progress:
                progress(f"[{i + 1}/{len(plans)}] {plan.name}")
            spec, seconds = export_one(plan, cfg, tmp, opset, external_data, simplify)
            spec.extra["export_seconds"] = round(seconds, 2)
            specs[plan.name] = spec
            rows.append({"graph": plan.name, "params": plan.params, "bytes": spec.extra["bytes"],
                         "seconds": round(seconds, 2)})
        manifest = Manifest(
            root=out, precision="fp32", config=cfg, config_hash=cfg.hash(),
            checkpoint={"file": Path(checkpoint).name, "path": str(Path(checkpoint).resolve()),
                        "sha256": sha256_file(checkpoint)},
            geometry=geo, opset=opset, exporter=EXPORTER, versions=_versions(), graphs=specs,
            extra={"simplified": simplify, "kv_layout": KV_LAYOUT})
        for spec in specs.values():
            spec.root = out
        manifest.save(tmp)
    return manifest, rows


def _versions() -> dict[str, str]:
    import onnx

    versions = {"starflow_trt": __version__, "torch": torch.__version__, "onnx": onnx.__version__}
    try:
        import onnxscript

        versions["onnxscript"] = onnxscript.__version__
    except ImportError:
        pass
    return versions
