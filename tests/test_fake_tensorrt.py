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
    # upstream schedule, threshold 0: every block runs its 8 iterations on one window, so calls repeat (a key is
    # captured when it repeats)
    common = ["--text-embeddings", str(y), "--jacobi-block", "8", "--jacobi-iters", "8", "--jacobi-threshold", "0",
              "--schedule", "upstream", "--no-denoise"]
    out = CliRunner().invoke(main, ["generate", str(engines), "--backend", "trt", "--cuda-graphs", *common,
                                    "-o", str(tmp_path / "run")])
    assert out.exit_code == 0, (out.output, out.exception)
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["backend"]["cuda_graphs"] is True and fake_trt.captures > 0   # captured only with cuda_graphs
    assert fake_trt.replays > 0
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
    with pytest.raises(StarflowError, match=match):   # EXACT: Jacobi calls repeat, so a capture happens
        pipe.generate(cases["y"], noise=cases["noise"], denoise=False, jacobi=EXACT)
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
    with pytest.raises(RuntimeError):
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


# ------------------------------------------------------------------ issue 30: the fake as strict as the library
def _tiny_graph(path, op: str, elem: int, opset: int, second_elem=None):
    """``y = op(x, x2)`` (or ``op(x)``) on [2, 3] tensors of ONNX element type ``elem`` (``second_elem``: x2's)."""
    import onnx
    from onnx import helper

    inputs = [helper.make_tensor_value_info("x", elem, [2, 3])]
    names = ["x"]
    if second_elem is not None:
        inputs.append(helper.make_tensor_value_info("x2", second_elem, [2, 3]))
        names.append("x2")
    if op == "Clip":
        inputs.append(helper.make_tensor_value_info("lo", elem, []))
        names.append("lo")
    graph = helper.make_graph([helper.make_node(op, names, ["y"], name="n0")], "g", inputs,
                              [helper.make_tensor_value_info("y", elem, [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def _parse(version: str, path: str, strongly_typed: bool = True):
    rec = fake_tensorrt.Recorder(version=version)
    module = fake_tensorrt.make_module(rec)
    fake_tensorrt._STATE.update(rec=rec, module=module)
    builder = module.Builder(module.Logger())
    bit = 1 << int(module.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    parser = module.OnnxParser(builder.create_network(bit if strongly_typed else 0), module.Logger())
    ok = parser.parse_from_file(path)
    return ok, [parser.get_error(i) for i in range(parser.num_errors)]


@pytest.mark.parametrize("version,op,elem,opset,second,strong,refused", [
    ("10.3.0", "Relu", 1, 18, None, True, None),                      # listed op, type and opset
    ("10.3.0", "Det", 1, 18, None, True, "Det"),                      # 'N' in every table
    ("10.3.0", "Relu", 1, 21, None, True, "opset 21"),                # 10.0 reads opset 9-20 ...
    ("10.15.1", "Relu", 1, 21, None, True, None),                     # ... 10.15 reads 9-24
    ("11.0.0", "Relu", 1, 25, None, True, "opset 25"),
    ("10.3.0", "Clip", 7, 18, None, True, "Clip on INT64"),           # Clip: FP32, FP16, BF16 only
    ("10.3.0", "Add", 3, 18, 3, True, "Add on INT8"),                 # INT8: a quantized type, Q/DQ only
    ("10.3.0", "Pow", 10, 18, 1, True, "mixed float types"),          # FP16 ** FP32, strongly typed
    ("10.3.0", "Pow", 10, 18, 1, False, None),                        # weakly typed: TensorRT converts
], ids=["ok", "op", "opset-10.0", "opset-10.15", "opset-11", "dtype", "quantized", "mixed", "mixed-weak"])
def test_parser_refuses_what_its_table_lacks(tmp_path, monkeypatch, version, op, elem, opset, second, strong,
                                             refused):
    monkeypatch.setattr(fake_tensorrt, "_STATE", {})
    ok, errors = _parse(version, _tiny_graph(tmp_path / "g.onnx", op, elem, opset, second), strong)
    assert ok == (refused is None), errors
    assert refused is None or any(refused in e for e in errors), errors


@pytest.mark.parametrize("version,value,refused", [("10.3.0", 1, None), ("10.3.0", 7, "ConstantOfShape on INT64"),
                                                   ("10.15.1", 7, None)])
def test_constant_of_shape_is_typed_by_its_value_not_its_int64_shape(version, value, refused):
    """The journey's VAE graphs build zeros from a runtime shape: ConstantOfShape(INT64 shape) -> FP32, which 10.0's
    table lists (FP32 only there; 10.15 adds INT64 values)."""
    from onnx import TensorProto, helper

    from starflow_trt.engine.ops import support_table, unsupported

    node = helper.make_node("ConstantOfShape", ["shape"], ["y"],
                            value=helper.make_tensor("v", value, [1], [0]))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
                              [helper.make_tensor_value_info("y", value, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    assert unsupported(model, support_table(version)) == ([] if refused is None else [(refused, 1)])


def test_old_set_shape_catch_fails(goldens_export, tmp_path, fake_trt, monkeypatch):
    """TensorRT's bindings raise RuntimeError from set_shape; the old ``except ValueError`` let it through as a
    traceback. ``build`` now turns it into the one-line profile error."""
    trt = fake_tensorrt.sys.modules["tensorrt"]
    with pytest.raises(RuntimeError) as raised:
        trt.Builder(trt.Logger()).create_optimization_profile().set_shape("P", (4,), (2,), (8,))
    assert not isinstance(raised.value, ValueError)   # what the old catch named
    from starflow_trt.engine import build as build_mod

    inverted = lambda spec, overrides=None: {k: (hi, opt, lo) for k, (lo, opt, hi) in spec.profile().items()}  # noqa: E731
    monkeypatch.setattr(build_mod, "graph_profile", inverted)
    out = build(goldens_export, tmp_path / "eng", "--graphs", "deep_step", expect=2)
    *progress, error = out.output.strip().splitlines()
    assert error.startswith("error: profile of") and "fix the --shape overrides" in error
    assert progress == ["building deep_step (strongly typed, precision fp32)"] and not (tmp_path / "eng").exists()


def test_old_multi_shape_replay_is_refused(engines, fake_trt):
    """The old runner captured graphs for two shapes on one context and replayed the first after re-shaping it
    for the second: the fake refuses that replay (nothing TensorRT documents)."""
    trt = fake_tensorrt.sys.modules["tensorrt"]
    engine = trt.Runtime(trt.Logger()).deserialize_cuda_engine((engines / "forward_0.engine").read_bytes())
    ctx = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    keep = []

    def bind(batch: int) -> None:
        for name in names:
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                lo, _, hi = engine.get_tensor_profile_shape(name, 0)
                shape = (batch if lo[0] < hi[0] else hi[0], *hi[1:])   # the batch axis where it is dynamic
                assert ctx.set_input_shape(name, shape)
        for name in names:
            shape = ctx.get_tensor_shape(name)
            buf = torch.zeros(int(np.prod(shape)) * 4 + 256, dtype=torch.uint8)
            keep.append(buf)
            assert ctx.set_tensor_address(name, buf.data_ptr() + (-buf.data_ptr() % 256))

    cuda = fake_tensorrt._STATE["cuda"]
    stream = cuda.Stream()
    graphs = []
    for batch in (1, 2):
        bind(batch)
        graph = fake_tensorrt.FakeCUDAGraph()
        with cuda.graph(graph, stream=stream):
            assert ctx.execute_async_v3(stream.cuda_stream)
        graphs.append(graph)
    graphs[1].replay()                                    # the context still has the shapes it was captured at
    with pytest.raises(fake_tensorrt.FakeError, match="re-shaped"):
        graphs[0].replay()


def test_cuda_graphs_one_context_per_captured_key(engines, cases, fake_trt, monkeypatch):
    """Every captured graph has a context of its own, bound once: no replay ever meets a re-shaped context, the
    work runs on the backend's own stream (never the default one), and the goldens still hold."""
    contexts = []
    real = fake_tensorrt.ICudaEngine.create_execution_context
    monkeypatch.setattr(fake_tensorrt.ICudaEngine, "create_execution_context",
                        lambda self: contexts.append(real(self)) or contexts[-1])
    _, ar, jac = _generate(engines, cases, backend="trt", cuda_graphs=True)
    assert_golden(ar, cases["reverse.g2"], "reverse.g2 (trt, CUDA graphs)")
    assert fake_trt.captures > 0 and fake_trt.replays > 0 and fake_trt.errors == []
    captured = [c for c in contexts if c.captures]
    assert captured and all(c.captures == 1 and c.shape_sets == 1 for c in captured)   # bound once, one graph
    streams = {c[1] for c in fake_trt.named("execute_async_v3")} | {c[1] for c in fake_trt.named("replay")}
    assert 0 not in streams and len(streams) == 1   # one backend stream for every engine and replay
    assert len(contexts) == len({c.engine for c in contexts}) + len(captured)   # one plain context an engine


def test_non_contiguous_inputs_go_through_scratch(engines, goldens_export, fake_trt):
    """A strided view has no dense address: the runner copies it into aligned scratch (the fake reads addresses
    densely, so binding the view as is would feed it other numbers)."""
    import onnxruntime as ort

    trt_pipe = Pipeline.from_dir(engines, backend="trt")
    try:
        spec = load_manifest(goldens_export).graph("forward_0")
        shapes = {k: v[2] for k, v in spec.profile().items()}   # the profile's max: every dim above 1
        gen = torch.Generator().manual_seed(0)
        inputs = {k: torch.randn(*s, generator=gen) for k, s in shapes.items()}
        strided = {k: v.transpose(0, -1).contiguous().transpose(0, -1) for k, v in inputs.items()}
        assert not any(v.is_contiguous() for v in strided.values())
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1   # as the fake's engines run: the same reduction order
        sess = ort.InferenceSession(str(spec.path), options, providers=["CPUExecutionProvider"])
        want = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {k: v.numpy() for k, v in inputs.items()})))
        got = {k: torch.empty(v.shape) for k, v in want.items()}
        trt_pipe.runner("forward_0").infer_impl(strided, got)
        for name, value in want.items():
            assert torch.equal(got[name], torch.from_numpy(value)), name
    finally:
        trt_pipe.close()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp16"])   # bf16 flow graphs: refused by the precision policy before parsing
def test_16bit_exports_build_under_the_fake(exports, tmp_path, monkeypatch, dtype):
    """An fp16 export (16-bit body, FP32 islands behind Casts) passes the strict parser: every op and its type
    is in the table, and no op of the strongly typed network mixes float types."""
    # the bundled toy's fp16 export (shared with test_export_dtype): every flow graph kind, exported before the
    # fake patches torch.cuda
    source = exports(model="toy", max_batch=8, dtype=dtype)
    rec = fake_tensorrt.install(monkeypatch)
    build(source, tmp_path / "eng")
    assert rec.errors == [] and len(rec.named("parse_from_file")) == len(load_manifest(source).graphs)
