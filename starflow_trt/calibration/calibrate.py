"""``calibrate``: FP32 graph directory → complete INT8 / FP8 (Q/DQ) or FP16 / BF16 graph directory, gated on quality.

1. Capture the inputs every graph sees while the FP32 graphs sample videos (and score them).
2. INT8 / FP8: Q/DQ graphs calibrated on 3/4 of the captured calls, placed for ONNX Runtime's quantizer
   (``placement="ort"``, INT8 only) or by TensorRT's explicit-quantization rules (``"trt"``, :mod:`.qdq`);
   INT8 also gets a TensorRT calibration cache per graph from the same ranges. FP16 / BF16: mixed 16-bit / FP32
   graphs (BF16 for TensorRT: ORT's CPU EP runs its FP32 simulation for step 3, :mod:`.bf16`).
3. Quality gate on CPU with ORT: relative L2 error of every graph output vs FP32 on the
   held-out 1/4 of calls; bits/dim increase on held-out clips; PSNR of generated latents vs
   FP32 from the same noise and prompts. A failing gate writes nothing unless ``force``.
4. OUT gets its own manifest (precision per graph, the numbers under ``quality``), so
   ``Pipeline.from_dir(OUT, backend="ort")`` runs it as is (BF16 graphs or bodies: ``backend="trt"``).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..errors import StarflowError
from ..export.manifest import Manifest, load_manifest
from ..export.trt_variant import trt_variant_entry, variant_path
from ..staging import sha256_file, staged_directory
from ..reference.sampler import JacobiConfig
from .bf16 import SIMULATION, convert_bf16, simulated
from .capture import CaptureSet, capture_activations, iter_feeds
from .int8 import DEFAULT_EXCLUDE, load_ranges, quantize_graph, weight_quantized_matmuls
from .policy import QUANTIZED, graph_precision as policy_precision, policy_of
from .prompts import PromptSet, encode_prompt_set, template_options
from .qdq import BODY_DTYPES, WEIGHT_SCALES, qformat, quantize_graph_trt
from .trt_cache import write_cache


@dataclass(frozen=True)
class QualityGate:
    """Limits a calibrated directory must meet (per precision defaults in :func:`default_gate`)."""

    max_graph_error: float
    max_bpd_increase: float
    min_psnr_db: float


def default_gate(precision: str) -> QualityGate:
    """FP8's limits are issue 23's acceptance (bits/dim <= +0.002, latent PSNR >= 35 dB); its per-graph error
    allows E4M3's 3 mantissa bits: each quantized input is off by up to 2^-4 relative (about 3 % rms), both
    inputs of a GEMM are, and a flow block chains several GEMMs: ~0.1 at the block's output."""
    if precision == "fp16":
        return QualityGate(max_graph_error=0.01, max_bpd_increase=0.005, min_psnr_db=30.0)
    if precision == "bf16":   # FP16's limits with 3 fewer mantissa bits: 8x its rounding per graph
        return QualityGate(max_graph_error=0.08, max_bpd_increase=0.005, min_psnr_db=30.0)
    if precision == "fp8":
        return QualityGate(max_graph_error=0.15, max_bpd_increase=0.002, min_psnr_db=35.0)
    return QualityGate(max_graph_error=0.1, max_bpd_increase=0.02, min_psnr_db=20.0)


@dataclass(frozen=True)
class QdqOptions:
    """How a Q/DQ directory's graphs are placed and typed: ``placement`` (:data:`PLACEMENTS`), ``body`` dtype
    (:data:`.qdq.BODY_DTYPES`), FP8 weight scales per "tensor" or "channel", ``kv_fp8`` (K/V rounded to E4M3
    on write), ``attention`` (FP8 attention BMMs, :mod:`.qdq` rule 5)."""

    placement: str = "ort"
    body: str = "fp32"
    fp8_weights: str = "tensor"
    kv_fp8: bool = False
    attention: bool = False


