"""TensorRT side, checked on CPU: op support, profile coverage of real generations, metadata refusal,
build plan / no-GPU behaviour, doctor, and no TensorRT import at package import."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from starflow_trt.cli import main
from starflow_trt.engine.metadata import DeviceInfo, EngineMetadata, check_engine_metadata
from starflow_trt.engine.ops import check_graph_ops
from starflow_trt.engine.profiles import graph_profile, parse_shape_override, within
from starflow_trt.errors import StarflowError
from starflow_trt.export.manifest import load_manifest
from starflow_trt.reference import JacobiConfig
from starflow_trt.runtime import Pipeline

pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("trt", ["10", "11"])
def test_every_op_is_supported(goldens_export, toy_export, trt):
    for directory in (goldens_export, toy_export):
        for spec in load_manifest(directory).graphs.values():
            assert check_graph_ops(spec.path, trt) == [], spec.name


def test_qdq_and_fp16_graphs_are_supported(goldens_export, cases, tmp_path):
    from starflow_trt.calibration.fp16 import convert_fp16

    spec = load_manifest(goldens_export).graph("deep_step")
    convert_fp16(spec.path, tmp_path / "f16.onnx")
    assert check_graph_ops(tmp_path / "f16.onnx", "10") == []


def record_shapes(pipe):
    """Wrap every runner to record (graph, input shapes) of each call."""
    seen = []
    for name in pipe.manifest.graphs:
        runner = pipe.runner(name)
        original = runner.run

        def spy(inputs, outputs, _name=name, _orig=original):
            seen.append((_name, {k: tuple(v.shape) for k, v in inputs.items()}))
            _orig(inputs, outputs)

        runner.run = spy
    return seen


def walk_generations(pipe, y, yu, noise, ctx):
    for guidance in (0.0, 2.0):
        for jac in (None, JacobiConfig(block_size=8, max_iter=8, threshold=1e-3, schedule="upstream"),
                    JacobiConfig(block_size=8, max_iter=8, threshold=1e-3)):
            pipe.generate(y, yu, noise=noise, guidance=guidance, jacobi=jac)
    pipe.generate(y, yu, noise=noise, guidance=2.0, context=ctx, jacobi=JacobiConfig(block_size=8, max_iter=4))
    pipe.score(noise, y)


def assert_covered(pipe, seen):
    assert len(seen) > 50
    for name, shapes in seen:
        problems = within(graph_profile(pipe.manifest.graph(name)), shapes)
        assert not problems, f"{name}: {problems}"


def test_profiles_cover_full_generation_goldens(goldens_export, cases):
    pipe = Pipeline.from_dir(goldens_export)
    seen = record_shapes(pipe)
    walk_generations(pipe, cases["y"], cases["y_uncond"], cases["noise"], cases["cond_frame"])
    assert {n for n, _ in seen} == set(pipe.manifest.graphs)
    assert_covered(pipe, seen)


def test_profiles_cover_full_generation_toy(toy_export):
    from starflow_trt.toy import load_bundled

    toy = load_bundled()
    pipe = Pipeline.from_dir(toy_export)
    seen = record_shapes(pipe)
    prompts = ["a red square moving left", "a blue disc moving up"]
    g = pipe.geo
    noise = torch.randn(2, g.max_frames, 3, g.height, g.width, generator=torch.Generator().manual_seed(0))
    walk_generations(pipe, toy.encode(prompts), toy.encode(["", ""]), noise, noise[:, :1])
    assert_covered(pipe, seen)


def test_overrides_and_parsing(goldens_export):
    spec = load_manifest(goldens_export).graph("deep_step")
    name, rng = parse_shape_override("P=0:32:64")
    prof = graph_profile(spec, {name: rng, "frames": {"max": 3}})
    assert prof["past_k_0"][2][0] == 64 and prof["past_v_1"][1][0] == 32
    assert within(prof, {"past_k_0": (65, 1, 2, 32)})
    with pytest.raises(StarflowError, match="DIM=MIN:OPT:MAX"):
        parse_shape_override("P=1:2")


def test_metadata_refusals():
    meta = EngineMetadata(graph="deep_step", graph_sha256="a" * 64, precision="fp32", tensorrt_version="10.3.0",
                          gpu_name="NVIDIA L4", compute_capability="8.9", profiles={})
    gpu = DeviceInfo("NVIDIA L4", "8.9")
    check_engine_metadata(meta, "a" * 64, gpu, "10.3.0")
    with pytest.raises(StarflowError, match="different graph"):
        check_engine_metadata(meta, "b" * 64, gpu, "10.3.0")
    with pytest.raises(StarflowError, match="compute capability 8.9.*9.0"):
        check_engine_metadata(meta, "a" * 64, DeviceInfo("NVIDIA H100", "9.0"), "10.3.0")
    with pytest.raises(StarflowError, match="TensorRT 10.3.0.*TensorRT 11.0.0"):
        check_engine_metadata(meta, "a" * 64, gpu, "11.0.0")
    again = EngineMetadata.from_dict(json.loads(json.dumps(meta.to_dict())))
    assert again == meta


def test_build_dry_run_and_no_gpu(goldens_export, tmp_path):
    runner = CliRunner()
    out = runner.invoke(main, ["build", str(goldens_export), "--dry-run", "--shape", "P=0:16:76"])
    assert out.exit_code == 0, out.output
    plan = json.loads(out.output)
    assert plan["graphs"]["deep_step"]["network"] == "strongly typed"
    assert plan["graphs"]["deep_step"]["profile"]["past_k_0"][1][0] == 16
    out = runner.invoke(main, ["build", str(goldens_export), "--dry-run", "--fp16-flag", "--trt-version", "11"])
    assert out.exit_code == 2 and "TensorRT 11" in out.output
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the no-GPU refusal cannot be observed")
    out = runner.invoke(main, ["build", str(goldens_export), "-o", str(tmp_path / "eng")])
    assert out.exit_code == 2
    assert len(out.output.strip().splitlines()) == 1 and out.output.startswith("error:")
    assert not (tmp_path / "eng").exists()


def test_doctor_runs():
    out = CliRunner().invoke(main, ["doctor"])
    assert out.exit_code == 0 and "onnxruntime" in out.output and "build" in out.output
    report = json.loads(CliRunner().invoke(main, ["doctor", "--json"]).output)
    assert report["verbs"]["export"][0] is True
    if not torch.cuda.is_available():
        assert report["verbs"]["build"][0] is False


def test_no_tensorrt_import_at_package_import():
    code = ("import sys, starflow_trt, starflow_trt.runtime, starflow_trt.engine, starflow_trt.cli, "
            "starflow_trt.runtime.backends.trt_backend, starflow_trt.engine.build; "
            "assert 'tensorrt' not in sys.modules, 'tensorrt imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
