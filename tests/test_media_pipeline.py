"""Tiny full model (T5 + flow + VAE, the suite's three-aspect ``media_export``): image-to-video context,
torch-backend media graphs, media graphs through calibrate and verify, and the per-stage seconds of a
prompt → video run (printed, not asserted)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")
pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

from starflow_trt.export.manifest import load_manifest  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def png(tmp_path_factory):
    from PIL import Image

    img = (np.random.default_rng(0).random((50, 80, 3)) * 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("png") / "in.png"
    Image.fromarray(img).save(path)
    return path


def test_image_to_video_context_is_encode_video_of_the_image(media_export, png, monkeypatch):
    from starflow_trt.media import latents as V
    from starflow_trt.media.io import prepare_image
    from starflow_trt.runtime import Pipeline

    pipe = Pipeline.from_dir(media_export, backend="ort")
    seen = {}
    original = V.context_latents

    def spy(mean, logvar, norm, noise_std, generator=None, sample=True):
        seen.update(mean=mean.clone(), logvar=logvar.clone(), noise_std=noise_std)
        seen["context"] = original(mean, logvar, norm, noise_std, generator, sample)
        return seen["context"]

    monkeypatch.setattr(V, "context_latents", spy)
    seed = 5
    res = pipe.generate(prompt=["a cat"], image=str(png), seed=seed, num_frames=3, guidance=1.5)
    g, vae = pipe.geo, pipe.vae_stage
    image = prepare_image(str(png), g.height * vae.spatial, g.width * vae.spatial)   # [1, 1, 3, H, W]
    mean_latents = pipe.encode_video(image, sample=False)                          # the image's latents
    ctx = seen["context"]
    assert ctx.shape == mean_latents.shape == (1, 1, 4, g.height, g.width)
    assert seen["noise_std"] == g.noise_std > 0
    # the deterministic part of the context is encode_video of the image (same graph, same numbers) ...
    assert torch.equal(vae.norm.latents_from_moments(seen["mean"], seen["logvar"], sample=False), mean_latents)
    # ... plus upstream's draws from the seed + 1 stream: posterior eps (raw logvar), then noise_std noise
    gen = torch.Generator().manual_seed(seed + 1)
    eps = torch.randn(mean_latents.shape, generator=gen)
    noise = torch.randn(mean_latents.shape, generator=gen)
    std = torch.exp(0.5 * seen["logvar"].clamp(-30, 20))
    expected = mean_latents + std * eps + g.noise_std * noise   # frame 0: no temporal scale
    assert torch.allclose(ctx, expected, rtol=0, atol=1e-6)
    # and the flow sampled from exactly that context
    y, u = pipe.encode_text(["a cat"])
    ref = pipe.generate(y, u, context=expected, seed=seed, num_frames=3, guidance=1.5)
    assert torch.allclose(res.latents, ref.latents, rtol=0, atol=1e-5)
    assert res.video.shape == (1, 9, 3, 16 * g.height, 16 * g.width)


def test_torch_backend_builds_vae_graphs_from_the_recorded_source(media_export, exports):
    from starflow_trt.runtime import Pipeline

    from .onnx_helpers import rel_error

    graphs = media_export
    source = load_manifest(graphs).graphs["vae_decode_step"].extra["source"]
    assert source["path"] == str(exports.media("tiny_vae").resolve())
    z = torch.randn(1, 3, 4, 3, 5, generator=torch.Generator().manual_seed(3))   # 16:9
    with Pipeline.from_dir(graphs, backend="torch") as pt, Pipeline.from_dir(graphs, backend="ort") as po:
        a, b = pt.decode(z), po.decode(z)
        assert a.shape == (1, 9, 3, 48, 80) and rel_error(a, b) <= 1e-5
        clip = b.clamp(-1, 1)
        assert rel_error(pt.encode_video(clip), po.encode_video(clip)) <= 1e-5
        ya, ua = pt.encode_text(["a cat"])
        yb, ub = po.encode_text(["a cat"])
        assert rel_error(ya, yb) <= 1e-5 and rel_error(ua, ub) <= 1e-5


def test_media_graphs_through_calibrate_and_verify(media_export, tmp_path):
    from click.testing import CliRunner

    from starflow_trt.calibration import calibrate_directory
    from starflow_trt.cli import main
    from starflow_trt.runtime import Pipeline

    graphs = media_export
    with Pipeline.from_dir(graphs, backend="ort") as pipe:
        y, u = pipe.encode_text(["a cat", "a red square", "a dog", "rain"])
    out = tmp_path / "fp16"
    m = calibrate_directory(graphs, out, "fp16", text=y, uncond=u, guidance=1.5, force=True, log=lambda _: None)
    prec = {k: s.precision for k, s in m.graphs.items()}
    assert prec["text_encoder"] == "fp32"
    assert all(prec[k] == "fp16" for k in prec if k.startswith("vae_"))
    gated = m.extra["quality"]["graphs"]
    assert {"vae_decode_first", "vae_decode_step"} <= set(gated)   # decoded during capture, so gated
    for name in ("vae_decode_first", "vae_decode_step"):
        assert gated[name]["calls"] >= 1 and max(gated[name]["rel_l2"].values()) <= 0.01
    # an int8 directory keeps the VAE in fp16 (never int8) and the text encoder in fp32
    m8 = calibrate_directory(graphs, tmp_path / "int8", "int8", text=y, uncond=u, guidance=1.5, force=True,
                             log=lambda _: None)
    assert m8.graphs["vae_decode_step"].precision == "fp16" and m8.graphs["text_encoder"].precision == "fp32"
    assert m8.graphs["deep_step"].precision == "int8"
    res = CliRunner().invoke(main, ["verify", str(out), "--json"])
    assert res.exit_code == 0, res.output
    import json

    rows = {g["name"]: g for g in json.loads(res.output)["graphs"]}
    assert rows["vae_decode_step"]["inputs"] == "sampled" and 0 < rows["vae_decode_step"]["rel_l2"] <= 0.01
    assert rows["vae_encode_first"]["inputs"] == "sampled" and rows["text_encoder"]["rel_l2"] == 0


def test_prompt_to_video_seconds_per_stage(media_export, capsys):
    """Measured for the closing note (printed, never asserted: timings belong to benchmarks/)."""
    from starflow_trt.runtime import Pipeline

    with Pipeline.from_dir(media_export, backend="ort") as pipe:
        pipe.generate(prompt=["warm up"], num_frames=3, guidance=1.5)
        res = pipe.generate(prompt=["a cat"], num_frames=3, guidance=1.5, seed=1)
    s = res.stats
    assert res.video.shape[1] == 9 and s["time_to_first_decoded_frame"] > 0
    sec = s["seconds"]
    flow = sec["total"] - sec["decode"]   # the decoder runs inside the flow's frame callbacks
    with capsys.disabled():
        print(f"\n[tiny T5 + flow + VAE, ORT CPU, 1 prompt, 3 latent frames -> 9 frames] text {sec['text']:.4f} s, "
              f"flow {flow:.4f} s, decode {sec['decode']:.4f} s, time to first decoded frame "
              f"{s['time_to_first_decoded_frame']:.4f} s; all stages {sec}")
