"""``starflow-trt demo``: bundled toy checkpoint → export → generate through ORT → mp4 + report.

The whole output directory is staged and renamed at the end (an interrupted demo leaves nothing);
an existing one is replaced only if an earlier demo (or another starflow-trt verb) wrote it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import click
import torch

from .. import logs
from ..defaults import DEFAULT_JACOBI_BLOCK, DEFAULT_JACOBI_THRESHOLD
from ..toy import DEMO_PROMPTS
from . import options


def _rel(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {"max_abs": float((a - b).abs().max()), "rel_max": float((a - b).abs().max() / b.abs().max()),
            "rel_l2": float((a - b).norm() / b.norm())}


def run_demo(out: Path, guidance: float = 3.0, seed: int = 0, block: int = DEFAULT_JACOBI_BLOCK, threshold: float = DEFAULT_JACOBI_THRESHOLD,
             held_out: int = 64, log: Callable[[str], None] = logs.echo) -> dict:
    """The whole demo into ``out`` (staged: replaced only if starflow-trt wrote it); returns the report
    dict (also written as report.json / report.md)."""
    from ..staging import staged_directory

    out = Path(out)
    with staged_directory(out, force=True, kind="demo") as tmp:
        return _run_demo(tmp, out, guidance, seed, block, threshold, held_out, log)


def _run_demo(out: Path, final: Path, guidance: float, seed: int, block: int, threshold: float, held_out: int,
              log: Callable[[str], None]) -> dict:
    from ..export.onnx_export import ExportLimits, export_graphs
    from ..reference import JacobiConfig, load_reference
    from ..runtime import Pipeline
    from ..runtime.outputs import write_outputs
    from ..staging import write_json_atomic
    from ..toy import load_bundled, score_clips
    from ..toy.train import held_out_set

    t_all = time.perf_counter()
    toy = load_bundled()
    batch = len(DEMO_PROMPTS)
    log(f"[1/5] export the bundled toy model → {final / 'graphs'}")
    t0 = time.perf_counter()
    export_graphs(toy.config_path, toy.checkpoint_path, out / "graphs", limits=ExportLimits(max_batch=batch),
                  text_encoder=toy.text_encoder_path)   # its text_encoder graph: `generate --prompt` works on it
    export_s = time.perf_counter() - t0
    pipe = Pipeline.from_dir(out / "graphs", backend="ort")
    y, y_uncond = toy.encode(DEMO_PROMPTS), toy.encode([""] * batch)
    g = pipe.geo
    noise = torch.randn(batch, g.max_frames, g.channel_size, g.height, g.width,
                        generator=torch.Generator().manual_seed(seed))
    jacobi = JacobiConfig(block_size=block, max_iter=32, threshold=threshold)
    log(f"[2/5] generate {batch} clips through ONNX Runtime (guidance {guidance}, Jacobi {jacobi.schedule or 'predictive'})")
    pipe.generate(y[:1], y_uncond[:1], noise=noise[:1], guidance=guidance, jacobi=jacobi)  # warm-up
    result = pipe.generate(y, y_uncond, noise=noise, guidance=guidance, jacobi=jacobi)
    write_outputs(result, pipe, out, labels=DEMO_PROMPTS)
    (out / "video.mp4").replace(out / "demo.mp4")
    prompt_scores = score_clips(result.latents.clamp(-1, 1), DEMO_PROMPTS)
    log("[3/5] parity: ORT vs the PyTorch reference sampler on the same noise")
    ref = load_reference(toy.config_path, toy.checkpoint_path)
    upstream = JacobiConfig(block_size=block, max_iter=32, threshold=threshold, schedule="upstream")
    t0 = time.perf_counter()
    ref_video = ref.denoise(ref.sample(noise, y, y_uncond, guidance=guidance, jacobi=upstream), y)
    ref_s = time.perf_counter() - t0
    ort_up = pipe.generate(y, y_uncond, noise=noise, guidance=guidance, jacobi=upstream).latents
    ref_ar = ref.sample(noise, y, y_uncond, guidance=guidance)
    ort_ar = pipe.generate(y, y_uncond, noise=noise, guidance=guidance, denoise=False).latents
    parity = {"upstream_jacobi_denoised": _rel(ort_up, ref_video), "autoregressive": _rel(ort_ar, ref_ar),
              "default_schedule_vs_ar": _rel(result.raw, ref_ar)}
    log(f"[4/5] bits/dim on {held_out} held-out noise-augmented clips")
    clips, prompts = held_out_set(held_out, g.max_frames)
    noisy = clips + pipe.geo.noise_std * torch.randn(clips.shape, generator=torch.Generator().manual_seed(12345))
    bpd = torch.cat([pipe.score(noisy[i:i + batch], toy.encode(prompts[i:i + batch]))[1]
                     for i in range(0, held_out, batch)])
    summary = json.loads(toy.summary_path.read_text()) if toy.summary_path.exists() else {}
    stats = result.stats
    report = {
        "model": {"config": str(toy.config_path), "checkpoint": str(toy.checkpoint_path),
                  "params": summary.get("params"), "training": summary},
        "prompts": DEMO_PROMPTS, "guidance": guidance, "seed": seed,
        "jacobi": {"block_size": block, "threshold": threshold, "schedule": stats["schedule"]},
        "backend": stats["backend"],
        "seconds": {"export": round(export_s, 2), **stats["seconds"], "reference_sampler": round(ref_s, 3)},
        "time_to_first_frame": stats["time_to_first_frame"],
        "graph_calls": stats["total_graph_calls"],
        "parity": parity,
        "held_out_bits_per_dim": {"mean": float(bpd.mean()), "clips": held_out,
                                  "identity_flow": summary.get("identity_bpd"),
                                  "entropy_floor": summary.get("entropy_floor_bpd")},
        "prompt_following": {"colour_accuracy": prompt_scores["colour_accuracy"],
                             "direction_accuracy": prompt_scores["direction_accuracy"]},
        "files": sorted(p.name for p in out.iterdir() if p.is_file() and not p.name.startswith(".")),
    }
    calib = _maybe_int8(out, pipe, toy, noise, y, y_uncond, guidance, jacobi, log)
    if calib is not None:
        report["int8"] = calib
    report["seconds"]["demo_total"] = round(time.perf_counter() - t_all, 2)
    log("[5/5] report")
    write_json_atomic(out / "report.json", report, strict=True)
    (out / "report.md").write_text(render_markdown(report), encoding="utf-8")
    return report


def _maybe_int8(out, pipe, toy, noise, y, y_uncond, guidance, jacobi, log) -> Optional[dict]:
    """INT8 calibration + comparison when ONNX Runtime's quantization tools are installed."""
    try:
        import onnxruntime.quantization  # noqa: F401
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == "starflow_trt":
            raise
        log(f"[+] INT8 skipped: {exc.name} is not installed (pip install 'starflow-trt[cpu]')")
        return None
    log("[+] INT8: calibrate and compare against FP32")
    report = int8_versus_fp32(out, pipe, toy, noise, y, y_uncond, guidance, jacobi)
    if not report["gate_passed"]:
        log(f"[+] INT8 fails the quality gate ({'; '.join(report['gate_failures'])}): graphs_int8 is kept for the "
            "comparison and marked failed in its manifest; `starflow-trt calibrate` refuses such graphs")
    return report


