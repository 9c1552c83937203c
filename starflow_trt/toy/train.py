"""Train the bundled toy STARFlow-V on the procedural clips (CPU, reproducible from a seed).

    python -m starflow_trt.toy.train -o DIR [--minutes 15] [--seed 0]

Same architecture family as the 7B (deep causal text-conditioned block, frame-local
shallow blocks, learnable denoiser), pixel space (no VAE). Objective per step:

* flow NLL of noise-augmented clips ``x + σ·ε`` (σ = ``noise_std``), text dropped to the
  empty prompt with probability ``drop_label`` (for guidance);
* learnable denoiser by flow-score matching: ``d(x, y)`` regresses the flow's own
  score target ``σ²/0.3 · ∇_x NLL_sum(x)`` (spec §12.3; detached), so that
  ``x − 0.3·d`` is the Tweedie denoising step.

Writes ``model.pth`` (upstream state_dict layout), ``config.yaml``, ``text_encoder.safetensors``,
``train_log.jsonl`` and ``summary.json`` into DIR.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ..config import parse_config
from ..reference import build_model
from .data import PROMPTS, render_clip
from .text import ToyTextEncoder

TOY_CONFIG = """arguments:
- channel_size: 3
- img_size: 16
- patch_size: 2
- channels: 64
- top_block_channels: 128
- layers_per_block: 1 1 4
- head_dim: 32
- txt_size: {txt_size}
- txt_dim: {txt_dim}
- rope: 1
- sos: 1
- seq_order: L2R
- use_softplus: 1
- cond_top_only: 1
- use_final_norm: 1
- learnable_self_denoiser: 1
- conditional_denoiser: 1
- denoiser_window: 10
- temporal_causal: 2
- shallow_block_local: 1
- soft_clip: 4
- noise_std: {noise_std}
- drop_label: 0.1
- vid_size: '{vid_frames}:8'
- cfg: 3.0
"""

DEFAULT_FRAMES = 6          # latent (= pixel) frames of a toy clip
NOISE_STD = 0.15            # augmentation σ (the data lives in [-1, 1])
HELD_OUT_SEEDS = range(64)  # evaluation clips; training seeds start above them
TRAIN_SEED_OFFSET = 1_000_000


def toy_config_text(frames: int = DEFAULT_FRAMES, noise_std: float = NOISE_STD, txt_size: int = 6,
                    txt_dim: int = 16) -> str:
    """Upstream-format YAML of the toy model (``vid_size`` chosen so the latent-frame rule gives ``frames``)."""
    return TOY_CONFIG.format(vid_frames=(frames - 1) * 4 + 1, noise_std=noise_std, txt_size=txt_size, txt_dim=txt_dim)


def held_out_set(n: int = 64, frames: int = DEFAULT_FRAMES) -> tuple[torch.Tensor, list[str]]:
    """Deterministic evaluation clips [n, T, 3, 16, 16] and their prompts (seeds never used in training)."""
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    clips = torch.stack([render_clip(p, seed, frames=frames) for p, seed in zip(prompts, HELD_OUT_SEEDS)])
    return clips, prompts


def init_identity_flow(model: torch.nn.Module) -> None:
    """Upstream initialisation of the affine heads: proj_out = 0, so every block starts as identity."""
    with torch.no_grad():
        for block in model.blocks:
            if hasattr(block, "proj_out"):
                block.proj_out.weight.zero_()
                block.proj_out.bias.zero_()
        if hasattr(model, "learnable_self_denoiser"):
            model.learnable_self_denoiser.proj_out.weight.zero_()
            model.learnable_self_denoiser.proj_out.bias.zero_()


@torch.no_grad()
def evaluate_bpd(model, encoder: ToyTextEncoder, clips: torch.Tensor, prompts: list[str], noise_std: float,
                 seed: int = 12345) -> float:
    """Mean bits/dim of noise-augmented held-out clips (the augmentation noise is seeded)."""
    g = torch.Generator().manual_seed(seed)
    noisy = clips + noise_std * torch.randn(clips.shape, generator=g)
    y = encoder.encode(prompts)
    return float(torch.cat([model.bits_per_dim(noisy[i:i + 16], y[i:i + 16])
                            for i in range(0, len(clips), 16)]).mean())


def entropy_floor_bpd(noise_std: float) -> float:
    """0.5·log2(2πe·σ²): bits/dim of the augmentation noise alone."""
    return 0.5 * math.log2(2 * math.pi * math.e * noise_std ** 2)


def identity_bpd(clips: torch.Tensor, noise_std: float, seed: int = 12345) -> float:
    """Bits/dim of the untrained (identity) flow on the same noisy clips: z = x."""
    g = torch.Generator().manual_seed(seed)
    noisy = clips + noise_std * torch.randn(clips.shape, generator=g)
    nll = 0.5 * noisy.pow(2).flatten(1).mean(1)
    return float(((nll + 0.5 * math.log(2 * math.pi)) / math.log(2)).mean())


#: one training batch: (clean clips or latents [B, T, C, H, W], text [B, L, D] with the label already dropped)
Batch = tuple[torch.Tensor, torch.Tensor]


def fit(model: torch.nn.Module, next_batch: Callable[[], Batch], noise_std: float, log_path: Path,
        minutes: float = 15.0, max_steps: Optional[int] = None, lr: float = 2e-3, progress: bool = True) -> int:
    """Train ``model`` in place until ``minutes`` of wall time (or ``max_steps``); one JSON line per step in
    ``log_path``; returns the number of steps. Any STARFlow-V config: the objective is the module docstring's
    (flow NLL of ``x + noise_std·ε``, the denoiser regressing the flow's own score), AdamW with warmup and a
    cosine decay over the steps the budget allows."""
    from tqdm import tqdm

    model.train().requires_grad_(True)
    init_identity_flow(model)
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=1e-4)
    denoise_scale = noise_std ** 2 / 0.3
    budget = minutes * 60.0
    total = max_steps or 10 ** 9
    warmup = 100
    start = time.perf_counter()
    bar = tqdm(total=max_steps, disable=not progress, desc="train", unit="step")
    step = 0
    expected_steps = max_steps
    with open(log_path, "w", encoding="utf-8") as log:
        while step < total:
            elapsed = time.perf_counter() - start
            if max_steps is None and elapsed > budget:
                break
            if expected_steps is None and step == 20:
                expected_steps = int(budget / (elapsed / 20))
            horizon = expected_steps or total
            frac = min(1.0, step / max(horizon, 1))
            cur_lr = lr * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
            for group in opt.param_groups:
                group["lr"] = cur_lr
            clips, y = next_batch()
            x = (clips + noise_std * torch.randn_like(clips)).requires_grad_(True)
            nll = model.nll(x, y)
            # flow-score target for the denoiser: σ²/0.3 · ∂(Σ_dims NLL)/∂x, detached
            numel = x[0].numel()
            score = torch.autograd.grad(nll.sum() * numel, x, retain_graph=True)[0].detach()
            d = model.denoiser(x.detach(), y)
            loss_den = ((d - denoise_scale * score) ** 2).mean()
            loss = nll.mean() + loss_den
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            bpd = (float(nll.mean()) + 0.5 * math.log(2 * math.pi)) / math.log(2)
            record = {"step": step, "seconds": round(time.perf_counter() - start, 2), "lr": cur_lr,
                      "nll": float(nll.mean()), "bpd": bpd, "denoiser": float(loss_den)}
            log.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix(bpd=f"{bpd:.3f}", den=f"{float(loss_den):.4f}")
    bar.close()
    model.eval().requires_grad_(False)
    return step


def train(out_dir: str | os.PathLike, minutes: float = 15.0, max_steps: Optional[int] = None, batch: int = 16,
          lr: float = 2e-3, seed: int = 0, frames: int = DEFAULT_FRAMES, noise_std: float = NOISE_STD,
          progress: bool = True) -> dict:
    """Train until ``minutes`` of wall time (or ``max_steps``); write the bundle into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    encoder = ToyTextEncoder.create(seed, dim=16, length=6)
    cfg_text = toy_config_text(frames, noise_std, encoder.length, encoder.dim)
    cfg = parse_config(cfg_text)
    model = build_model(cfg)
    held_clips, held_prompts = held_out_set(64, frames)

    def next_batch() -> Batch:
        prompts = [rng.choice(PROMPTS) for _ in range(batch)]
        clips = torch.stack([render_clip(p, TRAIN_SEED_OFFSET + rng.randrange(10 ** 9), frames=frames)
                             for p in prompts])
        return clips, encoder.encode([("" if rng.random() < cfg.drop_label else p) for p in prompts])

    start = time.perf_counter()
    steps = fit(model, next_batch, noise_std, out / "train_log.jsonl", minutes, max_steps, lr, progress)
    summary = {
        "steps": steps, "seconds": round(time.perf_counter() - start, 1), "batch": batch, "seed": seed,
        "frames": frames, "noise_std": noise_std, "params": sum(p.numel() for p in model.parameters()),
        "held_out_bpd": evaluate_bpd(model, encoder, held_clips, held_prompts, noise_std),
        "identity_bpd": identity_bpd(held_clips, noise_std),
        "entropy_floor_bpd": entropy_floor_bpd(noise_std),
    }
    gap = summary["identity_bpd"] - summary["entropy_floor_bpd"]
    summary["gap_closed"] = (summary["identity_bpd"] - summary["held_out_bpd"]) / gap
    torch.save(model.state_dict(), out / "model.pth")
    (out / "config.yaml").write_text(cfg_text, encoding="utf-8")
    encoder.save(out / "text_encoder.safetensors")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m starflow_trt.toy.train", description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--out", required=True, help="output directory")
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-time budget (default 15)")
    parser.add_argument("--steps", type=int, default=None, help="fixed number of steps instead of a time budget")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = train(args.out, minutes=args.minutes, max_steps=args.steps, batch=args.batch, lr=args.lr,
                    seed=args.seed, frames=args.frames)
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
