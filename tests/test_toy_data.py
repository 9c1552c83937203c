"""Toy data: determinism, ranges, detector accuracy, text encoder, video outputs."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from starflow_trt.media.io import write_video
from starflow_trt.runtime.video_io import contact_sheet, grid_video
from starflow_trt.toy import PROMPTS, ToyTextEncoder, make_dataset, render_clip, score_clips
from starflow_trt.toy.data import BACKGROUND, COLOURS, DIRECTIONS, SHAPES, detect_colour, detect_direction, parse_prompt


def _noisy(clips: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    return clips + std * torch.randn(clips.shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ rendering
def test_render_is_deterministic_and_in_range():
    a = render_clip("a red disc moving left", 7, frames=6)
    assert a.shape == (6, 3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, render_clip("a red disc moving left", 7, frames=6))
    assert not torch.equal(a, render_clip("a red disc moving left", 8, frames=6))
    assert a.min() >= -1 and a.max() <= 1
    assert len(PROMPTS) == 32 and len(set(PROMPTS)) == 32


def test_prompts_vocabulary_and_defaults():
    assert PROMPTS == [f"a {c} {s} moving {d}" for c in COLOURS for s in SHAPES for d in DIRECTIONS]
    clip = render_clip(PROMPTS[5], 0)
    assert clip.shape == (9, 3, 16, 16)
    # background is the constant grey, the object the exact palette colour at full coverage
    flat = clip.permute(0, 2, 3, 1).reshape(-1, 3)
    colour = torch.tensor(COLOURS[parse_prompt(PROMPTS[5])[0]])
    assert (flat == torch.tensor(BACKGROUND)).all(1).float().mean() > 0.7
    assert (flat == colour).all(1).any()
    # prompt spelling does not matter, the canonical prompt does
    assert torch.equal(render_clip("A  Red disc moving LEFT", 3), render_clip("a red disc moving left", 3))


def test_make_dataset_deterministic():
    x, p = make_dataset(10, 4)
    assert x.shape == (10, 9, 3, 16, 16) and len(p) == 10 and set(p) <= set(PROMPTS)
    y, q = make_dataset(10, 4)
    assert torch.equal(x, y) and p == q
    z, _ = make_dataset(10, 5)
    assert not torch.equal(x, z)
    assert x.min() >= -1 and x.max() <= 1
    assert make_dataset(3, 0, frames=4, size=24)[0].shape == (3, 4, 3, 24, 24)


def test_parse_prompt_errors():
    assert parse_prompt("a blue square moving up") == ("blue", "square", "up")
    with pytest.raises(ValueError, match="not a toy prompt.*unknown colour 'purple'"):
        parse_prompt("a purple square moving up")
    with pytest.raises(ValueError, match="unknown shape 'cat'.*unknown direction 'sideways'"):
        parse_prompt("a red cat moving sideways")
    with pytest.raises(ValueError, match="has 3 words"):
        parse_prompt("a red square")
    with pytest.raises(ValueError, match="not a toy prompt"):
        render_clip("a red square moving sideways", 0)


def test_bounce_keeps_net_motion_in_prompt_direction():
    """Start on the trailing side: over 9 frames the centroid still ends up ahead in most clips."""
    clips, prompts = make_dataset(128, 21)
    agree = 0
    for clip, prompt in zip(clips, prompts):
        dy, dx = DIRECTIONS[parse_prompt(prompt)[2]]
        fg = (clip - torch.tensor(BACKGROUND)[:, None, None]).norm(dim=1)  # [T, H, W]
        ys = torch.arange(16.0)
        cy = (fg.sum(2) * ys).sum(1) / fg.sum((1, 2))
        cx = (fg.sum(1) * ys).sum(1) / fg.sum((1, 2))
        agree += float((cy[-1] - cy[0]) * dy + (cx[-1] - cx[0]) * dx) > 0
    assert agree / len(prompts) >= 0.9


# ------------------------------------------------------------------ detector
@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_detector_accuracy(noise):
    clips, prompts = make_dataset(64, 11, frames=6)
    s = score_clips(_noisy(clips, noise), prompts)
    assert s["colour_accuracy"] >= (1.0 if noise == 0 else 0.95)
    assert s["direction_accuracy"] >= (0.95 if noise == 0 else 0.9)


@pytest.mark.parametrize("noise, colour_min, direction_min", [(0.0, 1.0, 0.95), (0.3, 0.9, 0.85)])
def test_detector_accuracy_nine_frames(noise, colour_min, direction_min):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(64)]  # every prompt twice
    clips = torch.stack([render_clip(p, 100 + i) for i, p in enumerate(prompts)])
    s = score_clips(_noisy(clips, noise, seed=1), prompts)
    assert s["colour_accuracy"] >= colour_min and s["direction_accuracy"] >= direction_min, s
    assert len(s["clips"]) == 64
    assert set(s["clips"][0]) >= {"prompt", "colour", "direction", "colour_ok", "direction_ok"}


def test_detector_on_blank_and_numpy_input():
    blank = torch.tensor(BACKGROUND)[None, :, None, None].expand(9, 3, 16, 16)
    assert detect_colour(blank) == "none" and detect_direction(blank) == "none"
    clip = render_clip("a green square moving down", 2).numpy()
    assert detect_colour(clip) == "green" and detect_direction(clip) == "down"


def test_detector_rejects_wrong_labels():
    clips, prompts = make_dataset(32, 5, frames=6)
    flipped = [p.replace("left", "X").replace("right", "left").replace("X", "right") for p in prompts]
    s = score_clips(clips, flipped)
    changed = sum(p != q for p, q in zip(prompts, flipped))
    assert s["direction_accuracy"] <= 1 - changed / len(prompts) + 0.05


# ------------------------------------------------------------------ text encoder
def test_text_encoder(tmp_path):
    enc = ToyTextEncoder.create(3, dim=16, length=6)
    y = enc.encode(["a red square moving left", ""])
    assert y.shape == (2, 6, 16) and y.dtype == torch.float32
    assert torch.all(y[0, 5:] == 0) and torch.all(y[1] == 0)
    assert (y[0, :5].norm(dim=1) > 0).all()
    assert not torch.equal(y[0, 1], enc.encode(["a blue square moving left"])[0, 1])
    assert torch.equal(y[0, 0], enc.encode(["a blue disc moving up"])[0, 0])  # same word, same row
    assert torch.equal(enc.encode(["A RED square  moving left"]), y[:1])
    with pytest.raises(ValueError, match="unknown word"):
        enc.encode(["a pink cat"])
    with pytest.raises(ValueError, match="at most 6"):
        enc.encode(["a red red red red red red"])
    enc.save(tmp_path / "enc.safetensors")
    again = ToyTextEncoder.load(tmp_path / "enc.safetensors")
    assert torch.equal(again.encode(["a red square moving left"]), y[:1]) and again.vocab == enc.vocab


def test_text_encoder_create_and_tensors_round_trip():
    a, b = ToyTextEncoder.create(0), ToyTextEncoder.create(0)
    assert torch.equal(a.table, b.table) and not torch.equal(a.table, ToyTextEncoder.create(1).table)
    assert a.table.shape == (len(a.vocab), 16) and a.length == 6
    words = {w for p in PROMPTS for w in p.split()}
    assert set(a.vocab) == words
    t = a.to_tensors()
    assert t["vocab"].dtype == torch.uint8
    c = ToyTextEncoder.from_tensors(t)
    assert c.vocab == a.vocab and c.length == a.length and torch.equal(c.table, a.table)
    assert torch.equal(c.encode(PROMPTS), a.encode(PROMPTS))
    with pytest.raises(ValueError, match="missing tensor"):
        ToyTextEncoder.from_tensors({"table": t["table"]})


# ------------------------------------------------------------------ video outputs
def _frame_count(path) -> tuple[int, np.ndarray]:
    cap = cv2.VideoCapture(str(path))
    assert cap.isOpened()
    n, first = 0, None
    while True:
        ok, frame = cap.read()
        if not ok:
            break
        first = frame if first is None else first
        n += 1
    cap.release()
    return n, first


def test_mp4_and_contact_sheet(tmp_path):
    clips = [render_clip(p, 1, frames=6) for p in PROMPTS[:3]]
    video = write_video(grid_video(clips, PROMPTS[:3]), tmp_path / "v.mp4", fps=4)
    cap = cv2.VideoCapture(str(video))
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    ok, frame = cap.read()
    cap.release()
    assert ok and n == 6 and frame.shape[1] > 3 * 16
    sheet = contact_sheet(clips, PROMPTS[:3], tmp_path / "s.png")
    img = cv2.imread(str(sheet))
    assert img is not None and img.shape[1] >= 6 * 16 * 6