def int8_versus_fp32(out: Path, pipe, toy, noise, y, y_uncond, guidance, jacobi) -> dict:
    """Calibrate ``out/graphs`` → ``out/graphs_int8`` and compare generation, likelihood, speed. Graphs that fail
    the quality gate are written anyway, marked in their manifest: the comparison is the demo's report."""
    from ..calibration.calibrate import calibrate_directory, psnr
    from ..runtime import Pipeline
    from ..toy import score_clips
    from ..toy.calibration import toy_calibration_set

    t0 = time.perf_counter()
    text, uncond, eval_clips = toy_calibration_set(pipe.manifest, samples=16)
    manifest = calibrate_directory(out / "graphs", out / "graphs_int8", "int8", samples=16, text=text, uncond=uncond,
                                   guidance=guidance, eval_clips=eval_clips, force=True, log=lambda m: None)
    seconds = time.perf_counter() - t0
    pipe8 = Pipeline.from_dir(out / "graphs_int8", backend="ort")
    pipe8.generate(y[:1], y_uncond[:1], noise=noise[:1], guidance=guidance, jacobi=jacobi)  # warm-up
    r8 = pipe8.generate(y, y_uncond, noise=noise, guidance=guidance, jacobi=jacobi)
    r32 = pipe.generate(y, y_uncond, noise=noise, guidance=guidance, jacobi=jacobi)
    q = manifest.extra["quality"]
    s8 = score_clips(r8.latents.clamp(-1, 1), DEMO_PROMPTS)
    return {"calibration_seconds": round(seconds, 1), "gate_passed": q["gate"]["passed"],
            "gate_failures": q["gate"].get("failures", []),
            "bits_per_dim": {"fp32": q["bpd_fp32"], "int8": q["bpd"], "increase": q["bpd_increase"]},
            "latent_psnr_db_vs_fp32": psnr(r8.latents, r32.latents),
            "graph_rel_l2_worst": {k: max(v["rel_l2"].values()) for k, v in q["graphs"].items()},
            "generate_seconds": {"fp32": r32.stats["seconds"]["total"], "int8": r8.stats["seconds"]["total"]},
            "prompt_following_int8": {"colour_accuracy": s8["colour_accuracy"],
                                      "direction_accuracy": s8["direction_accuracy"]}}


