"""INT8 from the default prompt set on a published-form export, end to end as a user runs it (issue 29).

The model is the journey's (``tests/test_journey.py``): upstream's published 7B YAML key for key with the sizes
scaled down, a tiny T5 directory and a tiny Wan2.2 VAE, run twice: with the journey's random checkpoint, and
with its flow trained here first (a checkpoint of the 7B is not downloadable here; a trained flow is what INT8
is for). Steps (1 and 2 for the trained run only):

1. the VAE's latent statistics measured on the training clips (what Wan2.2's ``latents_mean`` / ``latents_std`` are
   for its data), written into its config;
2. the flow trained on the VAE latents of the toy's procedural clips on the export's default grid (48 x 80, 9
   frames → 3 latent frames) with the T5 embeddings of their captions as calibrate and generate template them
   (``starflow_trt.toy.train.fit``). The model's 8 text tokens hold only the template's prefix, so every caption
   encodes alike: the gate measures the graphs' rounding, not prompt adherence;
3. the CLI: ``export`` (T5 + VAE, all aspects) → ``calibrate --precision int8 -o q`` with no prompt option (the
   package's default prompt set through the export's T5) → ``generate q --prompt ...`` → an mp4.

Writes ``results/published_int8.json``: per checkpoint the steps (exit, seconds, output tail), the gate's numbers
from the INT8 manifest (``quality_fp8.quality_row``) and the prompt set it records, the mp4's frames; the training
summary; the machine. Every number is ONNX Runtime's CPU EP.

    python benchmarks/published_int8.py [--minutes 6] [--work DIR] [-o benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
HERE = REPO / "benchmarks"
PIXELS = (48, 80)          # the journey's 16:9 frame (its default aspect)
CLIPS = 512                # training clips (latents encoded once)
PROMPT = "a red square moving right"


def render(prompt: str, seed: int) -> torch.Tensor:
    """A toy clip [9, 3, 48, 80] in [-1, 1]: rendered square at the frame's width, rows cropped to its height."""
    from starflow_trt.toy.data import render_clip

    h, w = PIXELS
    top = (w - h) // 2
    return render_clip(prompt, seed, frames=9, size=w)[:, :, top:top + h]


def latent_dataset(vae_dir: Path, temporal_scale: float) -> tuple[torch.Tensor, list[str]]:
    """Latents [CLIPS, 3, z, 3, 5] of the training clips (posterior means), after writing the VAE's measured
    per-channel statistics into ``vae_dir``, and their prompts."""
    from diffusers import AutoencoderKLWan

    from starflow_trt.media.latents import LatentNorm
    from starflow_trt.toy.data import PROMPTS

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(CLIPS)]
    clips = torch.stack([render(p, 10_000 + i) for i, p in enumerate(prompts)])
    vae = AutoencoderKLWan.from_pretrained(str(vae_dir)).eval()
    with torch.no_grad():
        dist = [vae.encode(clips[i:i + 64].permute(0, 2, 1, 3, 4)).latent_dist for i in range(0, CLIPS, 64)]
    mean = torch.cat([d.mean for d in dist]).permute(0, 2, 1, 3, 4)        # [N, T, z, h, w]
    logvar = torch.cat([d.logvar for d in dist]).permute(0, 2, 1, 3, 4)
    stats = mean.transpose(0, 2).flatten(1)                                   # [z, N·T·h·w]
    vae.register_to_config(latents_mean=stats.mean(1).tolist(), latents_std=stats.std(1).tolist())
    vae.save_pretrained(str(vae_dir))
    norm = LatentNorm.from_vae(vae, temporal_scale)
    return norm.latents_from_moments(mean, logvar, sample=False), prompts


