"""The service on an export with a T5 text_encoder graph, Wan VAE graphs and three aspects (tiny, ORT, CPU).

Prompts run through the export's text-encoder graph, frames come back as VAE-decoded PNGs of the
requested aspect's size, equal to ``Pipeline.generate`` with the same seed, and the mp4 is the same
frames in H.264. A long batch wait makes concurrent requests share one call without a blocker.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install 'starflow-trt[serve]'")
pytest.importorskip("psutil", reason="psutil is not installed: pip install 'starflow-trt[serve]'")
av = pytest.importorskip("av")

pytestmark = pytest.mark.slow   # the media export, a cluster start

from .test_serving import generate_concurrently, local_service  # noqa: E402

PROMPTS = ["a cat", "a red square moving right", "a dog"]


@pytest.fixture(scope="module")
def service(media_export, tmp_path_factory):
    from starflow_trt.serving.app import ServeConfig

    cfg = ServeConfig(max_ongoing=8, max_queued=8, timeout_s=120, batch_wait_s=1.0, warmup=False,
                      videos_dir=str(tmp_path_factory.mktemp("videos")))
    with local_service(media_export, cfg) as svc:
        yield svc


@pytest.fixture(scope="module")
def pipe(media_export):
    from starflow_trt.runtime import Pipeline

    with Pipeline.from_dir(media_export, backend="ort") as p:
        yield p


def _video(pipe, prompt: str, seed: int, aspect: str) -> np.ndarray:
    """[F, H, W, 3] uint8 of the same request through ``Pipeline.generate`` in this process."""
    res = pipe.generate(prompt=[prompt], seed=seed, aspect=aspect, num_frames=2, jacobi=None)
    return res.video[0].movedim(-3, -1).numpy()


def _mp4_frames(data: bytes, tmp_path) -> np.ndarray:
    path = tmp_path / "decode.mp4"
    path.write_bytes(data)
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


def test_models_name_every_exported_aspect(service):
    model = service.client.models()["data"][0]
    assert model["prompt_encoder"] == "text_encoder" and model["vae"] and model["prompt"]
    assert model["aspect"] == "16:9" and model["aspect_names"] == ["16:9", "9:16", "1:1"]


def test_prompt_at_9_16_streams_decoded_pngs_equal_to_generate_and_the_mp4(service, pipe, tmp_path):
    body = {"prompt": PROMPTS[0], "seed": 5, "aspect": "9:16", "frames": 2, "sampler": "autoregressive", "mp4": True}
    video = service.client.generate(body)
    frames = np.stack(video.frames)
    assert frames.shape == (5, 80, 48, 3) and frames.dtype == np.uint8      # 1 + 4 (T - 1) frames, 9:16 pixels
    want = _video(pipe, PROMPTS[0], 5, "9:16")
    assert np.array_equal(frames, want), int(np.abs(frames.astype(int) - want.astype(int)).max())
    # the mp4 is the H.264 of those frames, as generate writes it (chroma 4:2:0 of noise-like frames: far from them)
    from starflow_trt.media.io import write_video

    mp4 = _mp4_frames(video.mp4, tmp_path)
    again = _mp4_frames(write_video(want, tmp_path / "want.mp4", 16).read_bytes(), tmp_path)
    assert mp4.shape == want.shape and np.abs(mp4.astype(int) - again.astype(int)).mean() < 2
    # the default aspect and another one: their own sizes
    assert np.stack(service.client.generate({**body, "aspect": "1:1", "mp4": False}).frames).shape == (5, 64, 64, 3)
    latents = service.client.generate({**body, "aspect": "16:9", "output": "latents", "mp4": False}).frames
    assert [f.shape for f in latents] == [(4, 3, 5)] * 2


def test_batched_requests_equal_their_solo_results(service, pipe):
    # latent frames: a batch of 3 runs other ORT kernels than a batch of 1 (float rounding, which the
    # VAE and the uint8 rounding can turn into 1-level pixel differences)
    bodies = [{"prompt": p, "seed": 20 + i, "aspect": "9:16", "frames": 2, "sampler": "autoregressive",
               "output": "latents"} for i, p in enumerate(PROMPTS)]
    results = generate_concurrently(service, bodies)
    for body, video in zip(bodies, results):
        assert video.stats["batch_exact"]
        want = pipe.generate(prompt=[body["prompt"]], seed=body["seed"], aspect="9:16", num_frames=2).latents[0]
        err = float(np.abs(np.stack(video.frames) - want.numpy()).max())
        assert err < 1e-4, err
    assert max(v.stats["batch_size"] for v in results) > 1


def test_an_aspect_the_export_lacks_is_refused_with_its_names(service):
    status, body = service.post({"prompt": "a cat", "aspect": "4:3"})
    assert status == 400 and body["field"] == "aspect"
    assert "16:9 (80x48), 9:16 (48x80), 1:1 (64x64)" in body["error"]
