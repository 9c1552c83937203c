"""The bundled toy model: API, likelihood gap, prompt following through ORT, trainer reproducibility."""

from __future__ import annotations

import json

import pytest
import torch

from starflow_trt.reference import JacobiConfig, load_reference
from starflow_trt.toy import PROMPTS, load_bundled, render_clip, score_clips
from starflow_trt.toy.train import entropy_floor_bpd, held_out_set, identity_bpd


def test_bundled_api():
    toy = load_bundled()
    assert toy.config_path.exists() and toy.checkpoint_path.exists()
    y = toy.encode(PROMPTS[:2])
    assert y.shape == (2, 6, 16) and torch.all(toy.encode([""]) == 0)
    clip = render_clip(PROMPTS[0], 3)
    assert clip.shape[1:] == (3, 16, 16) and -1 <= clip.min() and clip.max() <= 1
    assert toy.checkpoint_path.stat().st_size < 8 * 1024 * 1024


def test_likelihood_closes_the_gap():
    toy = load_bundled()
    model = load_reference(toy.config_path, toy.checkpoint_path)
    frames = toy.frames
    clips, prompts = held_out_set(64, frames)
    sigma = model.cfg.noise_std
    noisy = clips + sigma * torch.randn(clips.shape, generator=torch.Generator().manual_seed(12345))
    bpd = float(torch.cat([model.bits_per_dim(noisy[i:i + 16], toy.encode(prompts[i:i + 16]))
                           for i in range(0, 64, 16)]).mean())
    ident, floor = identity_bpd(clips, sigma), entropy_floor_bpd(sigma)
    closed = (ident - bpd) / (ident - floor)
    print(f"\nheld-out bits/dim {bpd:.4f}, identity {ident:.4f}, floor {floor:.4f}: {closed:.1%} of the gap closed")
    assert closed >= 0.6


@pytest.mark.slow
def test_prompt_following_through_ort(toy_export):
    from starflow_trt.runtime import Pipeline

    toy = load_bundled()
    pipe = Pipeline.from_dir(toy_export)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(64)]
    clips = []
    for i in range(0, 64, 8):
        batch = prompts[i:i + 8]
        result = pipe.generate(toy.encode(batch), toy.encode([""] * 8), seed=100 + i, guidance=3.0,
                               jacobi=JacobiConfig(block_size=16))
        clips.append(result.latents)
    scores = score_clips(torch.cat(clips).clamp(-1, 1), prompts)
    print(f"\n64 clips, guidance 3: colour {scores['colour_accuracy']:.0%}, "
          f"direction {scores['direction_accuracy']:.0%}")
    assert scores["colour_accuracy"] >= 0.8 and scores["direction_accuracy"] >= 0.6


def test_trainer_is_reproducible(tmp_path):
    from starflow_trt.toy.train import train

    a = train(tmp_path / "a", max_steps=2, batch=2, seed=3, progress=False)
    b = train(tmp_path / "b", max_steps=2, batch=2, seed=3, progress=False)
    log_a = [json.loads(l) for l in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(l) for l in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["nll"] for r in log_a] == [r["nll"] for r in log_b]
    assert a["held_out_bpd"] == b["held_out_bpd"]
    sd_a = torch.load(tmp_path / "a" / "model.pth", weights_only=True)
    sd_b = torch.load(tmp_path / "b" / "model.pth", weights_only=True)
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert (tmp_path / "a" / "config.yaml").exists() and (tmp_path / "a" / "text_encoder.safetensors").exists()


def test_fit_trains_a_published_form_latent_model(tmp_path):
    """``fit`` is config-agnostic: on the journey's published-form config (4 latent channels, T5-width text)
    40 steps on one fixed batch lower its bits/dim from the identity flow's (what the published-form INT8
    benchmark trains through)."""
    from starflow_trt.config import parse_config
    from starflow_trt.reference import build_model
    from starflow_trt.toy.train import fit
    from tests.test_journey import JOURNEY_YAML, T5_WIDTH

    cfg = parse_config(JOURNEY_YAML).with_text_width(T5_WIDTH, "test")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = 0.3 + 0.6 * torch.randn(4, 3, 4, 3, 5, generator=g)   # off-centre, narrower than N(0, 1)
    y = torch.randn(4, cfg.txt_size, T5_WIDTH, generator=g)
    model = build_model(cfg)
    steps = fit(model, lambda: (x, y), cfg.noise_std, tmp_path / "log.jsonl", max_steps=40, lr=5e-3,
                progress=False)
    bpd = [json.loads(line)["bpd"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == 40 and len(bpd) == 40
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert sum(bpd[-5:]) / 5 < bpd[0] - 0.05   # step 1 is the identity flow (heads start at zero)
