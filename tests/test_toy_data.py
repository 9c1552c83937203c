"""Toy data: determinism, ranges, detector accuracy, text encoder, video outputs."""

from __future__ import annotations

import cv2
import pytest
import torch

from starflow_trt.runtime.video_io import contact_sheet, grid_video, write_mp4
from starflow_trt.toy import PROMPTS, ToyTextEncoder, make_dataset, render_clip, score_clips
from starflow_trt.toy.data import parse_prompt


def test_render_is_deterministic_and_in_range():
    a = render_clip("a red disc moving left", 7, frames=6)
    assert a.shape == (6, 3, 16, 16) and a.dtype == torch.float32
    assert torch.equal(a, render_clip("a red disc moving left", 7, frames=6))
    assert not torch.equal(a, render_clip("a red disc moving left", 8, frames=6))
    assert a.min() >= -1 and a.max() <= 1
    assert len(PROMPTS) == 32 and len(set(PROMPTS)) == 32


def test_parse_prompt_errors():
    assert parse_prompt("a blue square moving up") == ("blue", "square", "up")
    with pytest.raises(ValueError, match="not a toy prompt"):
        parse_prompt("a purple square moving up")


@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_detector_accuracy(noise):
    clips, prompts = make_dataset(64, 11, frames=6)
    clips = clips + noise * torch.randn(clips.shape, generator=torch.Generator().manual_seed(0))
    s = score_clips(clips, prompts)
    assert s["colour_accuracy"] >= (1.0 if noise == 0 else 0.95)
    assert s["direction_accuracy"] >= (0.95 if noise == 0 else 0.9)


def test_detector_rejects_wrong_labels():
    clips, prompts = make_dataset(32, 5, frames=6)
    flipped = [p.replace("left", "X").replace("right", "left").replace("X", "right") for p in prompts]
    s = score_clips(clips, flipped)
    changed = sum(p != q for p, q in zip(prompts, flipped))
    assert s["direction_accuracy"] <= 1 - changed / len(prompts) + 0.05


def test_text_encoder(tmp_path):
    enc = ToyTextEncoder.create(3, dim=16, length=6)
    y = enc.encode(["a red square moving left", ""])
    assert y.shape == (2, 6, 16)
    assert torch.all(y[0, 5:] == 0) and torch.all(y[1] == 0)
    assert not torch.equal(y[0, 1], enc.encode(["a blue square moving left"])[0, 1])
    with pytest.raises(ValueError, match="unknown word"):
        enc.encode(["a pink cat"])
    enc.save(tmp_path / "enc.safetensors")
    again = ToyTextEncoder.load(tmp_path / "enc.safetensors")
    assert torch.equal(again.encode(["a red square moving left"]), y[:1]) and again.vocab == enc.vocab


def test_mp4_and_contact_sheet(tmp_path):
    clips = [render_clip(p, 1, frames=6) for p in PROMPTS[:3]]
    video = write_mp4(grid_video(clips, PROMPTS[:3]), tmp_path / "v.mp4", fps=4)
    cap = cv2.VideoCapture(str(video))
    n = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
    ok, frame = cap.read()
    cap.release()
    assert ok and n == 6 and frame.shape[1] > 3 * 16
    sheet = contact_sheet(clips, PROMPTS[:3], tmp_path / "s.png")
    img = cv2.imread(str(sheet))
    assert img is not None and img.shape[1] >= 6 * 16 * 6
