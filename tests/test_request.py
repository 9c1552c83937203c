"""One request validator (``starflow_trt.request``): the CLI and the server refuse the same bad field with the same
text; aspects by the export's names; outputs follow the export (video.mp4 from --text-embeddings with VAE graphs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from starflow_trt.cli import main
from starflow_trt.request import RequestError, RequestLimits, build_request
from starflow_trt.serving.limits import parse_request
from starflow_trt.summary import ModelSummary

#: a latent export with T5 and VAE graphs and three aspects (latent sizes; frames 16x larger)
MEDIA = ModelSummary(directory="/x", precision="fp32", channels=4, height=3, width=5, max_frames=3, max_batch=4,
                     text_length=4, text_width=16, pixel_space=False, has_denoiser=True, window=None,
                     default_guidance=2.5, noise_std=0.5, prompt_encoder="text_encoder", config_hash="h",
                     checkpoint_sha256=None, graphs=("deep_step",), vae=True, vae_encoder=True, pixel_scale=16,
                     aspects=(("16:9", 3, 5), ("9:16", 5, 3), ("1:1", 4, 4)))

#: (CLI options, JSON fields): the same bad value through both front ends
SAME_BAD = [
    (["--guidance", "-1.5"], {"guidance": -1.5}, "guidance"),
    (["--guidance", "nan"], {"guidance": float("nan")}, "guidance"),
    (["--aspect", "4:3"], {"aspect": "4:3"}, "aspect"),
    (["--aspect", "53:30"], {"aspect": "53:30"}, "aspect"),
    (["--seed", "-1"], {"seed": -1}, "seed"),
    (["--frames", "0"], {"frames": 0}, "frames"),
    (["--fps", "0"], {"fps": 0}, "fps"),
    (["--jacobi-block", "0"], {"jacobi": {"block_size": 0}}, "jacobi.block_size"),
    (["--jacobi-threshold", "2"], {"jacobi": {"threshold": 2}}, "jacobi.threshold"),
    (["--frames", "5", "--autoregressive"], {"frames": 5, "sampler": "autoregressive"}, "sampler"),
]


@pytest.mark.parametrize("cli, body, field", SAME_BAD)
def test_cli_and_server_refuse_a_bad_field_with_the_same_text(cli, body, field, tmp_path, monkeypatch):
    monkeypatch.setattr(ModelSummary, "from_dir", classmethod(lambda cls, d: MEDIA))
    with pytest.raises(RequestError) as info:
        parse_request(json.dumps({"prompt": "a cat", **body}).encode(), MEDIA, RequestLimits())
    assert info.value.field == field and str(info.value) == f"{field}: {info.value.reason}"
    out = CliRunner().invoke(main, ["generate", str(tmp_path), "--prompt", "a cat", *cli, "-o", str(tmp_path / "o")])
    assert out.exit_code == 2 and out.output.startswith("error:") and out.output.count("\n") == 1, out.output
    assert info.value.reason in out.output, (info.value.reason, out.output)
    assert not (tmp_path / "o").exists()


def test_defaults_and_sources():
    req = build_request(MEDIA, prompt=["a cat", "a dog"], seed=4)
    assert (req.batch, req.seed, req.seeds, req.aspect, req.frames, req.fps) == (2, 4, None, "16:9", 3, 16)
    assert req.guidance == 2.5 and req.sampler == "jacobi" and req.jacobi.block_size == 16   # the export's cfg
    y = np.zeros((2, 4, 16), np.float32)
    emb = build_request(MEDIA, text_embeddings=y, seed=[1, 2], aspect="9:16")
    assert emb.guidance == 0 and emb.seeds == (1, 2) and emb.aspect == "9:16" and emb.batch == 2
    for kwargs, field in [({}, "prompt"), ({"prompt": "a", "text_embeddings": y}, "prompt"),
                          ({"text_embeddings": y, "guidance": 1.0}, "negative_embeddings"),
                          ({"text_embeddings": y, "negative_prompt": "x"}, "negative_prompt"),
                          ({"prompt": ["a", "b"], "negative_prompt": ["x"]}, "negative_prompt"),
                          ({"text_embeddings": y, "seed": [1]}, "seed"),
                          ({"prompt": "a", "image": "a.png", "video": "v.mp4"}, "image"),
                          ({"text_embeddings": y[:, :, :8]}, "text_embeddings")]:
        with pytest.raises(RequestError) as info:
            build_request(MEDIA, **kwargs)
        assert info.value.field == field, info.value
    with pytest.raises(RequestError, match="text_embeddings: .*length 4, width 16"):
        build_request(MEDIA, text_embeddings=y[:, :, :8])
    no_text = ModelSummary(**{**MEDIA.__dict__, "prompt_encoder": None})
    with pytest.raises(RequestError, match="no text_encoder graph"):
        build_request(no_text, prompt="a")


def _cli_default(command, name: str):
    return next(p.default for p in command.params if p.name == name)


def test_one_jacobi_default_across_api_cli_and_server():
    """``JacobiConfig`` (the one options type: API and requests), ``generate``'s options and the server's JSON
    without a ``jacobi`` field all take the one value of :mod:`starflow_trt.defaults`."""
    from starflow_trt.commands.generate_cmd import generate_command
    from starflow_trt.defaults import DEFAULT_JACOBI_BLOCK, DEFAULT_JACOBI_ITERS, DEFAULT_JACOBI_THRESHOLD
    from starflow_trt.sampling import JacobiConfig

    served = parse_request(json.dumps({"prompt": "a cat"}).encode(), MEDIA, RequestLimits()).generation.jacobi
    cli = tuple(_cli_default(generate_command, n) for n in ("jacobi_block", "jacobi_iters", "jacobi_threshold"))
    for made in (JacobiConfig(), served):
        assert (made.block_size, made.max_iter, made.threshold) == cli
    assert cli == (DEFAULT_JACOBI_BLOCK, DEFAULT_JACOBI_ITERS, DEFAULT_JACOBI_THRESHOLD) == (16, 32, 1e-3)


def test_one_thread_pool_default_across_api_cli_and_server():
    import inspect

    from starflow_trt.commands.generate_cmd import generate_command
    from starflow_trt.commands.serve_cmd import serve_command
    from starflow_trt.defaults import DEFAULT_THREAD_POOL
    from starflow_trt.runtime import Pipeline
    from starflow_trt.runtime.backends import THREAD_POOLS, BackendOptions, make_backend
    from starflow_trt.serving.app import ServeConfig

    api = [inspect.signature(f).parameters["thread_pool"].default for f in (Pipeline.from_dir, make_backend)]
    cli = [_cli_default(c, "thread_pool") for c in (generate_command, serve_command)]
    assert {*api, *cli, BackendOptions().thread_pool, ServeConfig().thread_pool} == {DEFAULT_THREAD_POOL}
    assert DEFAULT_THREAD_POOL in THREAD_POOLS


def test_one_fps_default_the_exports():
    # was: 16 for the CLI, the API and the streaming API, the export's fps for the OpenAI API (8 for the toy)
    from dataclasses import replace

    from starflow_trt.commands.generate_cmd import generate_command
    from starflow_trt.defaults import DEFAULT_FPS
    from starflow_trt.serving import openai_api as oai

    toy = replace(MEDIA, fps=8)                       # vid_size '21:8'
    assert build_request(toy, prompt=["a cat"]).fps == 8 == toy.default_fps == oai.export_fps(toy)
    assert parse_request(json.dumps({"prompt": "a cat"}).encode(), toy, RequestLimits()).generation.fps == 8
    assert build_request(toy, prompt=["a cat"], fps=24).fps == 24
    assert build_request(MEDIA, prompt=["a cat"]).fps == DEFAULT_FPS == oai.export_fps(MEDIA)   # names none
    assert _cli_default(generate_command, "fps") is None        # the request's rule decides


def test_an_unnamed_grid_is_named_after_its_ratio():
    one = ModelSummary(**{**MEDIA.__dict__, "aspects": (), "height": 30, "width": 53})
    assert one.aspect == "53:30" and one.aspect_names == ("53:30",)
    named = ModelSummary(**{**MEDIA.__dict__, "aspects": (("16:9", 30, 53),), "height": 30, "width": 53})
    assert named.aspect == "16:9" and build_request(named, prompt="a", aspect="16:9").aspect == "16:9"


@pytest.mark.slow   # the media export (~1 min), a generate
def test_generate_from_embeddings_on_a_vae_export_writes_video_mp4(media_export, tmp_path):
    pytest.importorskip("av")
    import torch

    from starflow_trt.runtime import Pipeline

    y = np.random.default_rng(0).standard_normal((1, 4, 16)).astype(np.float32)
    np.save(tmp_path / "y.npy", y)
    out = CliRunner().invoke(main, ["generate", str(media_export), "--text-embeddings", str(tmp_path / "y.npy"),
                                    "--aspect", "9:16", "--frames", "2", "--autoregressive", "--seed", "3",
                                    "--thread-pool", "session", "-o", str(tmp_path / "o")])
    assert out.exit_code == 0, out.output
    from starflow_trt.media.io import write_video

    frames = _decoded(tmp_path / "o" / "video.mp4")
    assert frames.shape == (5, 80, 48, 3)                  # 1 + 4 (T - 1) frames of the 9:16 size
    with Pipeline.from_dir(media_export, backend="ort") as pipe:
        want = pipe.generate(torch.from_numpy(y), seed=3, num_frames=2, aspect="9:16")
    assert np.array_equal(np.load(tmp_path / "o" / "latents.npy"), want.latents.numpy())
    # the mp4 is the H.264 of the generated frames (streamed chunk by chunk: x264 differs slightly from one write)
    again = write_video(want.video[0].movedim(-3, -1).numpy(), tmp_path / "want.mp4", 16)
    assert np.abs(frames.astype(int) - _decoded(again).astype(int)).mean() < 2   # frames vs the frames: 40


def _decoded(path) -> np.ndarray:
    """[F, H, W, 3] uint8 of an mp4."""
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(c.streams.video[0])])


def test_random_aspect_is_drawn_per_row_from_its_seed():
    """``aspect: random`` draws one of the export's aspects from the row's seed (reproducible; several seeds
    reach several aspects); a request of several rows is refused (each row draws its own)."""
    from starflow_trt.request import draw_aspect

    drawn = {s: build_request(MEDIA, prompt="a cat", seed=s, aspect="random").aspect for s in range(12)}
    assert drawn == {s: draw_aspect(MEDIA, s) for s in range(12)} and set(drawn.values()) == set(MEDIA.aspect_names)
    assert parse_request(json.dumps({"prompt": "a", "seed": 4, "aspect": "random"}).encode(), MEDIA,
                         RequestLimits()).generation.aspect == drawn[4]
    with pytest.raises(RequestError, match="one row per request"):
        build_request(MEDIA, prompt=["a", "b"], seed=1, aspect="random")
    with pytest.raises(RequestError, match="choose one of them or random"):
        build_request(MEDIA, prompt="a", aspect="banana")


def test_long_video_defaults_are_upstreams_and_resolved_once():
    """The window: the model's, else the export's frames; the context: upstream's 16 frames (window - 1 below)."""
    from dataclasses import replace

    from starflow_trt.sampling import JacobiConfig

    long = replace(MEDIA, max_frames=21, window=21)
    assert build_request(long, prompt="a", frames=61).jacobi.context_length == 16
    assert build_request(long, prompt="a", jacobi={"window": 8}).jacobi.context_length == 7
    assert build_request(MEDIA, prompt="a").jacobi.window == 3          # no model window: the export's frames
    api = build_request(MEDIA, text_embeddings=torch_zeros(2, 4, 16), jacobi=JacobiConfig(block_size=4, floor=0.1))
    assert (api.jacobi.block_size, api.jacobi.floor, api.y.dtype, api.seed) == (4, 0.1, np.float32, api.seed)
    with pytest.raises(RequestError, match="jacobi.window"):
        build_request(MEDIA, prompt="a", jacobi={"window": 4})


