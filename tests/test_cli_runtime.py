"""CLI: generate / score on exported graphs (the demo end to end: test_packaging, from the wheel)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from starflow_trt.cli import main

pytest.importorskip("onnxruntime")


def test_generate_and_score_cli(goldens_export, cases, tmp_path):
    y, u = tmp_path / "y.npy", tmp_path / "u.npy"
    np.save(y, cases["y"].numpy())
    np.save(u, cases["y_uncond"].numpy())
    np.save(tmp_path / "noise.npy", cases["noise"].numpy())
    runner = CliRunner()
    out = runner.invoke(main, ["generate", str(goldens_export), "--text-embeddings", str(y), "--uncond", str(u),
                               "--noise", str(tmp_path / "noise.npy"), "--guidance", "2", "--autoregressive",
                               "--no-denoise", "--thread-pool", "session", "-o", str(tmp_path / "gen")])
    assert out.exit_code == 0, out.output
    latents = np.load(tmp_path / "gen" / "latents.npy")
    golden = cases["reverse.g2"].numpy()
    assert np.abs(latents - golden).max() <= 1e-4 * np.abs(golden).max() + 1e-4
    stats = json.loads((tmp_path / "gen" / "stats.json").read_text())
    assert stats["graph_calls"]["deep_step"] == 72 and stats["time_to_first_frame"] > 0
    assert (tmp_path / "gen" / "latent_preview.png").exists()  # 4 latent channels: a preview, not a video
    np.save(tmp_path / "x.npy", cases["x"].numpy())
    out = runner.invoke(main, ["score", str(goldens_export), "--video", str(tmp_path / "x.npy"),
                               "--text-embeddings", str(y)])
    assert out.exit_code == 0, out.output
    nll = json.loads(out.output)["nll"]
    assert abs(np.mean(nll) - cases["forward.loss"].item()) <= 1e-5 * cases["forward.loss"].item()
    bad = tmp_path / "bad.npy"
    np.save(bad, cases["y"].numpy()[:, :, :8])
    out = runner.invoke(main, ["generate", str(goldens_export), "--text-embeddings", str(bad), "--thread-pool", "session",
                               "-o", str(tmp_path / "b")])
    assert out.exit_code == 2 and out.output.startswith("error:") and "width 16" in out.output
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    out = runner.invoke(main, ["score", str(goldens_export), "--video", str(tmp_path / "junk.npy"),
                               "--text-embeddings", str(y)])
    assert out.exit_code == 2 and ".npy" in out.output


def test_generate_cli_shared_thread_pool(goldens_export, cases, tmp_path):
    # the shared ORT pool is process-wide (every later session must join it), so run in a subprocess
    y, noise = tmp_path / "y.npy", tmp_path / "noise.npy"
    np.save(y, cases["y"].numpy())
    np.save(noise, cases["noise"].numpy())
    out = subprocess.run([sys.executable, "-m", "starflow_trt.cli", "generate", str(goldens_export),
                          "--text-embeddings", str(y), "--noise", str(noise), "--no-denoise",
                          "--thread-pool", "shared", "-o", str(tmp_path / "gen")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    stats = json.loads((tmp_path / "gen" / "stats.json").read_text())
    assert stats["backend"]["thread_pool"] == "shared" and stats["schedule"] == "predictive"
    # the default (predictive) Jacobi at threshold 1e-3 on the goldens model (g0): close to the AR golden, not equal
    latents, golden = np.load(tmp_path / "gen" / "latents.npy"), cases["reverse.g0"].numpy()
    assert np.linalg.norm(latents - golden) <= 0.2 * np.linalg.norm(golden)


def test_score_cli_streams_a_directory_and_a_list(goldens_export, cases, tmp_path):
    # 10 clips on a max_batch 4 export, in files of 1 clip [T, C, H, W] and of 3 clips [B, T, C, H, W]
    from starflow_trt.runtime.pipeline import Pipeline

    gen = np.random.default_rng(0)
    x = np.concatenate([cases["x"].numpy()] * 5) + 0.1 * gen.standard_normal((10, *cases["x"].shape[1:]))
    y = np.concatenate([cases["y"].numpy()] * 5) + 0.1 * gen.standard_normal((10, *cases["y"].shape[1:]))
    x, y = x.astype(np.float32), y.astype(np.float32)
    data = tmp_path / "data"
    data.mkdir()
    rows = [(0, 1), (1, 4), (4, 5), (5, 8), (8, 9), (9, 10)]
    names = []
    for i, (a, b) in enumerate(rows):
        names.append(f"clip{i:02d}.npy")
        np.save(data / names[-1], x[a] if b - a == 1 else x[a:b])
    (data / "notes.txt").write_text("not a latent")
    np.save(tmp_path / "y.npy", y)
    with Pipeline.from_dir(goldens_export) as pipe:
        want = np.concatenate([pipe.score(x[i:i + 4], y[i:i + 4])[0].numpy() for i in range(0, 10, 4)])
    runner = CliRunner()
    listing = tmp_path / "list.txt"
    listing.write_text("# clips\n" + "\n".join(f"data/{n}" for n in names) + "\n\n")
    for video in (data, listing):
        out = runner.invoke(main, ["score", str(goldens_export), "--video", str(video),
                                   "--text-embeddings", str(tmp_path / "y.npy"), "-o", str(tmp_path / f"s_{video.name}")])
        assert out.exit_code == 0, out.output
        scores = json.loads(out.output)
        np.testing.assert_allclose(scores["nll"], want, rtol=1e-6)
        assert [len(f["nll"]) for f in scores["files"]] == [1, 3, 1, 3, 1, 1]
        assert scores["files"][1]["nll"] == scores["nll"][1:4] and scores["files"][1]["path"].endswith("clip01.npy")
        written = json.loads((tmp_path / f"s_{video.name}" / "scores.json").read_text())
        assert written["nll"] == scores["nll"] and len(written["cli"]["inputs"]) == 7
    # one text row per clip, a pickled file, a wrong shape: one-line errors, exit 2
    np.save(tmp_path / "y9.npy", y[:9])
    out = runner.invoke(main, ["score", str(goldens_export), "--video", str(data), "--text-embeddings", str(tmp_path / "y9.npy")])
    assert out.exit_code == 2 and "9 rows but --video holds 10 clips" in out.output
    np.save(data / "zz.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    out = runner.invoke(main, ["score", str(goldens_export), "--video", str(data), "--text-embeddings", str(tmp_path / "y.npy")])
    assert out.exit_code == 2 and "zz.npy" in out.output and out.output.count("\n") == 1
    np.save(data / "zz.npy", x[0, :, :2])
    out = runner.invoke(main, ["score", str(goldens_export), "--video", str(data), "--text-embeddings", str(tmp_path / "y.npy")])
    assert out.exit_code == 2 and "zz.npy" in out.output and "expected a clip [T, 4, 6, 4]" in out.output
    listing.write_text("data/missing.npy\n")
    out = runner.invoke(main, ["score", str(goldens_export), "--video", str(listing), "--text-embeddings", str(tmp_path / "y.npy")])
    assert out.exit_code == 2 and "missing.npy" in out.output


def test_score_cli_splits_a_large_batch(goldens_export, cases, tmp_path):
    x = np.concatenate([cases["x"].numpy()] * 5)
    y = np.concatenate([cases["y"].numpy()] * 5)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    out = CliRunner().invoke(main, ["score", str(goldens_export), "--video", str(tmp_path / "x.npy"),
                                    "--text-embeddings", str(tmp_path / "y.npy")])
    assert out.exit_code == 0, out.output
    nll = json.loads(out.output)["nll"]
    assert len(nll) == 10 and "files" not in json.loads(out.output)
    np.testing.assert_allclose(nll[:2], nll[8:], rtol=1e-6)   # the same clips in the first and last chunk


def test_generate_cli_long_video_matches_reference(goldens_export, cases, ref32, tmp_path):
    # --frames 5 on a 3-frame export: the window defaults to the export's frames (the goldens config has
    # no local_attn_window) and the context to window - 1, upstream's long-video path
    import torch

    from starflow_trt.reference import JacobiConfig

    from .conftest import assert_golden

    np.save(tmp_path / "y.npy", cases["y"].numpy())
    np.save(tmp_path / "u.npy", cases["y_uncond"].numpy())
    common = ["generate", str(goldens_export), "--text-embeddings", str(tmp_path / "y.npy"), "--uncond",
              str(tmp_path / "u.npy"), "--guidance", "2", "--frames", "5", "--seed", "3", "--jacobi-block", "8",
              "--jacobi-iters", "8", "--jacobi-threshold", "0", "--schedule", "upstream", "--thread-pool", "session"]
    noise = torch.randn(2, 5, *cases["noise"].shape[2:], generator=torch.Generator().manual_seed(3))
    runner = CliRunner()
    for extra, window, context in (([], 3, 2), (["--window", "2", "--context-length", "1"], 2, 1)):
        out_dir = tmp_path / f"w{window}"
        out = runner.invoke(main, [*common, *extra, "--no-denoise", "-o", str(out_dir)])
        assert out.exit_code == 0, out.output
        jac = JacobiConfig(block_size=8, max_iter=8, threshold=0.0, schedule="upstream", window=window,
                           context_length=context)
        ref = ref32.sample(noise, cases["y"], cases["y_uncond"], guidance=2.0, jacobi=jac)
        assert_golden(torch.from_numpy(np.load(out_dir / "latents.npy")), ref, "reverse.long_video")
        request = json.loads((out_dir / "stats.json").read_text())["request"]
        assert (request["window"], request["context_length"], request["num_frames"]) == (window, context, 5)
    # the denoiser's 10-frame overlap cannot advance in a 3-frame window: one line, both values, what to pass
    out = runner.invoke(main, [*common, "-o", str(tmp_path / "d")])
    assert out.exit_code == 2 and out.output.startswith("error:") and out.output.count("\n") == 1, out.output
    assert "window=3" in out.output and "denoiser_window=10" in out.output and "--no-denoise" in out.output
    assert not (tmp_path / "d").exists()
    for bad, needle in ((["--window", "2", "--context-length", "2"], "--context-length"),
                        (["--window", "5"], "--window"), (["--autoregressive", "--window", "2"], "--autoregressive")):
        out = runner.invoke(main, [*common, *bad, "--no-denoise", "-o", str(tmp_path / "e")])
        assert out.exit_code == 2 and out.output.count("\n") == 1 and needle in out.output, out.output
