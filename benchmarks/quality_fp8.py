"""Quality table FP32 / FP16 / INT8 (ORT and TensorRT placement) / FP8 on the toy and the bench config, the toy's
deep calls on held-out prompts, and the 7B FP8 projection (H100 / H200): ``python benchmarks/quality_fp8.py``.

Writes ``results/quality_fp8.json`` and ``results/quality_fp8.md``. Exports and calibrations are cached in
``benchmarks/.cache`` (shared with ``run.py``; ``quality_*`` subdirectories). Every number comes from ONNX
Runtime's CPU EP; the FP8 rows are the E4M3 rounding simulated there (calibration/qdq.py says what that does and
does not represent). The projection is a roofline on datasheet peaks: a projection, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch

from starflow_trt.bench.paths import BenchPaths, model_config_7b
from starflow_trt.bench.projection import ScheduleWork, fp8_projection_table
from starflow_trt.bench.run import FULL, _prepare
from starflow_trt.bench.workloads import schedule_quality
from starflow_trt.calibration import calibrate_directory
from starflow_trt.calibration.bf16 import simulated
from starflow_trt.config import load_config
from starflow_trt.export.manifest import load_manifest
from starflow_trt.runtime import Pipeline
from starflow_trt.runtime.backends import make_backend
from starflow_trt.staging import MANIFEST_NAME
from starflow_trt.toy import PROMPTS, load_bundled
from starflow_trt.toy.calibration import toy_calibration_set

HERE = Path(__file__).resolve().parent
#: (label, precision, calibrate_directory options): the Q/DQ bodies are calibrate's defaults (FP16 for
#: placement "trt" and FP8, FP32 for placement "ort")
VARIANTS = [("fp16", "fp16", {}), ("int8 ort", "int8", {"placement": "ort"}),
            ("int8 trt", "int8", {"placement": "trt"}), ("fp8", "fp8", {}),
            ("fp8 attention", "fp8", {"quantize_attention": True}),
            ("fp8 bf16 body", "fp8", {"high_precision_dtype": "bf16"}),
            ("int8 trt bf16 body", "int8", {"placement": "trt", "high_precision_dtype": "bf16"})]


def held_out_prompts(n: int, samples: int = 16) -> list[str]:
    """Toy prompts the calibration (``toy_calibration_set``: ``PROMPTS[7i mod len]``, i < samples) never saw."""
    used = {PROMPTS[(7 * i) % len(PROMPTS)] for i in range(samples)}
    return [p for p in PROMPTS if p not in used][:n]


def toy_export(cache: Path) -> Path:
    """The bundled toy's export in ``cache`` (as run.py makes it: batch up to 8)."""
    from starflow_trt.export.onnx_export import ExportLimits, export_graphs

    out = cache / "toy_graphs"
    if not (out / MANIFEST_NAME).exists():
        toy = load_bundled()
        export_graphs(toy.config_path, toy.checkpoint_path, out, limits=ExportLimits(max_batch=8), force=True)
    return out


def calibrate_all(src: Path, cache: Path, stem: str, toy: bool, log) -> dict[str, Path]:
    out = {}
    for label, precision, options in VARIANTS:
        dst = cache / f"quality_{stem}_{label.replace(' ', '_')}"
        if not (dst / MANIFEST_NAME).exists():
            log(f"{stem}: calibrating {label}")
            if toy:
                text, uncond, clips = toy_calibration_set(load_manifest(src), samples=16)
                kw = dict(text=text, uncond=uncond, eval_clips=clips, guidance=3.0)
            else:   # the bench config: random prompts like run.py (random weights are no quality target)
                geo = load_manifest(src).geometry
                y = torch.randn(4, geo.text_length, geo.text_width, generator=torch.Generator().manual_seed(7))
                kw = dict(text=y, uncond=torch.zeros_like(y), guidance=2.0)
            calibrate_directory(src, dst, precision, force=True, overwrite=True, log=lambda m: None, **options, **kw)
        out[label] = dst
    return out


