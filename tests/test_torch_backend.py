"""``--backend torch``: the stage modules on a device in fp32 / fp16 / bf16, the step as one SDPA over the
cache prefix; goldens on the CPU for every schedule, the toy quality gate, and no device mixing."""

from __future__ import annotations

import pytest
import torch

from starflow_trt.errors import BackendUnavailable, InputError
from starflow_trt.reference import JacobiConfig, load_reference
from starflow_trt.runtime.pipeline import Pipeline

from .conftest import assert_golden

pytest.importorskip("onnxruntime")

EXACT = {s: JacobiConfig(block_size=8, max_iter=40, threshold=0.0, schedule=s)
         for s in ("upstream", "sliding", "predictive")}
TH = {s: JacobiConfig(block_size=8, max_iter=32, threshold=1e-3, schedule=s) for s in ("upstream", "sliding", "predictive")}
LONG = JacobiConfig(block_size=8, max_iter=40, threshold=0.0, schedule="predictive", window=2, context_length=1)


@pytest.fixture(scope="module")
def torch_pipe(goldens_export, goldens_dir):
    with Pipeline.from_dir(goldens_export, backend="torch", checkpoint=goldens_dir / "model.pth",
                           device="cpu") as pipe:
        yield pipe


def golden_runs(cases) -> dict[str, tuple[str, dict]]:
    """label → (golden, generate kwargs): AR, every schedule exact and thresholded, I2V, denoising."""
    yu = cases["y_uncond"]
    g2 = dict(y_uncond=yu, guidance=2.0)
    runs = {"ar.g0": ("reverse.g0", dict(denoise=False)), "ar.g2": ("reverse.g2", dict(g2, denoise=False)),
            "upstream.th": ("jacobi.th.g2", dict(g2, jacobi=TH["upstream"], denoise=False)),
            "i2v": ("i2v.jacobi.g2", dict(g2, jacobi=EXACT["upstream"], context=cases["cond_frame"], denoise=False)),
            "denoised": ("denoised", dict())}
    for s, jac in EXACT.items():   # threshold 0: every schedule reaches the AR fixed point
        runs[f"{s}.exact"] = ("reverse.g2" if s != "upstream" else "jacobi.exact.g2", dict(g2, jacobi=jac, denoise=False))
    return runs


def test_goldens_through_the_torch_backend_every_schedule(torch_pipe, cases):
    for label, (golden, kwargs) in golden_runs(cases).items():
        result = torch_pipe.generate(cases["y"], noise=cases["noise"], **kwargs)
        assert_golden(result.latents, cases[golden], f"{golden} ({label})")
    assert torch_pipe.backend.describe()["device"] == "cpu"


def test_thresholded_schedules_match_ort(torch_pipe, goldens_export, cases):
    # sliding / predictive have no upstream golden: the ORT pipeline is the independent run
    with Pipeline.from_dir(goldens_export, backend="ort") as ort:
        for s in ("sliding", "predictive"):
            kwargs = dict(y_uncond=cases["y_uncond"], guidance=2.0, noise=cases["noise"], jacobi=TH[s], denoise=False)
            a = torch_pipe.generate(cases["y"], **kwargs).latents
            b = ort.generate(cases["y"], **kwargs).latents
            assert_golden(a, b, "jacobi.th")


def test_cached_step_is_the_exported_step(goldens_dir):
    """CachedStepGraph (SDPA over the cache prefix) == StepGraph (two-part scores), fp32 and bf16."""
    from starflow_trt.checkpoint import load_state_dict
    from starflow_trt.config import load_config
    from starflow_trt.export.graphs import CachedStepGraph, StepGraph
    from starflow_trt.export.weights import BlockLoader

    cfg = load_config(goldens_dir / "config.yaml")
    state = load_state_dict(goldens_dir / "model.pth")
    k = cfg.num_blocks - 1
    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        block = BlockLoader(cfg, state, dtype).block(k)
        heads, hd, layers, c = block.heads, block.head_dim, block.num_layers, block.token_channels
        for s, p in ((1, 0), (1, 7), (5, 0), (5, 9)):
            tokens = torch.randn(2, s, c, generator=g)
            cos, sin = torch.randn(2, s, hd, generator=g)
            buf = torch.randn(layers, 2, p + s, 2, heads, hd, generator=g).to(dtype)
            past = [buf[l, i, :p] for l in range(layers) for i in range(2)]
            want = StepGraph(block)(tokens, cos, sin, *past)
            a, b = CachedStepGraph(block)(tokens, cos, sin, *(buf[l, i] for l in range(layers) for i in range(2)))
            new = [buf[l, i, p:] for l in range(layers) for i in range(2)]
            for got, ref in zip((a, b, *new), want):
                assert got.dtype == ref.dtype
                err = float((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))
                assert err < tol, (dtype, s, p, err)


@pytest.fixture(scope="module")
def toy_manifest():
    """The bundled toy's manifest without ONNX files (what the torch backend needs; seconds, not an export)."""
    from starflow_trt.export.limits import ExportLimits
    from starflow_trt.export.onnx_export import graphless_manifest
    from starflow_trt.toy import load_bundled

    toy = load_bundled()
    return graphless_manifest(toy.config_path, toy.checkpoint_path, ExportLimits(max_batch=8))


def _toy_pipe(manifest, dtype=None) -> Pipeline:
    from starflow_trt.runtime.backends.torch_backend import TorchBackend

    return Pipeline(manifest, TorchBackend(manifest, dtype=dtype))