def render_markdown(r: dict) -> str:
    p, s = r["parity"], r["seconds"]
    bpd = r["held_out_bits_per_dim"]
    lines = [
        "# starflow-trt demo report", "",
        f"Bundled toy STARFlow-V ({r['model']['params']:,} parameters) exported to ONNX and sampled through "
        f"ONNX Runtime ({', '.join(r['backend'].get('providers', []))}), guidance {r['guidance']}, "
        f"Jacobi block {r['jacobi']['block_size']} threshold {r['jacobi']['threshold']} "
        f"schedule `{r['jacobi']['schedule']}`.", "",
        "![contact sheet](contact_sheet.png)", "", "Video: `demo.mp4`.", "",
        "## Parity (ORT vs PyTorch reference, same noise)", "",
        "| comparison | max abs | max abs / max | rel L2 |", "|---|---|---|---|",
    ]
    for name, v in p.items():
        lines.append(f"| {name} | {v['max_abs']:.3g} | {v['rel_max']:.3g} | {v['rel_l2']:.3g} |")
    lines += ["", "## Likelihood", "",
              f"bits/dim on {bpd['clips']} held-out noise-augmented clips: **{bpd['mean']:.4f}** "
              f"(untrained identity flow {bpd['identity_flow']:.4f}, entropy floor of the augmentation noise "
              f"{bpd['entropy_floor']:.4f})." if bpd["identity_flow"] is not None else
              f"bits/dim on held-out clips: {bpd['mean']:.4f}", "",
              "## Prompt following (detector on the generated clips)", "",
              f"colour {r['prompt_following']['colour_accuracy']:.0%}, direction "
              f"{r['prompt_following']['direction_accuracy']:.0%} of {len(r['prompts'])} clips.", "",
              "## Time (seconds, this machine)", "", "| stage | s |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in s.items()]
    lines += ["", f"time to first frame: {r['time_to_first_frame']} s; graph calls: {r['graph_calls']}.", ""]
    if "int8" in r:
        lines += ["## INT8 vs FP32", "", "```", json.dumps(r["int8"], indent=1), "```", ""]
    return "\n".join(lines)


@click.command("demo")
@click.option("-o", "--out", "out_dir", default="demo_out", show_default=True, type=click.Path(file_okay=False),
              help="output directory (replaced only if an earlier demo or another starflow-trt verb wrote it)")
@click.option("--guidance", default=3.0, show_default=True, type=options.NON_NEGATIVE_FLOAT)
@click.option("--seed", default=0, show_default=True, type=options.NON_NEGATIVE_INT)
def demo_command(out_dir: str, guidance: float, seed: int) -> None:
    """Bundled toy model → export → generate with guidance (ORT) → demo.mp4, contact sheet, report."""
    with logs.captured():  # exporter / quantization chatter only with --verbose
        report = run_demo(Path(out_dir), guidance=guidance, seed=seed)
    pf = report["prompt_following"]
    click.echo(f"wrote {out_dir}/demo.mp4, contact_sheet.png, report.md, report.json in "
               f"{report['seconds']['demo_total']} s; held-out bits/dim {report['held_out_bits_per_dim']['mean']:.4f}; "
               f"colour {pf['colour_accuracy']:.0%}, direction {pf['direction_accuracy']:.0%}; "
               f"ORT vs reference (AR) rel {report['parity']['autoregressive']['rel_max']:.2e}")