#: calibration methods per quantized precision (FP8: amax, percentile as an option; modelopt's FP8 path is
#: max-calibrated too); the first is the default
METHODS_FOR = {"int8": ("entropy", "percentile", "minmax"), "fp8": ("minmax", "percentile")}
#: Q/DQ placements: "ort" (onnxruntime.quantization's QDQ quantizer), "trt" (TensorRT's rules, .qdq)
PLACEMENTS = ("trt", "ort")


def graph_errors(fp32_path: Path, new_path: Path, calls) -> dict[str, float]:
    """Relative L2 error ‖new − fp32‖ / ‖fp32‖ of every output over the held-out calls (ORT CPU)."""
    from ..runtime.backends.ort_backend import OrtBackend

    backend = OrtBackend()   # the runtime's session options, CPU EP
    a, b = backend.session(fp32_path), backend.session(new_path)
    names = [i.name for i in a.get_inputs()]
    outs = [o.name for o in a.get_outputs()]
    num = {o: 0.0 for o in outs}
    den = {o: 0.0 for o in outs}
    for feeds in iter_feeds(calls, names):
        for o, x, y in zip(outs, a.run(None, feeds), b.run(None, feeds)):
            num[o] += float(np.square(y.astype(np.float64) - x).sum())
            den[o] += float(np.square(x.astype(np.float64)).sum())
    return {o: math.sqrt(num[o] / max(den[o], 1e-30)) for o in outs}


def psnr(test: torch.Tensor, ref: torch.Tensor) -> float:
    """10·log10(range² / MSE), range = max − min of ``ref``."""
    mse = float((test.double() - ref.double()).pow(2).mean())
    peak = float(ref.max() - ref.min())
    return float("inf") if mse == 0 else 10 * math.log10(peak ** 2 / mse)


