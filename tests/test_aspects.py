"""One export, several aspect ratios (``export --aspects``): grids, dim ranges, runtime grid choice."""

from __future__ import annotations

import json

import pytest
import torch

from starflow_trt.config import load_config
from starflow_trt.errors import InputError, StarflowError
from starflow_trt.export.limits import ExportLimits, geometry_for
from starflow_trt.export.manifest import load_manifest
from starflow_trt.geometry import UPSTREAM_ASPECTS, aspect_grid

from .conftest import MEDIA_ASPECTS, assert_golden

ASPECTS = MEDIA_ASPECTS   # ("16:9", "9:16", "1:1"), the aspects of the media export
GRIDS = {"16:9": (3, 5), "9:16": (5, 3), "1:1": (4, 4)}   # img_size 4, patch 1: area 16 tokens


@pytest.fixture(scope="module")
def aspect_export(media_export):
    """The suite's media export: the goldens flow at these three aspects (its T5 and VAE graphs unused here)."""
    return media_export


@pytest.fixture(scope="module")
def pipe(aspect_export):
    pytest.importorskip("onnxruntime")
    from starflow_trt.runtime.pipeline import Pipeline

    with Pipeline.from_dir(aspect_export, backend="ort") as p:
        yield p


def test_spec_aspect_rule_on_the_7b_config():
    # the spec's table (§1.3): aspect_ratio_to_image_size(640, R, multiple=16)
    from starflow_trt.bench.paths import model_config_7b

    cfg = load_config(model_config_7b())
    table = {"1:1": (40, 40), "16:9": (30, 53), "9:16": (53, 30), "2:3": (49, 33), "3:2": (33, 49),
             "4:5": (45, 36), "5:4": (36, 45), "21:9": (26, 61), "9:21": (61, 26)}
    assert {a: aspect_grid(cfg, a) for a in UPSTREAM_ASPECTS} == table
    geo = geometry_for(cfg, ExportLimits(aspects="auto"))   # VAE / mix_aspect config: all nine by default
    assert geo.aspect_names == UPSTREAM_ASPECTS and (geo.h, geo.w) == (30, 53) and geo.aspect == "16:9"
    assert geo.max_tokens_per_frame == 45 * 36 and geo.min_tokens_per_frame == 26 * 61


def test_latent_rule_without_vae_and_bad_requests(goldens_dir):
    cfg = load_config(goldens_dir / "config.yaml")
    assert {a: aspect_grid(cfg, a) for a in ASPECTS} == GRIDS
    assert geometry_for(cfg, ExportLimits(aspects="auto")).aspects == ()   # no VAE, no mix_aspect: one grid
    with pytest.raises(StarflowError, match="--grid .* or --aspects"):
        geometry_for(cfg, ExportLimits(height=6, width=4, aspects=ASPECTS))
    with pytest.raises(StarflowError, match="not among --aspects"):
        geometry_for(cfg, ExportLimits(aspect="4:5", aspects=ASPECTS))


@pytest.mark.slow   # media_export: built once for the slow tier's media tests
def test_manifest_ranges_cover_every_grid(aspect_export):
    m = load_manifest(aspect_export)
    g = m.geometry
    assert [(a.aspect, a.h, a.w) for a in g.aspects] == [(a, *GRIDS[a]) for a in ASPECTS]
    assert (g.h, g.w) == (3, 5) and set(g.grids) == set(GRIDS.values())
    L, T = g.text_length, g.max_frames
    deep = m.graph("deep_step").dims
    assert (deep["S"].max, deep["P"].max) == (T * 16, L + T * 16)     # the largest grid: 4x4 = 16 tokens
    shallow = m.graph("shallow_step_0").dims
    assert (shallow["S"].max, shallow["P"].max) == (16, 15)
    fwd = m.graph("forward_5").dims
    assert (fwd["h"].min, fwd["h"].opt, fwd["h"].max) == (3, 3, 5) and (fwd["w"].min, fwd["w"].max) == (3, 5)
    assert (fwd["rows"].min, fwd["rows"].max) == (L + 15, L + T * 16)
    den = m.graph("denoiser").dims
    assert (den["h"].min, den["h"].max, den["rows"].max) == (3, 5, L + T * 16)
    # the previous single-grid manifests (no "aspects") still read: one grid
    data = json.loads((aspect_export / "manifest.json").read_text())
    from starflow_trt.geometry import Geometry

    old = {k: v for k, v in data["geometry"].items() if k != "aspects"}
    assert Geometry.from_dict(old).grids == ((3, 5),)