def train_flow(paths: dict[str, Path], minutes: float, batch: int = 16, seed: int = 0) -> dict:
    """Train the journey's flow on VAE latents; overwrite its checkpoint. Returns the training summary."""
    from starflow_trt.checkpoint import save_state_dict
    from starflow_trt.config import parse_config
    from starflow_trt.geometry import UPSTREAM_ASPECTS, aspect_grid
    from starflow_trt.media.text import T5TextEncoder, TextTemplate
    from starflow_trt.reference import build_model
    from starflow_trt.toy.train import fit
    from tests.test_journey import T5_WIDTH

    cfg = parse_config(paths["config"].read_text()).with_text_width(T5_WIDTH, "the tiny T5")
    latents, prompts = latent_dataset(paths["vae"], cfg.vae_temporal_scale or 1.0)
    encoder = T5TextEncoder.from_pretrained(paths["t5"], TextTemplate.from_config(cfg))
    grid = aspect_grid(cfg, "16:9")   # the export's default grid; its name is the first aspect on it
    aspect = next(a for a in UPSTREAM_ASPECTS if aspect_grid(cfg, a) == grid)
    y, y_uncond = encoder.encode(prompts, fps=cfg.fps, aspect=aspect)     # the captions calibrate writes
    torch.manual_seed(seed)
    rng = random.Random(seed)

    def next_batch():
        rows = [rng.randrange(CLIPS) for _ in range(batch)]
        text = torch.stack([(y_uncond if rng.random() < cfg.drop_label else y)[r] for r in rows])
        return latents[rows], text

    model = build_model(cfg)
    log = paths["config"].parent / "train_log.jsonl"
    t0 = time.perf_counter()
    steps = fit(model, next_batch, cfg.noise_std, log, minutes=minutes)
    save_state_dict(model.state_dict(), paths["checkpoint"])
    bpd = [json.loads(line)["bpd"] for line in log.read_text().splitlines()]
    return {"steps": steps, "seconds": round(time.perf_counter() - t0, 1), "batch": batch, "clips": CLIPS,
            "latent_shape": list(latents.shape[1:]), "caption_aspect": aspect,
            "captions_encode_alike": bool(torch.equal(y, y[:1].expand_as(y))),
            "bpd_first_10": sum(bpd[:10]) / len(bpd[:10]), "bpd_last_50": sum(bpd[-50:]) / len(bpd[-50:])}


def cli(*args) -> dict:
    """``starflow-trt ARGS`` in a child process as a user runs it: exit code, seconds, the output's tail."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "starflow_trt.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO)
    print(f"starflow-trt {' '.join(map(str, args[:2]))}: exit {proc.returncode}", flush=True)
    return {"command": "starflow-trt " + " ".join(map(str, args)), "exit": proc.returncode,
            "seconds": round(time.perf_counter() - t0, 1), "output_tail": (proc.stdout + proc.stderr)[-1500:]}


def user_run(paths: dict[str, Path], work: Path) -> dict:
    """export (T5 + VAE, all aspects) → calibrate --precision int8 with no prompt option → generate --prompt:
    each step's exit, seconds and output tail, the gate's numbers from the INT8 manifest (``quality``), the mp4's
    size."""
    from quality_fp8 import quality_row   # this folder's quality table: one row per calibrated directory

    from starflow_trt.export.manifest import load_manifest
    from starflow_trt.media.io import load_video

    steps = [cli("export", paths["config"], paths["checkpoint"], "--text-encoder", paths["t5"], "--vae", paths["vae"],
                 "--aspects", "all", "--max-batch", "2", "-o", work / "fp32"),
             cli("calibrate", work / "fp32", "--precision", "int8", "-o", work / "q")]
    out: dict = {"steps": steps}
    if steps[-1]["exit"] != 0:
        return out
    out["quality"] = {**quality_row("int8", work / "q"),
                      "prompt_set": load_manifest(work / "q").extra["calibration"]["prompt_set"]}
    steps.append(cli("generate", work / "q", "--prompt", PROMPT, "--seed", 3, "-o", work / "gen"))
    video = work / "gen" / "video.mp4"
    out["mp4"] = {"written": video.is_file(),
                  "frames_hw": list(load_video(video)[0].shape[:3]) if video.is_file() else None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=6.0, help="training budget (default 6)")
    ap.add_argument("--work", type=Path, default=None, help="working directory (default: a temporary one)")
    ap.add_argument("-o", "--out", type=Path, default=HERE / "results")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from starflow_trt.bench.machine import machine_info
    from tests.test_journey import make_journey_model

    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine_info()}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for weights in ("random", "trained"):   # random: the journey test's own checkpoint
            paths = make_journey_model(work / weights / "model")
            if weights == "trained":
                print(f"training the published-form flow for {args.minutes} min", flush=True)
                result["training"] = train_flow(paths, args.minutes)
            result[weights] = user_run(paths, work / weights)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "published_int8.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps({k: result.get(k) for k in ("training", "random", "trained")}, indent=1, default=str))


if __name__ == "__main__":
    main()