def calibrate_directory(src: Path, out: Path, precision: str = "int8", method: Optional[str] = None,
                        samples: Optional[int] = None, text: Optional[torch.Tensor] = None,
                        uncond: Optional[torch.Tensor] = None,
                        guidance: float = 3.0, jacobi: Optional[JacobiConfig] = JacobiConfig(),
                        exclude: Sequence[str] = DEFAULT_EXCLUDE, gate: Optional[QualityGate] = None,
                        eval_clips: Optional[tuple[torch.Tensor, torch.Tensor]] = None, max_calls: int = 48,
                        trt_version: str = "10.3.0", force: bool = False, overwrite: bool = False,
                        capture_dir: Optional[Path] = None, shard_bytes: int = 64 << 20,
                        placement: str = "ort", kv_dtype: Optional[str] = None,
                        log: Callable[[str], None] = print, prompts: Optional[PromptSet] = None,
                        high_precision_dtype: Optional[str] = None, fp8_weights: str = "tensor",
                        quantize_attention: bool = False) -> Manifest:
    """Calibrate ``src`` (FP32 graphs) into ``out``; see the module docstring.

    Calibration prompts: ``text`` / ``uncond`` embeddings [N, L, D], or ``prompts`` as text, encoded through the
    export's text encoder (:mod:`.prompts`: upstream's templates, uncond the template around ``""``); ``samples``
    takes the first N of either. ``method``: default the precision's first of :data:`METHODS_FOR`;
    ``placement``: of the Q/DQ (:data:`PLACEMENTS`; FP8 is always "trt"); ``kv_dtype="fp8"``: the step graphs
    also round the K/V they write to E4M3 (:func:`.qdq.quantize_kv_writes`; FP8 only).
    ``high_precision_dtype``: the body dtype of Q/DQ graphs (:data:`.qdq.BODY_DTYPES`; default "fp16" for FP8 and
    for placement "trt", "fp32" for placement "ort"); ``fp8_weights``: FP8 weight scales per "tensor" (default)
    or "channel" (:data:`.qdq.WEIGHT_SCALES`); ``quantize_attention``: FP8 attention BMMs by TensorRT's fused-MHA
    pattern (:mod:`.qdq` rule 5; FP8 only)."""
    from ..runtime.backends import make_backend
    from ..runtime.pipeline import Pipeline

    if precision not in ("int8", "fp16", "bf16", "fp8"):
        raise StarflowError(f"--precision must be int8, fp8, fp16 or bf16, got {precision!r}")
    placement = "trt" if precision == "fp8" else placement
    if placement not in PLACEMENTS:
        raise StarflowError(f"--placement must be one of {', '.join(PLACEMENTS)}, got {placement!r}")
    if precision in METHODS_FOR:
        method = method or METHODS_FOR[precision][0]
        if method not in METHODS_FOR[precision]:
            raise StarflowError(f"--method {method} does not apply to {precision}; use one of "
                                f"{', '.join(METHODS_FOR[precision])}")
    method = method or "entropy"
    body = high_precision_dtype or ("fp16" if placement == "trt" else "fp32")
    if precision in QUANTIZED and body not in BODY_DTYPES:
        raise StarflowError(f"--high-precision-dtype must be one of {', '.join(BODY_DTYPES)}, got {body!r}")
    if precision in QUANTIZED and placement == "ort" and body != "fp32":
        raise StarflowError(f"--high-precision-dtype {body} needs --placement trt (ONNX Runtime's quantizer writes "
                            "FP32 graphs)")
    if fp8_weights not in WEIGHT_SCALES:
        raise StarflowError(f"--fp8-weights must be one of {', '.join(WEIGHT_SCALES)}, got {fp8_weights!r}")
    if kv_dtype not in (None, "fp8") or (kv_dtype and precision != "fp8"):
        raise StarflowError(f"--kv-dtype {kv_dtype} needs --precision fp8 (the only K/V type besides the graphs' own)")
    if quantize_attention and precision != "fp8":
        raise StarflowError(f"--quantize-attention needs --precision fp8 (FP8 fused attention); {precision} keeps "
                            "attention in the body dtype")
    qdq = QdqOptions(placement, body, fp8_weights, kv_dtype == "fp8", quantize_attention)
    src, out = Path(src), Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise StarflowError(f"{out} exists and is not empty; choose another -o or remove it")
    manifest = load_manifest(src, verify=True)
    if manifest.precision != "fp32":
        raise StarflowError(f"{src} holds {manifest.precision} graphs; calibrate from the FP32 export")
    gate = gate or default_gate(precision)
    if text is None and prompts is None:
        raise StarflowError("no calibration prompts: pass --prompts FILE (one prompt a line; needs a text "
                            "encoder) or --text-embeddings (and --uncond for guidance) with the kind of prompts "
                            "the model will serve")
    if text is not None and prompts is not None:
        raise StarflowError("calibration prompts given twice: pass --prompts or --text-embeddings, not both")
    if text is not None:
        if guidance > 0 and uncond is None:
            raise StarflowError("guidance > 0 needs --uncond embeddings for calibration")
        if samples is not None:   # the first ``samples`` prompts (None: every row given)
            if samples < 1 or samples > text.shape[0]:
                raise StarflowError(f"--samples {samples} but --text-embeddings has {text.shape[0]} row(s); pass "
                                    f"at most {text.shape[0]} samples or more embedding rows")
            text, uncond = text[:samples], (uncond[:samples] if uncond is not None else None)
    else:
        prompts = prompts.first(samples)
    pipe32 = Pipeline(manifest, make_backend("ort", manifest))
    t0 = time.perf_counter()
    seeds = [1000]
    with pipe32.backend:
        if prompts is not None:
            text, uncond = encode_prompt_set(pipe32, prompts)
            prompt_record = {**prompts.record(), **template_options(pipe32)}
        else:
            prompt_record = {"source": "embeddings", "count": int(text.shape[0])}
        log(f"capturing graph inputs: {text.shape[0]} prompts ({prompt_record['source']}) x {len(seeds)} seed(s), "
            f"guidance {guidance}")
        captured = capture_activations(pipe32, text, uncond, seeds, guidance, jacobi, max_calls=max_calls)
    if capture_dir is not None:  # keep what the graphs saw, as size-bounded shards (reloadable with CaptureSet.load)
        index = captured.save(Path(capture_dir), shard_bytes)
        log(f"captured calls written to {capture_dir}: "
            + ", ".join(f"{g} {i['calls']}/{i['seen']} in {len(i['shards'])} shard(s)" for g, i in index["graphs"].items()))
    cal, held = captured.split(0.25)
    with staged_directory(out, force=overwrite, inputs=[src]) as tmp:
        from ..media.text import carry_tokenizer

        carry_tokenizer(manifest, tmp)   # prompts on OUT need the export's tokenizer
        new = _convert_graphs(manifest, tmp, precision, method, cal, exclude, trt_version, log, qdq)
        quality: dict = {"graphs": {}}
        floor: dict = {}
        with simulated(new) as gated:   # what ORT's CPU EP can run of the new graphs (a BF16 body: simulated)
            if gated is not new:
                quality["simulated"] = SIMULATION
            for name, spec in gated.graphs.items():
                if new.graph(name).precision == "fp32":   # kept as exported: nothing to gate
                    continue
                errs = graph_errors(manifest.graph(name).path, spec.path, held.calls.get(name, []))
                quality["graphs"][name] = {"rel_l2": errs, "calls": len(held.calls.get(name, []))}
                if spec.trt_path is not None:   # the twin TensorRT builds must compute what ORT gated
                    quality["graphs"][name]["trt_variant_rel_l2"] = graph_errors(spec.path, spec.trt_path,
                                                                                 held.calls.get(name, []))
            quality.update(_end_to_end(manifest, gated, text, uncond, guidance, jacobi, eval_clips,
                                       floor if precision in QUANTIZED else None))
        failures = _check_gate(quality, gate)
        quality["gate"] = {**asdict(gate), "passed": not failures, "failures": failures, "forced": bool(failures and force)}
        new.extra["quality"] = quality
        new.extra["calibration"] = {"precision": precision, "method": method, "exclude": list(exclude),
                                    "prompts": int(text.shape[0]), "prompt_set": prompt_record,
                                    "seeds": seeds, "guidance": guidance,
                                    "captured_calls": captured.seen, "seconds": round(time.perf_counter() - t0, 1),
                                    "source": str(src)}
        if precision == "int8":
            new.extra["calibration"]["trt_cache_versions"] = "TensorRT 8.x-10.x (implicit INT8)"
        if precision in QUANTIZED:   # which Q/DQ a directory holds (build --dry-run and verify read it)
            new.extra["quantization"] = quantization_record(precision, new, qdq)
            if kv_dtype:
                new.extra["quantization"]["kv_dtype"] = ("fp8 (E4M3-rounded on write; the ORT cache array stays "
                                                         "FP32: quality simulated, memory not saved)")
        if floor:
            new.extra["calibration"]["residual_floor"] = floor
            log(f"Jacobi residual floor of the {precision} graphs: {floor['value']:.2e}")
        if failures and not force:
            raise StarflowError(f"{precision} graphs fail the quality gate ({'; '.join(failures)}); nothing written. "
                                "Loosen --exclude, try another --method, or pass --ignore-gate to write them anyway")
        new.save(tmp)
    return new.relocate(out)