@pytest.mark.slow   # media_export: built once for the slow tier's media tests
@pytest.mark.parametrize("aspect", ASPECTS)
def test_each_aspect_matches_the_reference_sampler(pipe, ref32, cases, aspect):
    h, w = GRIDS[aspect]
    y, yu = cases["y"][:1], cases["y_uncond"][:1]
    noise = torch.randn(1, 3, 4, h, w, generator=torch.Generator().manual_seed(7))
    ref = ref32.sample(noise, y, yu, guidance=2.0)
    out = pipe.generate(y, yu, noise=noise, guidance=2.0, denoise=False, aspect=aspect)
    assert out.latents.shape == (1, 3, 4, h, w)
    assert_golden(out.latents, ref, "reverse.g2")
    # seeded noise without a noise tensor follows the aspect's grid; the noise's grid is found without aspect
    assert pipe.generate(y, seed=1, aspect=aspect, denoise=False).latents.shape == (1, 3, 4, h, w)
    assert_golden(pipe.generate(y, yu, noise=noise, guidance=2.0, denoise=False).latents, ref, "reverse.g2")
    # scoring takes any exported grid too
    nll, _ = pipe.score(ref, y)
    torch.testing.assert_close(nll, ref32.nll(ref, y), rtol=1e-4, atol=1e-5)


@pytest.mark.slow   # media_export: built once for the slow tier's media tests
def test_denoised_aspect_matches_the_reference(pipe, ref32, cases):
    h, w = GRIDS["9:16"]
    y = cases["y"][:1]
    noise = torch.randn(1, 3, 4, h, w, generator=torch.Generator().manual_seed(3))
    raw = ref32.sample(noise, y)
    out = pipe.generate(y, noise=noise, denoise=True, aspect="9:16")
    assert_golden(out.raw, raw, "reverse.g0")
    assert_golden(out.latents, ref32.denoise(raw, y), "denoised")


@pytest.mark.slow   # media_export: built once for the slow tier's media tests
def test_unsupported_aspect_is_one_line(pipe, cases):
    with pytest.raises(InputError, match=r'aspect: this export serves 16:9 \(.*\), 9:16 \(.*\), 1:1 \(.*\), got "4:5"'):
        pipe.generate(cases["y"][:1], aspect="4:5")
    noise = torch.randn(1, 3, 4, 5, 3)
    with pytest.raises(InputError):   # 9:16 noise asked to run as 16:9
        pipe.generate(cases["y"][:1], noise=noise, aspect="16:9")


@pytest.mark.slow   # media_export: built once for the slow tier's media tests
def test_cli_score_of_a_directory_takes_every_exported_grid(aspect_export, pipe, ref32, cases, tmp_path):
    """score --video DIR: clips of any exported grid, mixed in one directory (was: the default grid only)."""
    import numpy as np
    from click.testing import CliRunner

    from starflow_trt.cli import main

    clips = tmp_path / "clips"
    clips.mkdir()
    g = torch.Generator().manual_seed(11)
    xs = {a: torch.randn(2, 2, 4, *GRIDS[a], generator=g) for a in ("9:16", "1:1", "16:9")}
    for i, (a, x) in enumerate(xs.items()):
        np.save(clips / f"{i}.npy", x.numpy())
    y = cases["y"][:1].expand(6, -1, -1).contiguous()
    np.save(tmp_path / "y.npy", y.numpy())
    res = CliRunner().invoke(main, ["score", str(aspect_export), "--video", str(clips), "--text-embeddings",
                                    str(tmp_path / "y.npy")])
    assert res.exit_code == 0, res.output
    scores = json.loads(res.output.strip().splitlines()[-1])
    want = torch.cat([ref32.nll(x, y[:2]) for x in xs.values()])
    torch.testing.assert_close(torch.tensor(scores["nll"]), want.float(), rtol=1e-4, atol=1e-5)
    assert [len(f["nll"]) for f in scores["files"]] == [2, 2, 2]
    np.save(clips / "9.npy", torch.randn(1, 2, 4, 2, 8).numpy())   # no exported grid: one line naming them
    res = CliRunner().invoke(main, ["score", str(aspect_export), "--video", str(clips), "--text-embeddings",
                                    str(tmp_path / "y.npy")])
    assert res.exit_code == 2 and "other exported H x W: 5x3, 4x4" in res.output, res.output