def quality_row(label: str, directory: Path) -> dict:
    """The gate's numbers a calibrated directory's manifest records, as one row of the quality table."""
    m = load_manifest(directory)
    q, cal, quant = m.extra["quality"], m.extra["calibration"], m.extra.get("quantization") or {}
    return {"precision": label, "bpd_fp32": q["bpd_fp32"], "bpd": q["bpd"], "bpd_increase": q["bpd_increase"],
            "latent_psnr_db": q["latent_psnr_db"], "raw_latent_psnr_db": q["raw_latent_psnr_db"],
            "worst_graph_rel_l2": max(max(g["rel_l2"].values()) for g in q["graphs"].values()),
            "deep_step_rel_l2": max(q["graphs"]["deep_step"]["rel_l2"].values()),
            "residual_floor": cal.get("residual_floor", {}).get("value", 0.0),
            "gate_passed": q["gate"]["passed"], "gate_failures": q["gate"]["failures"],
            "placement": quant.get("placement"), "body": quant.get("body", m.precision),
            "attention": quant.get("attention")}


def quality_rows(dirs: dict[str, Path]) -> list[dict]:
    return [{"precision": "fp32", "bpd_increase": 0.0, "latent_psnr_db": float("inf")},
            *(quality_row(label, d) for label, d in dirs.items())]


def per_prompt_psnr(pipes: dict[str, Pipeline], texts, uncond, guidance: float, seed: int = 2024) -> dict:
    """Latent PSNR vs FP32 of each prompt's video (same noise), sorted, per precision: the toy's distribution
    (its autoregressive chain amplifies any rounding, so one mean hides which prompts move)."""
    from starflow_trt.calibration.calibrate import psnr

    ref = [pipes["fp32"].generate(texts[i:i + 1], uncond[i:i + 1], guidance=guidance, seed=seed).latents
           for i in range(len(texts))]
    out = {}
    for name, pipe in pipes.items():
        if name == "fp32":
            continue
        got = [pipe.generate(texts[i:i + 1], uncond[i:i + 1], guidance=guidance, seed=seed).latents
               for i in range(len(texts))]
        out[name] = sorted(round(psnr(g, r), 1) for g, r in zip(got, ref))
    return out


def ort_pipeline(directory: Path, stack: ExitStack) -> Pipeline:
    """``directory`` on ORT's CPU EP; BF16-bodied graphs through their FP32 simulation (calibration/bf16.py), as
    the gate ran them."""
    manifest = stack.enter_context(simulated(load_manifest(directory)))
    return stack.enter_context(Pipeline(manifest, make_backend("ort", manifest)))


def deep_calls(pipes: dict[str, Pipeline], texts, uncond, noise_shape, guidance: float, label: str) -> dict:
    """schedule_quality per precision: deep calls / tokens of every schedule, and the ratio to FP32."""
    out = {name: schedule_quality(p, texts, uncond, noise_shape, guidance, f"{label} {name}")["rows"]
           for name, p in pipes.items()}
    base = {r["schedule"]: r for r in out["fp32"]}
    for rows in out.values():
        for r in rows:
            r["deep_calls_vs_fp32"] = r["deep_calls"] / max(base[r["schedule"]]["deep_calls"], 1)
    return out