def quantization_record(precision: str, manifest: Manifest, qdq: QdqOptions) -> dict:
    """The manifest's ``quantization`` entry: placement, Q/DQ element type, opset of the Q/DQ graphs, their body
    dtype, (placement "trt") how weights are scaled and what the attention BMMs compute in."""
    opsets = sorted({s.extra.get("conversion", {}).get("opset") for s in manifest.graphs.values()} - {None})
    record = {"placement": qdq.placement, "format": qformat(precision).name,
              "opset": opsets[-1] if opsets else None,
              "rules": "starflow_trt/calibration/qdq.py" if qdq.placement == "trt" else "onnxruntime.quantization QDQ",
              "body": qdq.body}
    if qdq.placement == "trt":
        record["weight_scale"] = qdq.fp8_weights if precision == "fp8" else "channel"
        record["attention"] = precision if qdq.attention else qdq.body
    return record


def _convert_graphs(manifest: Manifest, tmp: Path, precision: str, method: str, cal: CaptureSet,
                    exclude: Sequence[str], trt_version: str, log, qdq: QdqOptions = QdqOptions()) -> Manifest:
    """Every graph of ``manifest`` converted into ``tmp`` per the precision policy, each graph's TensorRT
    fused-attention twin (``trt_variant``) by the same rules from the same calibration calls."""
    new = manifest.derive(tmp, precision=precision)
    for name, spec in manifest.graphs.items():
        calls = cal.calls.get(name, [])
        policy = policy_of(spec.kind)   # an unknown kind gets the defaults
        decision = policy_precision(spec.kind, precision, called=bool(calls))
        if decision.precision in QUANTIZED:
            log(f"  {decision.precision} {name}: {len(calls)} calibration calls ({qdq.placement} placement)")
        elif decision.precision in ("fp16", "bf16"):
            log(f"  {decision.precision} {name}")
        else:
            log(f"  {name}: kept fp32 ({decision.reason})")

        def convert(src: Path, dst: Path, cache: bool) -> dict:
            return _convert_graph(src, dst, decision.precision, calls, method, (*exclude, *policy.exclude),
                                  policy.fp16_modules, trt_version if cache else None, qdq)

        dst = tmp / spec.file
        info = convert(spec.path, dst, cache=True)
        twin = None
        if spec.trt_variant:   # the fused-attention form, converted by the same rules from the same calls
            twin_dst = variant_path(dst)
            twin_info = convert(spec.trt_path, twin_dst, cache=False)
            twin = {**trt_variant_entry(twin_dst, []), "form": spec.trt_variant["form"], "conversion": twin_info}
        graph_precision = decision.precision if decision.precision in (*QUANTIZED, "fp16", "bf16") else "fp32"
        new.graphs[name] = spec.derive(root=tmp, precision=graph_precision, sha256=sha256_file(dst),
                                       trt_variant=twin,
                                       extra={**spec.extra, "conversion": info, "precision_policy": decision.reason})
    return new