def test_frames_the_denoiser_cannot_cover_are_refused_before_any_work():
    """Denoising chunks of the window (3 frames here) that overlap by denoiser_window=10 cannot advance past the
    first chunk: 4 frames are a 400 naming frames, before any graph runs; without denoising, or within one chunk,
    they are fine. The refusal is the sampler's own plan (:func:`starflow_trt.frame_plan.denoise_plan`)."""
    from dataclasses import replace

    from starflow_trt.frame_plan import denoise_plan

    model = replace(MEDIA, denoiser_window=10)
    with pytest.raises(RequestError, match=r"^frames: denoising 4 frames in chunks of window=3 .*denoise") as err:
        build_request(model, prompt="a", frames=4)
    with pytest.raises(Exception) as planned:
        denoise_plan(4, 3, 10)
    assert err.value.reason == str(planned.value)
    assert build_request(model, prompt="a", frames=4, denoise=False).frames == 4
    assert build_request(model, prompt="a", frames=3).frames == 3
    assert build_request(MEDIA, prompt="a", frames=4).frames == 4           # overlap window - 1 always advances
    with pytest.raises(RequestError, match="^frames: .*autoregressive"):   # the window's own plan, as early
        build_request(replace(MEDIA, window=2), prompt="a", frames=3, sampler="autoregressive")


def torch_zeros(*shape):
    import torch

    return torch.zeros(*shape)


def test_pixel_frames_count_as_upstreams_target_length():
    from dataclasses import replace

    assert [replace(MEDIA, frame_scale=4).latent_frames(n) for n in (1, 5, 81, 241)] == [1, 2, 21, 61]
    assert replace(MEDIA, frame_scale=1).latent_frames(6) == 6