def test_cli_export_by_aspect(goldens_dir, tmp_path):
    """export --aspects: the grids it prints and records (one graph: the CLI wiring is the subject here), and
    generate's one line naming them (latent W x H: no VAE) for an aspect it lacks."""
    pytest.importorskip("onnxruntime")
    import numpy as np
    from click.testing import CliRunner

    from starflow_trt.cli import main

    out = tmp_path / "g"
    runner = CliRunner()
    res = runner.invoke(main, ["export", str(goldens_dir / "config.yaml"), str(goldens_dir / "model.pth"), "-o",
                               str(out), "--aspects", "1:1,9:16", "--max-frames", "2", "--max-batch", "1",
                               "--graphs", "deep_step"])
    assert res.exit_code == 0, res.output
    assert "1:1 4x4, 9:16 5x3" in res.output
    g = load_manifest(out).geometry
    assert [(a.aspect, a.h, a.w) for a in g.aspects] == [("1:1", 4, 4), ("9:16", 5, 3)] and g.max_frames == 2
    y = tmp_path / "y.npy"
    np.save(y, np.zeros((1, 4, 16), np.float32))
    res = runner.invoke(main, ["generate", str(out), "--text-embeddings", str(y), "--aspect", "21:9",
                               "--thread-pool", "session", "-o", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "this export serves 1:1 (4x4), 9:16 (3x5)" in res.output   # latent W x H
    res = runner.invoke(main, ["export", str(goldens_dir / "config.yaml"), str(goldens_dir / "model.pth"), "-o",
                               str(tmp_path / "bad"), "--aspects", "16:9,x"])
    assert res.exit_code == 2 and "16:9" in res.output and not (tmp_path / "bad").exists()


@pytest.mark.slow   # media_export: built once for the slow tier's media tests
def test_cli_generate_by_aspect(aspect_export, tmp_path):
    """generate --aspect on a multi-aspect export: that aspect's grid (and its mp4); an aspect it lacks is one line
    naming the export's in pixels (a VAE export)."""
    import numpy as np
    from click.testing import CliRunner

    from starflow_trt.cli import main

    runner = CliRunner()
    y = tmp_path / "y.npy"
    np.save(y, np.zeros((1, 4, 16), np.float32))
    res = runner.invoke(main, ["generate", str(aspect_export), "--text-embeddings", str(y), "--aspect", "9:16",
                               "--frames", "2", "--no-denoise", "--thread-pool", "session", "-o", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert np.load(tmp_path / "o" / "latents.npy").shape == (1, 2, 4, 5, 3)
    assert (tmp_path / "o" / "video.mp4").stat().st_size > 0
    res = runner.invoke(main, ["generate", str(aspect_export), "--text-embeddings", str(y), "--aspect", "21:9",
                               "--thread-pool", "session", "-o", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "this export serves 16:9 (80x48), 9:16 (48x80), 1:1 (64x64)" in res.output   # pixels


@pytest.mark.slow
def test_bench_quick_config_export_generates_at_three_aspects(tmp_path):
    """The bench's shape family (``bench --quick``'s config: deep 2 × 256, 8×8 tokens a frame at 1:1, random
    weights), not the goldens': one export, three grids, each == the reference sampler."""
    pytest.importorskip("onnxruntime")
    from starflow_trt.bench.paths import bench_config
    from starflow_trt.checkpoint import save_state_dict
    from starflow_trt.export.onnx_export import export_graphs
    from starflow_trt.reference import build_model, load_reference
    from starflow_trt.runtime.pipeline import Pipeline

    config = bench_config("bench_quick.yaml")
    cfg = load_config(config)
    torch.manual_seed(0)
    save_state_dict(build_model(cfg).state_dict(), tmp_path / "model.pth")
    out = tmp_path / "graphs"
    sampling = ["deep_prefill", "deep_step", *(f"shallow_step_{k}" for k in range(cfg.num_blocks - 1))]
    export_graphs(config, tmp_path / "model.pth", out, graphs=sampling,   # no scoring, no denoiser
                  limits=ExportLimits(max_frames=2, max_batch=1, aspects=ASPECTS))
    ref = load_reference(config, tmp_path / "model.pth")
    g = torch.Generator().manual_seed(5)
    y = torch.randn(1, cfg.txt_size, cfg.text_width, generator=g)
    with Pipeline.from_dir(out, backend="ort", thread_pool="session") as pipe:
        grids = set()
        for aspect in ASPECTS:
            h, w = aspect_grid(cfg, aspect)
            grids.add((h, w))
            noise = torch.randn(1, 2, cfg.channel_size, h, w, generator=g)
            expected = ref.sample(noise, y, torch.zeros_like(y), guidance=2.0)
            got = pipe.generate(y, torch.zeros_like(y), noise=noise, guidance=2.0, denoise=False, aspect=aspect)
            assert_golden(got.latents, expected, "reverse.g2")
    assert len(grids) == 3 and (8, 8) in grids