def _convert_graph(src: Path, dst: Path, precision: str, calls, method: str, exclude: Sequence[str],
                   fp16_modules: Sequence[str], trt_version: Optional[str], qdq: QdqOptions) -> dict:
    """Write ``src`` converted to ``precision`` (a :func:`policy_precision` decision) at ``dst``; the conversion
    record. ``trt_version``: also write the INT8 graph's implicit-INT8 calibration cache (None: not)."""
    from .fp16 import convert_fp16

    if precision in QUANTIZED:
        ranges = dst.with_name(dst.name[: -len(".onnx")] + ".ranges.json")
        if qdq.placement == "ort":
            info = quantize_graph(src, dst, calls, method, exclude, ranges_path=ranges)
        else:
            info = quantize_graph_trt(src, dst, calls, precision, method, exclude, ranges_path=ranges,
                                      kv_fp8=qdq.kv_fp8, body=qdq.body, weight_scale=qdq.fp8_weights,
                                      fp16_modules=fp16_modules, attention=qdq.attention)
        if precision == "int8" and trt_version:   # implicit-INT8 caches have no FP8 counterpart
            cache = write_cache(dst.with_name(dst.name[: -len(".onnx")] + ".calib.cache"), load_ranges(ranges),
                                method, trt_version)
            info["trt_calibration_cache"] = cache.name
        hits, total = weight_quantized_matmuls(dst)
        info.update({"weight_qdq_matmuls": hits, "matmuls": total})
        ranges.unlink()
        return info
    if precision == "fp16":
        return convert_fp16(src, dst, fp16_modules)
    if precision == "bf16":
        return convert_bf16(src, dst, fp16_modules)
    shutil.copy2(src, dst)
    return {}


