"""Image/video in (cover resize, centre crop, [-1, 1]) and H.264 out (clamp, truncate, fps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")
av = pytest.importorskip("av")

from starflow_trt.errors import InputError  # noqa: E402
from starflow_trt.media import io as mio  # noqa: E402


def _columns(h: int, w: int) -> np.ndarray:
    """Each pixel holds its column index (R) and row index (G): crops are readable."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.arange(w)[None, :]
    img[..., 1] = np.arange(h)[:, None]
    return img


def test_cover_crop_without_resize_is_torchvision_centre_crop():
    img = _columns(16, 41)
    out = mio.cover_crop(img, 16, 32)
    # (41 - 32) / 2 = 4.5 rounds half to even → 4 (torchvision's int(round(...)))
    assert np.array_equal(out, img[:, 4:36])
    out = mio.cover_crop(_columns(20, 16), 16, 16)
    assert np.array_equal(out, _columns(20, 16)[2:18])


def test_cover_crop_resizes_to_cover_then_crops():
    img = np.full((40, 100, 3), 77, np.uint8)
    out = mio.cover_crop(img, 16, 32)  # scale max(16/40, 32/100) = 0.4 → 16 × 40, crop 4 px each side
    assert out.shape == (16, 32, 3) and (out == 77).all()
    up = mio.cover_crop(np.full((5, 7, 3), 200, np.uint8), 30, 30)  # upscales: 30/5 = 6 → 30 × 42
    assert up.shape == (30, 30, 3) and (up == 200).all()
    with pytest.raises(InputError, match="uint8 RGB"):
        mio.cover_crop(np.zeros((4, 4), np.uint8), 2, 2)


def test_model_range_and_prepare_image(tmp_path):
    from PIL import Image

    x = mio.to_model_range(np.array([[[0, 127, 255]]], np.uint8))
    assert x.shape == (3, 1, 1)
    expected = (torch.tensor([0.0, 127.0, 255.0]) / 255 - 0.5) / 0.5  # ToTensor, Normalize(0.5, 0.5) in fp32
    assert torch.equal(x.flatten(), expected) and expected[0] == -1 and expected[2] == 1
    Image.fromarray(_columns(48, 64)).save(tmp_path / "in.png")
    clip = mio.prepare_image(tmp_path / "in.png", 32, 32)
    assert clip.shape == (1, 1, 3, 32, 32) and clip.dtype == torch.float32
    assert -1 <= clip.min() and clip.max() <= 1
    with pytest.raises(InputError, match="not found"):
        mio.prepare_image(tmp_path / "missing.png", 32, 32)


def test_frames_to_uint8_clamps_and_rounds():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.99, 0.999, 1.0, 3.0]).view(1, 7, 1, 1).expand(1, 7, 1, 3).permute(0, 3, 1, 2)
    out = mio.frames_to_uint8(x)  # [1, 3, 7, 1] → [1, 7, 1, 3]
    assert out.dtype == np.uint8
    # (x + 1) / 2 * 255: 0 → 127.5 → 128 (half to even), 0.99 → 253.7 → 254, 0.999 → 254.87 → 255 (rounded)
    assert out[0, :, 0, 0].tolist() == [0, 0, 128, 254, 255, 255, 255]


def test_h264_writer_streams_frames_at_fps(tmp_path):
    # smooth content: yuv420p halves chroma resolution, so per-pixel noise would not survive
    yy, xx = torch.meshgrid(torch.linspace(-0.8, 0.8, 32), torch.linspace(-0.8, 0.8, 48), indexing="ij")
    base = torch.stack([yy, xx, (yy + xx) / 2])[None]
    clip = base + torch.linspace(-0.1, 0.1, 9).view(9, 1, 1, 1)
    path = tmp_path / "out" / "video.mp4"
    with mio.Mp4Writer(path, fps=16) as writer:
        writer.write(clip[:1])  # first decoded frame, then chunks of 4
        writer.write(clip[1:5])
        writer.write(clip[5:])
    assert writer.frames_written == 9 and path.is_file()
    assert not list(path.parent.glob(".*partial*"))
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert float(stream.average_rate) == 16
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert decoded.shape == (9, 32, 48, 3)
    assert np.abs(decoded.astype(int) - mio.frames_to_uint8(clip).astype(int)).mean() < 3  # crf 10


def test_video_roundtrip_trims_to_vae_length(tmp_path):
    frames = np.stack([np.full((32, 48, 3), 20 * i, np.uint8) for i in range(7)])
    mio.write_video(frames, tmp_path / "v.mp4", fps=8)
    loaded, fps = mio.load_video(tmp_path / "v.mp4")
    assert loaded.shape == (7, 32, 48, 3) and fps == 8
    clip = mio.prepare_video(tmp_path / "v.mp4", 16, 16)
    assert clip.shape == (1, 5, 3, 16, 16)  # 1 + 4n frames


def test_writer_errors(tmp_path):
    with pytest.raises(InputError, match="fps must be > 0"):
        mio.Mp4Writer(tmp_path / "x.mp4", fps=0)
    with pytest.raises(InputError, match="even frame sizes"):
        mio.write_video(np.zeros((1, 31, 48, 3), np.uint8), tmp_path / "x.mp4", fps=8)
    assert not (tmp_path / "x.mp4").exists()
    with pytest.raises(InputError, match="not found"):
        mio.load_video(tmp_path / "none.mp4")