def markdown(result: dict) -> str:
    lines = ["# FP8 / INT8 / FP16 quality vs FP32 (ONNX Runtime CPU EP)", "",
             f"Measured {result['date']} on a shared 2-vCPU machine (seconds per part: {result['seconds']}). "
             "No TensorRT, no GPU.",
             ""]
    for model, rows in result["quality"].items():
        lines += [f"## {model}", "", "| precision | body | attention | bits/dim Δ | latent PSNR dB | worst graph rel L2 "
                  "| deep_step rel L2 | Jacobi floor | gate |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            if r["precision"] == "fp32":
                lines.append("| fp32 | fp32 | fp32 | 0 | ∞ | 0 | 0 | 0 | - |")
                continue
            gate = "pass" if r["gate_passed"] else "FAIL: " + "; ".join(r["gate_failures"])
            lines.append(f"| {r['precision']} | {r.get('body')} | {r.get('attention') or r.get('body')} | "
                         f"{r['bpd_increase']:+.5f} | {r['latent_psnr_db']:.1f} | {r['worst_graph_rel_l2']:.4f} | "
                         f"{r['deep_step_rel_l2']:.4f} | {r['residual_floor']:.2e} | {gate} |")
        lines.append("")
    if "psnr_per_prompt_toy" in result:
        lines += ["## Toy: latent PSNR vs FP32 per held-out prompt (dB, sorted)", "", "| precision | PSNR per prompt |",
                  "|---|---|"]
        lines += [f"| {name} | {' '.join(f'{v:.1f}' for v in values)} |"
                  for name, values in result["psnr_per_prompt_toy"].items()]
        lines.append("")
    for key, title in (("deep_calls_toy", "Toy: deep calls on held-out prompts"),
                       ("deep_calls_bench", "Bench config: deep calls over 8 prompts")):
        if key not in result:
            continue
        lines += [f"## {title} (ratio to FP32)", "", "| precision | schedule | deep calls | ratio | median dist to AR |",
                  "|---|---|---|---|---|"]
        for name, rows in result[key].items():
            for r in rows:
                lines.append(f"| {name} | {r['schedule']} | {r['deep_calls']} | {r['deep_calls_vs_fp32']:.2f} | "
                             f"{r['dist_median']:.3g} |")
        lines.append("")
    if "projection_fp8" not in result:
        return "\n".join(lines) + "\n"
    lines += ["## 7B on Hopper: PROJECTION (roofline on datasheet peaks, not a measurement)", "",
              "| GPU | schedule | GEMMs | K/V | s / video | K/V GB | weights GB | fits |", "|---|---|---|---|---|---|---|---|"]
    for r in result["projection_fp8"]:
        lines.append(f"| {r['gpu']} | {r['schedule']} | {r['precision']} | {r['kv_dtype']} | {r['seconds_per_video']:.1f} "
                     f"| {r['kv_cache_gb']:.1f} | {r['weights_gb']:.1f} | {r['fits_in_memory']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--held-out", type=int, default=8, help="toy held-out prompts for the deep-calls rows")
    ap.add_argument("--models", default="toy,bench", help="toy, bench or both (results merge into the JSON)")
    ap.add_argument("-o", "--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    models = set(args.models.split(","))
    start = time.perf_counter()
    paths = BenchPaths.under(args.out, HERE / ".cache")
    path = args.out / "quality_fp8.json"
    result = json.loads(path.read_text()) if path.exists() else {"quality": {}}
    with ExitStack() as stack:   # the pipelines' sessions and the BF16 simulations
        if "toy" in models:
            dirs = {"toy_graphs": toy_export(paths.cache)}
            toy_dirs = calibrate_all(dirs["toy_graphs"], paths.cache, "toy", True, print)
            result["quality"]["toy"] = quality_rows(toy_dirs)
            toy = load_bundled()
            prompts = held_out_prompts(args.held_out)
            pipes = {"fp32": ort_pipeline(dirs["toy_graphs"], stack),
                     **{k: ort_pipeline(v, stack) for k, v in toy_dirs.items()}}
            g = pipes["fp32"].geo
            print(f"toy: deep calls over {len(prompts)} held-out prompts")
            result["held_out_prompts"] = prompts
            texts, uncond = toy.encode(prompts), toy.encode([""] * len(prompts))
            result["deep_calls_toy"] = deep_calls(pipes, texts, uncond, (1, g.max_frames, 3, g.height, g.width), 3.0,
                                                  "toy")
            result["psnr_per_prompt_toy"] = per_prompt_psnr(pipes, texts, uncond, 3.0)
        if "bench" in models:
            dirs = _prepare(replace(FULL, int8=False, toy=False), paths, print)   # the bench-config export
            bench_dirs = calibrate_all(dirs["graphs"], paths.cache, "bench", False, print)
            result["quality"]["bench config"] = quality_rows(bench_dirs)
            bench = {"fp32": ort_pipeline(dirs["graphs"], stack),
                     **{k: ort_pipeline(bench_dirs[k], stack) for k in ("fp8", "fp8 attention", "fp8 bf16 body")}}
            bg = bench["fp32"].geo
            texts = torch.randn(8, bg.text_length, bg.text_width, generator=torch.Generator().manual_seed(3))   # as run.py
            print("bench config: deep calls over 8 prompts (the 7B projection's measured schedules)")
            result["deep_calls_bench"] = deep_calls(bench, texts, torch.zeros_like(texts),
                                                    (1, bg.max_frames, bg.channel_size, bg.height, bg.width), 2.0, "bench")
            tokens = bg.max_frames * bg.tokens_per_frame
            schedules = [ScheduleWork.from_counts(r["schedule"], r["deep_tokens"], r["deep_calls"], r["samples"] * tokens)
                         for r in result["deep_calls_bench"]["fp32"]]
            result["projection_schedules"] = [s.__dict__ for s in schedules]
            result["projection_fp8"] = fp8_projection_table(load_config(model_config_7b()), schedules)
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result.setdefault("seconds", {})[args.models] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=str))
    (args.out / "quality_fp8.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