@pytest.mark.parametrize("dtype", [pytest.param("fp16", marks=pytest.mark.slow), "bf16"])   # CPU fp16: ~60 s
def test_half_precision_workspace_and_toy_quality_gate(toy_manifest, dtype):
    """The calibration gate of a half export (bits/dim, latent PSNR) against the fp32 torch backend."""
    from starflow_trt.calibration.calibrate import _check_gate, _compare, default_gate
    from starflow_trt.toy.calibration import toy_calibration_set

    text, uncond, clips = toy_calibration_set(toy_manifest, samples=4)
    with _toy_pipe(toy_manifest) as p32, _toy_pipe(toy_manifest, dtype) as pt:
        quality = _compare(p32, pt, text, uncond, 2.0, JacobiConfig(block_size=16, max_iter=32, threshold=1e-3), clips)
        want = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        assert pt.workspace._flat["deep_kv"].dtype == want and p32.workspace._flat["deep_kv"].dtype == torch.float32
        assert pt.backend.describe()["dtype"] == str(want).replace("torch.", "")
    gate = default_gate(dtype)
    assert _check_gate({"graphs": {}, **quality}, gate) == [], quality


def test_toy_through_the_torch_backend_is_the_reference_sampler(toy_manifest):
    """fp32 toy clips through Pipeline (torch backend) equal the eager reference sampler's (upstream Jacobi)."""
    from starflow_trt.calibration.calibrate import psnr
    from starflow_trt.toy import load_bundled

    toy = load_bundled()
    y, u = toy.encode(["a red square moving left", "a blue disc moving up"]), toy.encode(["", ""])
    g = toy_manifest.geometry
    noise = torch.randn(2, g.max_frames, g.channel_size, g.height, g.width, generator=torch.Generator().manual_seed(0))
    jac = JacobiConfig(block_size=16, max_iter=32, threshold=1e-3, schedule="upstream")
    ours = _toy_pipe(toy_manifest).generate(y, u, noise=noise, guidance=3.0, jacobi=jac, denoise=False).latents
    ref = load_reference(toy.config_path, toy.checkpoint_path).sample(noise, y, u, guidance=3.0, jacobi=jac)
    assert psnr(ours, ref) >= 60.0, psnr(ours, ref)   # fp32 against fp32: rounding only


def test_bad_device_and_dtype_are_one_line_errors(goldens_export, goldens_dir):
    ckpt = goldens_dir / "model.pth"
    with pytest.raises(InputError, match="unknown dtype 'fp8'"):
        Pipeline.from_dir(goldens_export, backend="torch", checkpoint=ckpt, dtype="fp8")
    with pytest.raises(InputError, match="options of --backend torch"):
        Pipeline.from_dir(goldens_export, backend="ort", device="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="--device cpu"):
            Pipeline.from_dir(goldens_export, backend="torch", checkpoint=ckpt, device="cuda")


def test_cli_torch_backend_device_and_dtype(goldens_export, goldens_dir, cases, tmp_path):
    import json

    import numpy as np
    from click.testing import CliRunner

    from starflow_trt.cli import main

    y = tmp_path / "y.npy"
    np.save(y, cases["y"].numpy())
    np.save(tmp_path / "noise.npy", cases["noise"].numpy())
    common = ["generate", str(goldens_export), "--text-embeddings", str(y), "--noise", str(tmp_path / "noise.npy"),
              "--autoregressive", "--no-denoise", "--backend", "torch", "--checkpoint", str(goldens_dir / "model.pth")]
    runner = CliRunner()
    out = runner.invoke(main, [*common, "--device", "cpu", "--dtype", "fp32", "-o", str(tmp_path / "gen")])
    assert out.exit_code == 0, out.output
    assert_golden(torch.from_numpy(np.load(tmp_path / "gen" / "latents.npy")), cases["reverse.g0"], "reverse.g0")
    stats = json.loads((tmp_path / "gen" / "stats.json").read_text())
    assert stats["backend"]["backend"] == "torch" and stats["backend"]["device"] == "cpu"
    if not torch.cuda.is_available():
        out = runner.invoke(main, [*common, "--device", "cuda", "-o", str(tmp_path / "g2")])
        assert out.exit_code == 2 and out.output.startswith("error:") and "--device cpu" in out.output
        assert len(out.output.strip().splitlines()) == 1 and not (tmp_path / "g2").exists()
    out = runner.invoke(main, [*common[:-4], "--device", "cuda:0", "-o", str(tmp_path / "g3")])
    assert out.exit_code == 2 and "options of --backend torch" in out.output


def test_cli_torch_bf16_on_cpu_takes_the_checkpoint_the_export_records(goldens_export, cases, tmp_path):
    """``generate --backend torch --device cpu --dtype bf16`` with no --checkpoint: the manifest's own."""
    import json

    import numpy as np
    from click.testing import CliRunner

    from starflow_trt.cli import main

    np.save(tmp_path / "y.npy", cases["y"].numpy())
    np.save(tmp_path / "noise.npy", cases["noise"].numpy())
    out = CliRunner().invoke(main, ["generate", str(goldens_export), "--text-embeddings", str(tmp_path / "y.npy"),
                                    "--noise", str(tmp_path / "noise.npy"), "--autoregressive", "--no-denoise",
                                    "--backend", "torch", "--device", "cpu", "--dtype", "bf16", "-o", str(tmp_path / "g")])
    assert out.exit_code == 0, out.output
    assert json.loads((tmp_path / "g" / "stats.json").read_text())["backend"]["dtype"] == "bfloat16"
    got, want = torch.from_numpy(np.load(tmp_path / "g" / "latents.npy")), cases["reverse.g0"]
    err = float((got - want).norm() / want.norm())
    assert 1e-3 < err < 0.15   # bf16 rounding through a random-weight flow (measured 0.075), not FP32's 1e-6
