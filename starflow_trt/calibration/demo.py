"""INT8 section of ``starflow-trt demo``: calibrate the toy export and compare with FP32."""

from __future__ import annotations

import time
from pathlib import Path

from .calibrate import calibrate_directory, psnr


def int8_versus_fp32(out: Path, pipe, toy, noise, y, y_uncond, guidance, jacobi) -> dict:
    """Calibrate ``out/graphs`` → ``out/graphs_int8`` and compare generation, likelihood, speed."""
    from ..runtime import Pipeline
    from ..toy import score_clips

    t0 = time.perf_counter()
    manifest = calibrate_directory(out / "graphs", out / "graphs_int8", "int8", samples=16, guidance=guidance,
                                   overwrite=True, log=lambda m: None)
    seconds = time.perf_counter() - t0
    pipe8 = Pipeline.from_dir(out / "graphs_int8", backend="ort")
    pipe8.generate(y[:1], y_uncond[:1], noise=noise[:1], guidance=guidance, jacobi=jacobi)  # warm-up
    r8 = pipe8.generate(y, y_uncond, noise=noise, guidance=guidance, jacobi=jacobi)
    r32 = pipe.generate(y, y_uncond, noise=noise, guidance=guidance, jacobi=jacobi)
    from ..commands.demo_cmd import DEMO_PROMPTS

    q = manifest.extra["quality"]
    s8 = score_clips(r8.latents.clamp(-1, 1), DEMO_PROMPTS)
    return {"calibration_seconds": round(seconds, 1), "gate_passed": q["gate"]["passed"],
            "bits_per_dim": {"fp32": q["bpd_fp32"], "int8": q["bpd"], "increase": q["bpd_increase"]},
            "latent_psnr_db_vs_fp32": psnr(r8.latents, r32.latents),
            "graph_rel_l2_worst": {k: max(v["rel_l2"].values()) for k, v in q["graphs"].items()},
            "generate_seconds": {"fp32": r32.stats["seconds"]["total"], "int8": r8.stats["seconds"]["total"]},
            "prompt_following_int8": {"colour_accuracy": s8["colour_accuracy"],
                                      "direction_accuracy": s8["direction_accuracy"]}}
