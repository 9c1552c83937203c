"""GPU suite (`pytest -m gpu`): engines for the goldens and the toy model, checked on the `trt` backend.

The one command a user with an NVIDIA GPU runs to verify a release. Skips here (no GPU).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from starflow_trt.reference import JacobiConfig

from .conftest import assert_golden

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the TensorRT suite needs an NVIDIA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None,
                       reason="tensorrt is not installed: pip install 'starflow-trt[gpu]'"),
]


@pytest.fixture(scope="module")
def goldens_engines(goldens_export, tmp_path_factory):
    from starflow_trt.engine.build import BuildOptions, build_engines

    return build_engines(goldens_export, tmp_path_factory.mktemp("engines") / "goldens", BuildOptions(), log=print)


def test_goldens_on_trt(goldens_engines, cases):
    from starflow_trt.runtime import Pipeline

    pipe = Pipeline.from_dir(goldens_engines.root, backend="trt")
    y, yu, noise = cases["y"], cases["y_uncond"], cases["noise"]
    exact = JacobiConfig(block_size=8, max_iter=40, threshold=0.0, schedule="upstream")
    for name, kwargs in {"reverse.g0": {}, "reverse.g2": dict(y_uncond=yu, guidance=2.0),
                         "jacobi.exact.g2": dict(y_uncond=yu, guidance=2.0, jacobi=exact),
                         "i2v.jacobi.g2": dict(y_uncond=yu, guidance=2.0, jacobi=exact, context=cases["cond_frame"])
                         }.items():
        assert_golden(pipe.generate(y, noise=noise, denoise=False, **kwargs).latents, cases[name], name)
    assert_golden(pipe.generate(y, noise=noise).latents, cases["denoised"], "denoised")


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_toy_quality_gate_on_trt(toy_export, tmp_path_factory, precision):
    from starflow_trt.calibration import calibrate_directory
    from starflow_trt.engine.build import BuildOptions, build_engines
    from starflow_trt.runtime import Pipeline
    from starflow_trt.toy import load_bundled

    from starflow_trt.export.manifest import load_manifest
    from starflow_trt.toy.calibration import toy_calibration_set

    text, uncond, clips = toy_calibration_set(load_manifest(toy_export), samples=16)
    graphs = calibrate_directory(toy_export, tmp_path_factory.mktemp(precision) / "g", precision, text=text,
                                 uncond=uncond, eval_clips=clips, log=print)
    engines = build_engines(graphs.root, tmp_path_factory.mktemp(precision) / "e", BuildOptions(), log=print)
    toy = load_bundled()
    prompts = ["a red square moving left", "a blue disc moving up"]
    ref = Pipeline.from_dir(toy_export, backend="ort")
    trt = Pipeline.from_dir(engines.root, backend="trt")
    kwargs = dict(y_uncond=toy.encode(["", ""]), guidance=3.0, seed=0, jacobi=JacobiConfig(block_size=16))
    a = ref.generate(toy.encode(prompts), **kwargs).latents
    b = trt.generate(toy.encode(prompts), **kwargs).latents
    from starflow_trt.calibration.calibrate import psnr

    assert psnr(b, a) >= graphs.extra["quality"]["gate"]["min_psnr_db"]
