"""``--backend torch``: the stage modules on a device in fp32 / fp16 / bf16, the step as one SDPA over the
cache prefix; goldens on the CPU for every schedule, the toy quality gate, and no device mixing."""

from __future__ import annotations

import pytest
import torch

from starflow_trt.errors import BackendUnavailable, InputError
from starflow_trt.reference import JacobiConfig
from starflow_trt.runtime.pipeline import Pipeline

from .conftest import assert_golden

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: spinning pool threads cost 40x here

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


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_workspace_and_toy_quality_gate(toy_export, dtype):
    from starflow_trt.calibration.calibrate import _check_gate, _compare, default_gate
    from starflow_trt.export.manifest import load_manifest
    from starflow_trt.toy.calibration import toy_calibration_set

    text, uncond, clips = toy_calibration_set(load_manifest(toy_export), samples=4)
    with Pipeline.from_dir(toy_export) as p32, Pipeline.from_dir(toy_export, backend="torch", dtype=dtype) as pt:
        quality = _compare(p32, pt, text, uncond, 2.0, JacobiConfig(block_size=16, max_iter=32, threshold=1e-3), clips)
        want = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        assert pt.workspace._flat["deep_kv"].dtype == want
        assert pt.backend.describe()["dtype"] == {"fp16": "float16", "bf16": "bfloat16"}[dtype]
    gate = default_gate("fp16" if dtype == "fp16" else "int8")   # bf16 keeps 8 mantissa bits: the INT8 gate
    assert _check_gate({"graphs": {}, **quality}, gate) == [], quality


def test_toy_quality_gate_fp32(toy_export):
    from starflow_trt.calibration.calibrate import psnr

    from starflow_trt.toy import load_bundled

    toy = load_bundled()
    prompts = ["a red square moving left", "a blue disc moving up"]
    kwargs = dict(y_uncond=toy.encode(["", ""]), guidance=3.0, seed=0, jacobi=JacobiConfig(block_size=16))
    with Pipeline.from_dir(toy_export) as ort, Pipeline.from_dir(toy_export, backend="torch") as pt:
        a = ort.generate(toy.encode(prompts), **kwargs).latents
        b = pt.generate(toy.encode(prompts), **kwargs).latents
    assert psnr(b, a) >= 60.0   # fp32 against fp32: rounding only


def test_bad_device_and_dtype_are_one_line_errors(goldens_export, goldens_dir):
    ckpt = goldens_dir / "model.pth"
    with pytest.raises(InputError, match="unknown dtype 'fp8'"):
        Pipeline.from_dir(goldens_export, backend="torch", checkpoint=ckpt, dtype="fp8")
    with pytest.raises(InputError, match="options of --backend torch"):
        Pipeline.from_dir(goldens_export, backend="ort", device="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match="--device cpu"):
            Pipeline.from_dir(goldens_export, backend="torch", checkpoint=ckpt, device="cuda")
