"""Benchmark results → JSON, markdown tables and PNG bar charts (drawn with OpenCV when installed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> list[str]:
    out = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        out.append("| " + " | ".join(format(r.get(k, ""), f) if r.get(k) is not None and f else str(r.get(k, ""))
                                     for _, k, f in columns) + " |")
    return out


def _time_cell(r: dict) -> str:
    """``median [min-max]``, or the error of a row that could not run."""
    if r.get("error"):
        return f"error: {r['error']}"
    return f"{r['s_median']:.3f} [{r['s_min']:.3f}-{r['s_max']:.3f}]"


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Benchmark results", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, onnxruntime {m.get('onnxruntime')}. "
             f"Measured peak fp32 GEMM {result['roofline']['peak_gemm_gflops']:.0f} GFLOP/s, copy bandwidth "
             f"{result['roofline']['bandwidth_gbs']:.1f} GB/s. Medians of {result['runs']} runs after warm-up "
             f"(min-max in brackets).", ""]
    if result.get("plan", {}).get("quick"):
        lines += ["**Quick run** (`starflow-trt bench --quick`): a smoke run at small shapes, one timed run; "
                  "not the published figures.", ""]
    for name, rows in result["end_to_end"].items():
        lines += [f"## End to end: {name}", ""]
        lines += markdown_table([{**r, "time": _time_cell(r)} for r in rows],
                                [("backend", "backend", ""), ("precision", "precision", ""),
                                 ("schedule", "schedule", ""), ("seconds", "time", ""),
                                 ("first run s", "s_first", ".2f"),
                                 ("× vs reference", "speedup_vs_reference_upstream", ".2f"),
                                 ("deep calls", "deep_calls", ""), ("deep tokens", "deep_tokens", ""),
                                 ("graph calls", "calls", ""), ("rel. L2 to AR", "dist_to_ar", ".2e")])
        winners = [r for r in rows[1:] if r.get("s_median") and r["s_median"] < rows[0]["s_median"]
                   and r["backend"] not in ("ORT", "ORT INT8")]
        lines += [f"\n**A peer wins**: {r['backend']} is faster than the eager reference." for r in winners]
        lines.append("")
    for name, rows in result.get("cpu_modes", {}).items():
        peaks = result["roofline"].get("peak_gops", {})
        lines += [f"## CPU modes: {name} (default schedule; × vs {rows[0]['base']})", "",
                  "Measured GEMM peaks here: " + ", ".join(f"{k} {v:.1f} GOP/s" for k, v in peaks.items())
                  + ". Deep step: B = 2, S = 64 after half the video; bits/dim: the autoregressive result scored "
                  "by the mode, minus ORT FP32's.", ""]
        lines += markdown_table([{**r, "time": _time_cell(r)} for r in rows],
                                [("mode", "mode", ""), ("kernel here", "kernel", ""), ("seconds", "time", ""),
                                 ("×", "speedup", ".2f"), ("deep calls", "deep_calls", ""),
                                 ("rel. L2 to AR", "dist_to_ar", ".2e"), ("Δ bits/dim", "bpd_change", "+.2e"),
                                 ("deep step ms", "deep_step_ms", ".1f"), ("GOP/s", "deep_step_gops", ".1f"),
                                 ("of dtype peak", "fraction_of_peak", ".0%")])
        lines.append("")
    for name, q in result.get("schedule_quality", {}).items():
        lines += [f"## Schedules over {q['rows'][0]['samples']} samples: {name} ({q['pipeline']}, "
                  f"guidance {q['guidance']:g}, block {q['block']}, threshold {q['threshold']:g})", ""]
        lines += markdown_table(q["rows"], [("schedule", "schedule", ""),
                                            ("rel. L2 to AR: median", "dist_median", ".2e"),
                                    ("mean", "dist_mean", ".2e"), ("max", "dist_max", ".2e"),
                                    ("deep calls (sum)", "deep_calls", ""), ("deep tokens (sum)", "deep_tokens", ""),
                                    ("graph calls (sum)", "calls", "")])
        lines.append("")
    for name, rows in result["per_graph"].items():
        lines += [f"## Per graph: {name}", ""]
        lines += markdown_table(rows, [("graph", "graph", ""), ("shape", "shape", ""), ("ms", "ms", ""),
                               ("GFLOP", "gflops", ".3f"), ("MB moved", "mbytes", ".1f"),
                               ("GFLOP/s", "achieved_gflops", ".1f"), ("of peak GEMM", "fraction_of_peak_gemm", ".0%")])
        lines.append("")
    if result.get("op_profile"):
        prof = result["op_profile"]
        where = "a bench" if result.get("plan", {}).get("label", "bench config") == "bench config" else \
            f"a {result['plan']['label']}"
        lines += [f"## Where {where} `deep_step` call goes ({prof['shape']}, ORT profile by op type)", ""]
        lines += markdown_table(prof["ops"][:12], [("op", "op", ""), ("ms", "ms", ".2f"), ("share", "share", ".1%")])
        if prof.get("weight_gemm_gflops"):
            lines += ["", f"The weight GEMMs alone run at {prof['weight_gemm_gflops']:.0f} GFLOP/s inside the graph."]
        lines.append("")
    if result.get("quality"):
        lines += ["## INT8 quality (toy)", "", "```", json.dumps(result["quality"], indent=1), "```", ""]
    lines += ["## GPU projections for the 7B (16:9 480p, 21 latent frames) — PROJECTIONS, not measurements", "",
              "Roofline per graph call (max of FLOPs / peak and bytes / bandwidth) from the analytic cost model and "
              "datasheet peaks. Each Jacobi row keeps the deep calls and tokens per generated token its schedule "
              "made on the bench config (block 16); no CUDA-graph replay or launch overhead is modelled.", ""]
    lines += markdown_table(result["projection"], [("GPU", "gpu", ""), ("schedule", "schedule", ""),
                                           ("precision", "precision", ""), ("deep calls", "deep_calls", ""),
                                           ("s / latent frame", "seconds_per_frame", ".2f"),
                                           ("s / video", "seconds_per_video", ".1f"),
                                           ("KV cache GB", "kv_cache_gb", ".1f"), ("weights GB", "weights_gb", ".1f"),
                                           ("fits", "fits_in_memory", "")])
    lines += ["", "Sources: " + "; ".join(sorted({r["source"] for r in result["projection"]})), ""]
    if result.get("stage_projection"):
        lines += ["## Per stage, one video (text encoder, flow, VAE decode) — PROJECTIONS", "",
                  "flan-t5-xl on [cond; uncond] in bf16; flow with the default schedule; Wan2.2 VAE decode FLOPs "
                  "counted with torch's FLOP counter, at the fp16 tensor rate.", ""]
        lines += markdown_table(result["stage_projection"], [
            ("GPU", "gpu", ""), ("flow precision", "flow_precision", ""), ("text s", "text_s", ".3f"),
            ("flow s", "flow_s", ".1f"), ("VAE decode s", "vae_decode_s", ".2f"), ("total s", "total_s", ".1f"),
            ("VAE TFLOP", "vae_tflop", ".0f")])
        lines.append("")
    return "\n".join(lines)


def bar_chart(labels: list[str], values: list[float], title: str, path: Path) -> Path:
    """A horizontal bar chart PNG (OpenCV; no plotting dependency)."""
    import cv2

    h = 28 * len(labels) + 50
    img = np.full((h, 760, 3), 255, np.uint8)
    cv2.putText(img, title, (10, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    top = max(values) if values else 1.0
    for i, (lab, v) in enumerate(zip(labels, values)):
        y = 40 + 28 * i
        cv2.putText(img, lab[:38], (10, y + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
        width = int(400 * v / top) if top > 0 else 0
        cv2.rectangle(img, (300, y + 2), (300 + width, y + 20), (180, 120, 40), -1)
        cv2.putText(img, f"{v:.3g}", (305 + width, y + 16), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.imwrite(str(path), img)
    return path


def write(result: dict, out_dir: Path) -> list[Path]:
    """``latest.json``, ``latest.md`` and (with OpenCV) one PNG chart per table, all in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = [out_dir / "latest.json", out_dir / "latest.md"]
    for path, text in zip(files, (json.dumps(result, indent=1) + "\n", markdown(result))):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    try:
        import cv2  # noqa: F401 - charts only; `starflow-trt doctor` reports it
    except ImportError:
        return files
    for name, rows in result["end_to_end"].items():
        rows = [r for r in rows if r.get("s_median") is not None]   # a peer that failed has no time
        labels = [f"{r['backend']} {r['precision']} {r['schedule']}" for r in rows]
        files.append(bar_chart(labels, [r["s_median"] for r in rows], f"{name}: seconds per video (lower is better)",
                               out_dir / f"e2e_{name.replace(' ', '_')}.png"))
    for name, rows in result["per_graph"].items():
        labels = [f"{r['graph']} {r['shape']}" for r in rows]
        files.append(bar_chart(labels, [100 * r["fraction_of_peak_gemm"] for r in rows],
                               f"{name}: % of measured peak GEMM", out_dir / f"graphs_{name.replace(' ', '_')}.png"))
    return files
