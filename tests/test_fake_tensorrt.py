"""`build` and the `trt` backend executed on CPU under the recording fake of the TensorRT API (tests/fake_tensorrt.py).

Nothing here measures or validates TensorRT: the fake checks the contracts the TensorRT documentation
states (profiles, IO names, every tensor bound, stream handles, capture semantics) and executes the
"engines" with ONNX Runtime, so the trt backend's bind / execute / CUDA-graph plumbing can be compared
with the ort backend on the goldens export. The real check is `pytest -m gpu` (tests/test_gpu.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from starflow_trt.cli import main
from starflow_trt.errors import StarflowError
from starflow_trt.export.manifest import load_manifest
from starflow_trt.reference import JacobiConfig
from starflow_trt.runtime import Pipeline

from . import fake_tensorrt
from .conftest import assert_golden

EXACT = JacobiConfig(block_size=8, max_iter=40, threshold=0.0, schedule="upstream")


@pytest.fixture
def fake_trt(monkeypatch):
    return fake_tensorrt.install(monkeypatch)


def build(src, out, *args, expect: int = 0):
    result = CliRunner().invoke(main, ["build", str(src), "-o", str(out), *args])
    assert result.exit_code == expect, (result.output, result.exception)
    return result


@pytest.mark.parametrize("version,args", [("10.3.0", []), ("10.3.0", ["--fp16-flag"]), ("11.0.0", [])],
                         ids=["trt10-strongly-typed", "trt10-fp16-flag", "trt11"])
def test_build_every_flag_path(goldens_export, tmp_path, monkeypatch, version, args):
    rec = fake_tensorrt.install(monkeypatch, version)
    plan = json.loads(CliRunner().invoke(main, ["build", str(goldens_export), "--dry-run", "--trt-version", version,
                                                *args]).output)
    build(goldens_export, tmp_path / "eng", *args)   # the old `flags = 0` made every --fp16-flag build a TypeError
    names = list(plan["graphs"])
    weak = "--fp16-flag" in args
    strongly_typed_bit = 1 << int(fake_tensorrt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    want_network = 0 if weak or version.startswith("11") else strongly_typed_bit   # 11: always strongly typed
    assert [c[1] for c in rec.named("create_network")] == [want_network] * len(names)
    assert [c[1] for c in rec.named("set_flag")] == [f for n in names for f in plan["graphs"][n]["flags"]]
    assert weak == bool(rec.named("set_flag"))   # FP16 for the flow graphs when weakly typed, nothing otherwise
    engines = load_manifest(tmp_path / "eng")
    assert engines.extra["engines"]["tensorrt"] == version and list(engines.graphs) == names
    for name in names:
        header = fake_tensorrt.plan_header(tmp_path / "eng" / f"{name}.engine")
        assert header["profile"] == plan["graphs"][name]["profile"], name       # the plan's profile, as built
        assert header["strongly_typed"] == (not weak) and header["flags"] == plan["graphs"][name]["flags"]
        assert header["workspace"] == plan["workspace_bytes"] and header["opt_level"] == 3
    # one timing cache through every graph: empty for the first, then what the previous build left
    caches = [c[1] for c in rec.named("create_timing_cache")]
    assert caches[0] == b"" and [len(json.loads(c.split(b"\n", 1)[1])) for c in caches[1:]] == list(
        range(1, len(names)))
    assert rec.errors == []


def test_rebuild_reuses_timing_cache(goldens_export, tmp_path, fake_trt):
    build(goldens_export, tmp_path / "eng", "--graphs", "forward_0,deep_step")
    first = (tmp_path / "eng" / "timing.cache").read_bytes()
    build(goldens_export, tmp_path / "eng", "--graphs", "forward_0", "--force")
    assert fake_trt.named("create_timing_cache")[2][1] == first          # the engine directory's cache, reused
    own = tmp_path / "my.cache"
    build(goldens_export, tmp_path / "eng2", "--graphs", "forward_0", "--timing-cache", str(own))
    written = own.read_bytes()
    build(goldens_export, tmp_path / "eng3", "--graphs", "deep_step", "--timing-cache", str(own))
    assert fake_trt.named("create_timing_cache")[-1][1] == written     # --timing-cache FILE: read ...
    assert len(json.loads(own.read_bytes().split(b"\n", 1)[1])) == 2    # ... and replaced with the update
    assert not (tmp_path / "eng3" / "timing.cache").exists()


@pytest.fixture
def engines(goldens_export, tmp_path, fake_trt):
    build(goldens_export, tmp_path / "eng")
    return tmp_path / "eng"


def _generate(directory, cases, **kwargs):
    pipe = Pipeline.from_dir(directory, **kwargs)
    try:
        y, yu, noise = cases["y"], cases["y_uncond"], cases["noise"]
        ar = pipe.generate(y, noise=noise, y_uncond=yu, guidance=2.0, denoise=False).latents
        jacobi = pipe.generate(y, noise=noise, y_uncond=yu, guidance=2.0, jacobi=EXACT).latents
        return pipe, ar, jacobi
    finally:
        pipe.close()


def test_trt_backend_matches_ort(goldens_export, engines, cases, fake_trt):
    _, ar_ort, jac_ort = _generate(goldens_export, cases, backend="ort")
    pipe, ar, jac = _generate(engines, cases, backend="trt")
    # same graphs on the same ORT kernels: any difference is the trt backend's binding (names, shapes, addresses)
    assert torch.equal(ar, ar_ort) and torch.equal(jac, jac_ort)
    assert fake_trt.executions > 0 and fake_trt.captures == 0 and fake_trt.errors == []
    assert pipe.backend.describe()["cuda_graphs"] is False


def test_cuda_graphs_replay_matches(goldens_export, engines, cases, fake_trt):
    _, ar_ort, jac_ort = _generate(goldens_export, cases, backend="ort")
    pipe, ar, jac = _generate(engines, cases, backend="trt", cuda_graphs=True)
    assert pipe.backend.describe()["cuda_graphs"] is True
    # replays read the captured addresses' current contents: Jacobi iterations repeat shapes and buffers
    assert fake_trt.captures > 0 and fake_trt.replays > 0 and fake_trt.errors == []
    assert torch.equal(ar, ar_ort) and torch.equal(jac, jac_ort)
    assert fake_trt.named("synchronize")   # close() waits, then frees the captured graphs


def test_cuda_graphs_flag_reaches_the_backend(engines, goldens_export, cases, tmp_path, fake_trt):
    y = tmp_path / "y.npy"
    np.save(y, cases["y"][:1].numpy())
    common = ["--text-embeddings", str(y), "--jacobi-block", "8", "--jacobi-iters", "4", "--no-denoise"]
    out = CliRunner().invoke(main, ["generate", str(engines), "--backend", "trt", "--cuda-graphs", *common,
                                    "-o", str(tmp_path / "run")])
    assert out.exit_code == 0, (out.output, out.exception)
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["backend"]["cuda_graphs"] is True and fake_trt.captures > 0   # captured only with cuda_graphs
    out = CliRunner().invoke(main, ["generate", str(goldens_export), "--backend", "ort", "--cuda-graphs", *common,
                                    "-o", str(tmp_path / "run2")])
    assert out.exit_code == 2 and out.output.startswith("error:") and "--backend trt" in out.output
    assert len(out.output.strip().splitlines()) == 1 and not (tmp_path / "run2").exists()


@pytest.mark.parametrize("path,cuda_graphs,fail", [
    ("plain", False, lambda ctx, stream, capturing: True),
    ("before-capture", True, lambda ctx, stream, capturing: not capturing),
    ("capture", True, lambda ctx, stream, capturing: capturing),
])
def test_execute_false_is_an_error_on_every_path(engines, cases, fake_trt, path, cuda_graphs, fail):
    fake_trt.fail_execute = fail
    pipe = Pipeline.from_dir(engines, backend="trt", cuda_graphs=cuda_graphs)
    match = "capturing a CUDA graph" if path == "capture" else r"TensorRT execution of \w+ failed"
    with pytest.raises(StarflowError, match=match):
        pipe.generate(cases["y"], noise=cases["noise"], denoise=False)
    pipe.close()


def test_shape_outside_the_engine_profile_is_refused(goldens_export, cases, tmp_path, fake_trt):
    build(goldens_export, tmp_path / "eng", "--shape", "P=0:4:8")   # narrower than the manifest's dims
    pipe = Pipeline.from_dir(tmp_path / "eng", backend="trt")
    with pytest.raises(StarflowError, match="outside the engine's optimisation profile"):
        pipe.generate(cases["y"], noise=cases["noise"], denoise=False)
    assert any("outside profile 0" in e for e in fake_trt.errors)
    pipe.close()


def test_engine_with_other_io_names_is_refused(engines, cases, fake_trt, monkeypatch):
    real = fake_tensorrt.ICudaEngine.get_tensor_name
    monkeypatch.setattr(fake_tensorrt.ICudaEngine, "get_tensor_name",
                        lambda self, i: "renamed" if i == 0 else real(self, i))
    pipe = Pipeline.from_dir(engines, backend="trt")
    with pytest.raises(StarflowError, match="does not have the IO tensors the manifest names"):
        pipe.generate(cases["y"], noise=cases["noise"], denoise=False)
    pipe.close()


def test_fake_enforces_the_documented_contracts(engines, fake_trt):
    """The checks above are only as good as the fake's: it refuses what TensorRT documents as errors."""
    trt = fake_tensorrt.sys.modules["tensorrt"]
    runtime = trt.Runtime(trt.Logger())
    engine = runtime.deserialize_cuda_engine((engines / "deep_step.engine").read_bytes())
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    assert engine.get_tensor_mode("tokens") == trt.TensorIOMode.INPUT and "new_k_0" in names
    lo, _, hi = engine.get_tensor_profile_shape("tokens", 0)
    ctx = engine.create_execution_context()
    assert not ctx.set_input_shape("scale", lo)                     # an output
    assert not ctx.set_input_shape("tokens", tuple(h + 1 for h in hi))   # outside the profile
    assert not ctx.set_tensor_address("nope", 256)                  # not an IO tensor
    assert ctx.set_input_shape("tokens", lo) and ctx.infer_shapes()  # the other inputs' shapes are still unset
    assert not ctx.execute_async_v3(0)
    assert runtime.deserialize_cuda_engine(b"not a plan") is None
    with pytest.raises(ValueError):
        trt.Builder(trt.Logger()).create_optimization_profile().set_shape("x", (2,), (1,), (3,))
    with pytest.raises(TypeError):
        trt.Builder(trt.Logger()).create_network(())                 # flags: an int bit mask
    with pytest.raises(AttributeError):
        fake_tensorrt.make_module(fake_tensorrt.Recorder(version="11.0.0")).BuilderFlag.FP16


def test_bound_addresses_are_256_byte_aligned(engines, cases, fake_trt):
    # was: KV-cache slot views and token slices were bound at any offset (setTensorAddress wants 256 bytes);
    # a misaligned tensor now goes through an aligned scratch buffer, and the goldens still hold
    _, ar, _ = _generate(engines, cases, backend="trt")
    assert fake_trt.misaligned == set() and fake_trt.executions > 0
    assert_golden(ar, cases["reverse.g2"], "reverse.g2 (trt, aligned bindings)")


def test_cuda_graphs_option_is_refused_on_ort():
    from starflow_trt.errors import InputError
    from starflow_trt.runtime.backends import BackendOptions, make_backend
    from starflow_trt.serving.app import ServeConfig

    with pytest.raises(InputError, match="--backend trt"):
        make_backend("ort", None, cuda_graphs=True)
    with pytest.raises(InputError, match="--backend trt"):
        ServeConfig(backend="ort", cuda_graphs=True)
    cfg = ServeConfig(backend="trt", cuda_graphs=True)   # what each serving replica gets
    assert ServeConfig.from_dict(cfg.to_dict()).cuda_graphs is True and BackendOptions().cuda_graphs is False
