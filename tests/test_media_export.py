"""Media graphs through the graph registry: export with --text-encoder / --vae, manifest fields, ORT vs PyTorch.

The exports come from the suite's factory: ``media_export`` (the goldens flow at three aspects, the tiny T5
and VAE) serves the text-encoder, VAE and end-to-end tests; ``goldens_export`` (no media sources) the
no-media ones."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")
pytest.importorskip("onnxruntime")

from starflow_trt.errors import ConfigError  # noqa: E402
from starflow_trt.export.manifest import load_manifest  # noqa: E402
from starflow_trt.export.onnx_export import ExportLimits, export_graphs  # noqa: E402
from starflow_trt.media import text as T  # noqa: E402
from starflow_trt.media.tiny import make_t5_dir  # noqa: E402

from .onnx_helpers import ort_run, rel_error  # noqa: E402

LIMITS = ExportLimits(height=6, width=4, max_frames=3, max_batch=4)


@pytest.fixture(scope="module")
def t5_dir(exports):
    return exports.media("tiny_t5")


@pytest.mark.slow   # media_export: built once for the slow tier's media tests
def test_text_encoder_graph_manifest_and_parity(media_export, t5_dir, goldens_dir):
    from starflow_trt.config import load_config

    m = load_manifest(media_export)
    spec = m.graphs["text_encoder"]
    assert spec.kind == "text_encoder" and [t.name for t in spec.inputs] == ["input_ids", "attention_mask"]
    assert spec.dims["tokens"].max == 4 and spec.dims["batch"].max == 8
    cfg = load_config(goldens_dir / "config.yaml")
    assert spec.extra["template"] == T.TextTemplate.from_config(cfg).to_dict()
    assert spec.extra["d_model"] == 16
    hashes = spec.extra["tokenizer_files"]
    copied = T.tokenizer_files(media_export / spec.extra["tokenizer_dir"])
    assert hashes and hashes == copied == T.tokenizer_files(t5_dir)
    # ORT vs PyTorch on real tokens, at a batch the graph was not traced with
    enc = T.T5TextEncoder.from_pretrained(t5_dir, T.TextTemplate(txt_size=4))
    ids, mask = enc.tokenize(["a cat", "", "a red square moving right"])
    ort = ort_run(spec.path)(ids, mask)[0]
    ref = enc.encode_texts(["a cat", "", "a red square moving right"])
    assert rel_error(ort, ref) <= 1e-5
    assert (ort[mask == 0] == 0).all()


def test_text_encoder_width_must_match_the_flow(goldens_dir, tmp_path):
    wide = make_t5_dir(tmp_path / "t5", d_model=32)
    with pytest.raises(ConfigError, match="txt_dim 16"):
        export_graphs(goldens_dir / "config.yaml", goldens_dir / "model.pth", tmp_path / "out",
                      graphs=["text_encoder"], limits=LIMITS, text_encoder=wide)
    assert not (tmp_path / "out").exists()


def test_no_media_sources_no_media_graphs(goldens_export, cases):
    from starflow_trt.runtime import Pipeline

    kinds = {s.kind for s in load_manifest(goldens_export).graphs.values()}
    assert not kinds & {"text_encoder", "vae_decode_first", "vae_decode_step", "vae_encode"}
    with Pipeline.from_dir(goldens_export, backend="ort") as pipe:   # no VAE: latents, no video
        res = pipe.generate(cases["y"][:1], seed=3, num_frames=2, denoise=False)
    assert res.video is None and res.latents.shape[:2] == (1, 2)


def test_cli_media_sources_validated_before_any_work(goldens_dir, t5_dir, tmp_path):
    from click.testing import CliRunner

    from starflow_trt.cli import main

    base = ["export", str(goldens_dir / "config.yaml"), str(goldens_dir / "model.pth"), "-o", str(tmp_path / "o")]
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    (no_tok / "config.json").write_text("{}")
    bad_vae = tmp_path / "vae.bin"
    bad_vae.write_bytes(b"x")
    cases = [(["--text-encoder", str(tmp_path / "missing")], "is not a directory"),
             (["--text-encoder", str(tmp_path)], "has no config.json"),
             (["--text-encoder", str(no_tok)], "has no tokenizer"),
             (["--vae", str(tmp_path / "missing.pth")], "does not exist"),
             (["--vae", str(bad_vae)], "is not a .pth or .safetensors"),
             (["--vae", str(no_tok.parent / "t5dir_without_config")], "does not exist")]
    for extra, message in cases:
        out = CliRunner().invoke(main, base + extra)
        assert out.exit_code == 2, out.output
        lines = out.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], out.output
    assert not (tmp_path / "o").exists()


def test_cli_exports_text_encoder(goldens_dir, t5_dir, tmp_path):
    from click.testing import CliRunner

    from starflow_trt.cli import main

    out = CliRunner().invoke(main, ["export", str(goldens_dir / "config.yaml"), str(goldens_dir / "model.pth"),
                                    "-o", str(tmp_path / "o"), "--graphs", "text_encoder", "--grid", "6x4",
                                    "--text-encoder", str(t5_dir)])
    assert out.exit_code == 0, out.output
    assert set(load_manifest(tmp_path / "o").graphs) == {"text_encoder"}
    assert T.tokenizer_files(tmp_path / "o" / "tokenizer") == T.tokenizer_files(t5_dir) != {}


@pytest.mark.slow   # media_export: built once for the slow tier's media tests
def test_pipeline_encode_text_matches_pytorch(media_export, t5_dir):
    from starflow_trt.runtime import Pipeline

    pipe = Pipeline.from_dir(media_export, backend="ort")
    y, y_uncond = pipe.encode_text(["a cat", "a dog"], fps=16, aspect="16:9")
    template = pipe.text_stage.template
    enc = T.T5TextEncoder.from_pretrained(t5_dir, template)
    ref_y, ref_u = enc.encode(["a cat", "a dog"], fps=16, aspect="16:9")
    assert y.shape == (2, 4, 16) and rel_error(y, ref_y) <= 1e-5 and rel_error(y_uncond, ref_u) <= 1e-5
    assert y_uncond.abs().sum() > 0   # the template around "", not zeros
    neg = pipe.encode_text(["a cat"], negative_prompt=["blurry"])[1]
    assert rel_error(neg, enc.encode_texts([template.apply("blurry")])) <= 1e-5


@pytest.mark.slow   # media_export: built once for the slow tier's media tests
def test_pipeline_refuses_edited_tokenizer(media_export, tmp_path):
    import shutil

    from starflow_trt.errors import ManifestError
    from starflow_trt.runtime import Pipeline

    copy = tmp_path / "copy"
    shutil.copytree(media_export, copy)
    tok = next(p for p in sorted((copy / "tokenizer").iterdir()))
    tok.write_bytes(tok.read_bytes() + b" ")
    with pytest.raises(ManifestError, match="tokenizer files"):
        Pipeline.from_dir(copy, backend="ort").encode_text(["a cat"])


@pytest.fixture(scope="module")
def vae_export(exports, media_export):
    """(the tiny VAE, the export holding its graphs)."""
    return exports.vae(), media_export


@pytest.mark.slow
def test_vae_graphs_chained_ort_equals_whole_clip(vae_export):
    from starflow_trt.media import latents as LT, vae_stream as VS

    from . import media_oracles as oracles

    vae, out = vae_export
    m = load_manifest(out)
    first, step = (m.graphs[k] for k in ("vae_decode_first", "vae_decode_step"))
    assert first.dims["h"].max == 5 and first.dims["w"].max == 5 and step.dims["h_x8"].max == 40   # 9:16, 16:9
    norm = LT.LatentNorm.from_dict(step.extra["norm"])
    assert norm == LT.LatentNorm.from_vae(vae, None)
    z = torch.randn(1, 3, 4, 3, 2, generator=torch.Generator().manual_seed(5)) * 2
    got = VS.decode_streaming(ort_run(first.path), ort_run(step.path), z)
    err = rel_error(got, oracles.decode_whole(vae, z))
    assert err <= 1e-5, err
    img = torch.rand(2, 1, 3, 32, 48) * 2 - 1
    mean, logvar = ort_run(m.graphs["vae_encode"].path)(img)
    ref_mean, ref_logvar = oracles.encode_whole(vae, img)
    assert rel_error(mean, ref_mean) <= 1e-5 and rel_error(logvar, ref_logvar) <= 1e-5


@pytest.mark.slow
def test_pipeline_decode_and_encode_video_match_pytorch(vae_export):
    from starflow_trt.runtime import Pipeline

    from . import media_oracles as oracles

    vae, out = vae_export
    pipe = Pipeline.from_dir(out, backend="ort")
    norm = pipe.vae_stage.norm
    z = torch.randn(1, 3, 4, 2, 3, generator=torch.Generator().manual_seed(7))
    chunks = []
    frames = pipe.decode(z, on_frames=chunks.append)
    ref = oracles.decode_whole(vae, norm.to_vae(z))
    assert frames.shape == (1, 9, 3, 32, 48) and [c.shape[1] for c in chunks] == [1, 4, 4]
    assert rel_error(frames, ref) <= 1e-5
    clip = frames.clamp(-1, 1)
    lat = pipe.encode_video(clip, sample=False)
    mean, logvar = oracles.encode_whole(vae, clip)
    assert lat.shape == (1, 3, 4, 2, 3)
    assert rel_error(lat, norm.latents_from_moments(mean, logvar, sample=False)) <= 1e-5
    img = pipe.encode_video(clip[:, :1])   # one frame: the image graph
    assert rel_error(img, lat[:, :1]) <= 1e-4


@pytest.mark.slow   # media_export: built once for the slow tier's media tests
def test_generate_from_prompt_equals_generate_from_its_embeddings(media_export):
    from starflow_trt.runtime import Pipeline

    pipe = Pipeline.from_dir(media_export, backend="ort")
    aspect = "9:16"   # not the default: a request names an exported aspect (the grid and the template)
    res = pipe.generate(prompt=["a cat"], guidance=2.0, seed=3, num_frames=2, fps=8, aspect=aspect)
    y, u = pipe.encode_text(["a cat"], fps=8, aspect=aspect)
    ref = pipe.generate(y, u, seed=3, num_frames=2, guidance=2.0, aspect=aspect)   # the embeddings signature
    assert torch.equal(res.latents, ref.latents) and torch.equal(res.video, ref.video)
    assert res.stats["seconds"]["text"] > 0
    with pytest.raises(Exception, match="either text embeddings"):
        pipe.generate(y, prompt=["a cat"])


@pytest.mark.slow   # media_export: built once for the slow tier's media tests
def test_cli_generate_prompt_errors(media_export, tmp_path):
    from click.testing import CliRunner

    from starflow_trt.cli import main

    # in-process CLI: a per-session ORT pool (the CLI's default shared pool is process-wide and every
    # later ORT session of this pytest process would have to join it)
    base = ["generate", str(media_export), "--thread-pool", "session", "-o", str(tmp_path / "o")]
    for extra, message in [([], "exactly one"), (["--prompt", "a", "--negative-prompt", "b", "--negative-prompt", "c"],
                                                 "one per prompt")]:
        out = CliRunner().invoke(main, base + extra)
        assert out.exit_code == 2 and message in out.output, out.output
    out = CliRunner().invoke(main, base + ["--prompt", "a cat", "--frames", "2"])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "o" / "latents.npy").is_file()


def test_toy_takes_prompts_through_its_text_encoder_graph(toy_prompt_export, tmp_path):
    from click.testing import CliRunner

    from starflow_trt.cli import main
    from starflow_trt.runtime import Pipeline
    from starflow_trt.toy import load_bundled

    toy = load_bundled()
    out = toy_prompt_export
    pipe = Pipeline.from_dir(out, backend="ort")
    prompts = ["a red square moving right", "a blue disc moving up"]
    y, u = pipe.encode_text(prompts, fps=16, aspect="16:9")
    assert torch.allclose(y, toy.encode(prompts), rtol=0, atol=1e-6) and torch.equal(u, toy.encode(["", ""]))
    with pytest.raises(Exception, match="unknown word"):
        pipe.encode_text(["a purple cat"])
    res = CliRunner().invoke(main, ["generate", str(out), "--prompt", "a red square moving right", "--guidance", "2",
                                    "--thread-pool", "session", "-o", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "video.mp4").stat().st_size > 0 and (tmp_path / "o" / "latents.npy").is_file()


@pytest.mark.slow
def test_end_to_end_prompt_and_image_to_mp4(media_export, tmp_path):
    """Tiny full model (T5 + flow + VAE): prompt → streamed decode → mp4 of 1 + 4(T-1) frames at the fps asked."""
    import av
    import numpy as np
    from click.testing import CliRunner
    from PIL import Image

    from starflow_trt.cli import main
    from starflow_trt.media.io import frames_to_uint8
    from starflow_trt.runtime import Pipeline

    out = media_export   # its default aspect: 16:9, 3x5 latents, 48x80 frames
    pipe = Pipeline.from_dir(out, backend="ort")
    chunks = []
    res = pipe.generate(prompt=["a cat"], guidance=1.5, seed=1, num_frames=3, on_video=chunks.append)
    assert res.video.shape == (1, 9, 3, 48, 80) and res.video.dtype == torch.uint8
    assert [c.shape[1] for c in chunks] == [1, 4, 4]
    assert np.array_equal(res.video.movedim(-3, -1).numpy(), frames_to_uint8(pipe.decode(res.latents)))
    s = res.stats
    assert s["seconds"]["text"] > 0 and s["seconds"]["decode"] > 0 and s["time_to_first_decoded_frame"] > 0
    img = (np.random.default_rng(0).random((50, 80, 3)) * 255).astype(np.uint8)
    Image.fromarray(img).save(tmp_path / "in.png")
    res2 = pipe.generate(prompt=["a cat"], image=str(tmp_path / "in.png"), seed=1, num_frames=3)
    assert res2.video.shape == (1, 9, 3, 48, 80) and res2.stats["seconds"]["encode"] > 0
    r = CliRunner().invoke(main, ["generate", str(out), "--prompt", "a cat", "--fps", "12", "--frames", "3",
                                  "--thread-pool", "session", "--image", str(tmp_path / "in.png"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 0, r.output
    with av.open(str(tmp_path / "o" / "video.mp4")) as c:
        stream = c.streams.video[0]
        frames = [f for f in c.decode(stream)]
        assert len(frames) == 9 and float(stream.average_rate) == 12 and (stream.width, stream.height) == (80, 48)