def _end_to_end(m32: Manifest, mq: Manifest, text, uncond, guidance, jacobi, eval_clips,
                floor: Optional[dict] = None) -> dict:
    """bits/dim increase and latent PSNR of the new graphs vs FP32 (ORT CPU, same inputs).

    ``floor``: filled with the new graphs' Jacobi residual floor (:mod:`.floor`), measured first
    so that the comparison runs with the floor the runtime will use."""
    from ..runtime.backends import make_backend
    from ..runtime.pipeline import Pipeline
    from .floor import measure_residual_floor

    with make_backend("ort", m32) as b32, make_backend("ort", mq) as bq:
        pq = Pipeline(mq, bq)
        if floor is not None and jacobi is not None:
            floor.update(measure_residual_floor(pq, text, uncond, guidance, jacobi.block_size))
            pq.spec = dataclasses.replace(pq.spec, residual_floor=floor["value"])
        return _compare(Pipeline(m32, b32), pq, text, uncond, guidance, jacobi, eval_clips)


def _compare(p32, pq, text, uncond, guidance, jacobi, eval_clips) -> dict:
    """The numbers of :func:`_end_to_end` from the FP32 and the new pipeline."""
    m32 = p32.manifest
    batch = m32.geometry.max_batch
    y, u = text[:batch], (uncond[:batch] if uncond is not None else None)
    kwargs = dict(guidance=guidance, jacobi=jacobi, seed=2024)
    a, b = p32.generate(y, u, **kwargs), pq.generate(y, u, **kwargs)
    if eval_clips is None:  # the model's own samples from seeds never used in calibration
        eval_clips = (p32.generate(y, u, guidance=guidance, jacobi=jacobi, seed=4242).raw, y)
    x, ey = eval_clips
    bpd32 = torch.cat([p32.score(x[i:i + batch], ey[i:i + batch])[1] for i in range(0, len(x), batch)])
    bpdq = torch.cat([pq.score(x[i:i + batch], ey[i:i + batch])[1] for i in range(0, len(x), batch)])
    return {"bpd_fp32": float(bpd32.mean()), "bpd": float(bpdq.mean()),
            "bpd_increase": float(bpdq.mean() - bpd32.mean()), "eval_clips": int(len(x)),
            "latent_psnr_db": psnr(b.latents, a.latents), "raw_latent_psnr_db": psnr(b.raw, a.raw)}


def _check_gate(quality: dict, gate: QualityGate) -> list[str]:
    failures = []
    for name, g in quality["graphs"].items():
        worst = max(g["rel_l2"].values()) if g["rel_l2"] else 0.0
        if not worst <= gate.max_graph_error:  # NaN fails
            failures.append(f"{name} rel error {worst:.3g} > {gate.max_graph_error}")
        twin = max(g.get("trt_variant_rel_l2", {}).values(), default=0.0)
        if not twin <= gate.max_graph_error:
            failures.append(f"{name}'s TensorRT twin differs from it by {twin:.3g} > {gate.max_graph_error}")
    if not quality["bpd_increase"] <= gate.max_bpd_increase:
        failures.append(f"bits/dim +{quality['bpd_increase']:.4f} > {gate.max_bpd_increase}")
    if not quality["latent_psnr_db"] >= gate.min_psnr_db:
        failures.append(f"latent PSNR {quality['latent_psnr_db']:.1f} dB < {gate.min_psnr_db}")
    return failures
