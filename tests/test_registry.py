"""Graph registry (a new kind end to end), backend registry and lifecycle, the runtime's shape check,
Manifest.derive and the manifest's content hash."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from starflow_trt.bench.kinds import KindBench, find_kind_bench, kind_bench, register_bench, unregister_bench
from starflow_trt.cli import main
from starflow_trt.costs import Cost
from starflow_trt.errors import InputError, ManifestError, StarflowError
from starflow_trt.export.manifest import DimRange, GraphSpec, load_manifest
from starflow_trt.export.registry import (GraphKind, graph_kind, graph_kinds, register_graph, tensor,
                                          unregister_graph)
from starflow_trt.runtime.backends import Backend, GraphRunner, backend_names, make_backend, register_backend
from starflow_trt.runtime.backends.registry import BACKENDS

LIMITS = dict(height=6, width=4, max_frames=3, max_batch=4)


# ---------------------------------------------------------------- a new graph kind, from this file alone
class AffineGraph(nn.Module):
    """y = 2·x + sos: x [batch, n, c] → y [batch, n, c] (sos: a block's SOS vector [c] from the checkpoint)."""

    def __init__(self, sos: torch.Tensor):
        super().__init__()
        self.register_buffer("sos", sos.reshape(-1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x + self.sos


class AffineKind(GraphKind):
    kind = "test_affine"
    wrapper = AffineGraph

    def instances(self, ctx):
        return [("affine_top", ctx.geo.top_index)]

    def inputs(self, ctx, block):
        return [tensor("x", "batch", "n", ctx.geo.token_channels)]

    def outputs(self, ctx, block):
        return [tensor("y", "batch", "n", ctx.geo.token_channels)]

    def dims(self, ctx, block):
        return {"batch": DimRange(1, 2, ctx.limits.max_batch), "n": DimRange(1, 8, ctx.geo.tokens_per_frame)}

    def example_sizes(self, ctx, block):
        return {"batch": 3, "n": 5}

    def build(self, geo, block, weights):
        return AffineGraph(weights.tensor(f"blocks.{block}.sos_embed"))


class AffineBench(KindBench):
    """What the benchmarks time of it: the opt sizes (the default), at this cost."""

    def cost(self, cfg, block, sizes):
        n = sizes["batch"] * sizes["n"] * cfg.token_channels
        return Cost(flops=2.0 * n, weight_bytes=4.0 * cfg.token_channels, kv_bytes=0.0, act_bytes=8.0 * n)


@pytest.fixture
def affine_kind():
    register_graph(AffineKind)
    register_bench(AffineKind.kind)(AffineBench)
    try:
        yield graph_kind(AffineKind.kind)
    finally:
        unregister_graph(AffineKind.kind)
        unregister_bench(AffineKind.kind)


def test_new_graph_kind_exports_loads_profiles_and_runs(affine_kind, goldens_dir, tmp_path):
    from starflow_trt.bench.workloads import per_graph
    from starflow_trt.checkpoint import load_state_dict
    from starflow_trt.engine.build import BuildOptions, build_plan
    from starflow_trt.engine.profiles import graph_profile
    from starflow_trt.export.onnx_export import ExportLimits, export_graphs
    from starflow_trt.runtime import Pipeline

    pytest.importorskip("onnxruntime")
    assert [k.kind for k in graph_kinds()][-1] == "test_affine"   # after the built-ins
    out = tmp_path / "affine"
    manifest, rows = export_graphs(goldens_dir / "config.yaml", goldens_dir / "model.pth", out,
                                   graphs=["affine_top"], limits=ExportLimits(**LIMITS))
    assert [r["graph"] for r in rows] == ["affine_top"]

    # loads: the manifest records the kind's contract
    spec = load_manifest(out, verify=True).graph("affine_top")
    assert (spec.kind, spec.block) == ("test_affine", 5)
    assert [t.to_dict() for t in spec.inputs] == [{"name": "x", "dtype": "float32", "shape": ["batch", "n", 4]}]
    assert spec.dims == {"batch": DimRange(1, 2, 4), "n": DimRange(1, 8, 24)}

    # profiles: TensorRT profile and build plan (op check included) from the manifest alone
    assert graph_profile(spec) == {"x": ((1, 1, 4), (2, 8, 4), (4, 24, 4))}
    plan = build_plan(out, BuildOptions())
    assert plan["graphs"]["affine_top"]["profile"] == {"x": [[1, 1, 4], [2, 8, 4], [4, 24, 4]]}

    # runs on ORT and on the torch backend, against an independent computation from the checkpoint
    sos = load_state_dict(goldens_dir / "model.pth")["blocks.5.sos_embed"].float().reshape(-1)
    x = torch.randn(3, 7, 4, generator=torch.Generator().manual_seed(0))
    loaded = load_manifest(out)
    for name in ("ort", "torch"):
        with make_backend(name, loaded) as backend:
            runner = backend.load(loaded.graph("affine_top"))
            y = torch.empty(3, 7, 4)
            runner.run({"x": x}, {"y": y})
            torch.testing.assert_close(y, 2 * x + sos, rtol=1e-6, atol=1e-6)
            with pytest.raises(ManifestError, match=r"dim n=25 outside the exported range \[1, 24\]"):
                runner.run({"x": torch.zeros(1, 25, 4)}, {"y": torch.zeros(1, 25, 4)})

    # benchmarks iterate the registry: the kind's opt sizes, its own cost
    pipe = Pipeline.from_dir(out)
    (row,) = per_graph(pipe, runs=1, peak_flops=1e12, bandwidth=1e11, label="t")
    assert row["graph"] == "affine_top" and row["shape"] == "B=2 n=8"
    assert row["gflops"] == pytest.approx(2.0 * 2 * 8 * 4 / 1e9)


def test_registry_refuses_duplicates_and_unknown_kinds():
    with pytest.raises(ValueError, match="already registered"):
        register_graph(type("Again", (AffineKind,), {"kind": "step"}))
    with pytest.raises(ManifestError, match="graph kind 'nope' is not registered"):
        graph_kind("nope")
    assert [k.kind for k in graph_kinds()][:4] == ["prefill", "step", "forward", "denoiser"]


def test_builtin_order_does_not_depend_on_the_module_imported_first():
    from starflow_trt.export.registry import BUILTIN_MODULES

    for first in BUILTIN_MODULES:   # each built-in module, imported first, loads the others mid-way
        code = (f"import {first}; from starflow_trt.export.registry import graph_kinds; "
                "print(*(k.kind for k in graph_kinds()))")
        order = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
        assert order[:5] == ["prefill", "step", "forward", "denoiser", "text_encoder"], first


def test_builtin_kinds_have_costs_and_bench_cases(goldens_export):
    from starflow_trt.costs import denoiser_cost, step_cost

    m = load_manifest(goldens_export)
    cfg, geo = m.config, m.geometry
    assert all(find_kind_bench(k.kind) for k in graph_kinds())   # every built-in kind is benchmarked
    step = kind_bench("step")
    assert step.cost(cfg, 5, {"batch": 2, "S": 16, "P": 40}) == step_cost(cfg, 5, 2, 16, 40)
    fwd = kind_bench("forward")
    # frame-local shallow block: frames folded into the batch, one frame per sequence
    assert fwd.cost(cfg, 0, {"batch": 1, "T": 3, "h": 6, "w": 4}) == step_cost(cfg, 0, 3, 24, 0)
    assert fwd.cost(cfg, 5, {"batch": 1, "T": 3, "h": 6, "w": 4}) == step_cost(cfg, 5, 1, 4 + 72, 0)
    assert kind_bench("denoiser").cost(cfg, None, {"batch": 1, "T": 3, "h": 6, "w": 4}) == denoiser_cost(cfg, 1, 3, 24)
    cases = step.cases(m.graph("deep_step"), geo)
    assert {(c["S"], c["P"]) for c in cases} == {(s, p) for s in (1, 16, 64) for p in (4, 4 + 36, 4 + 72 - s)}
    # every benchmarked case lies inside the graph's exported dims
    for spec in m.graphs.values():
        for sizes in kind_bench(spec.kind).cases(spec, geo):
            spec.check_shapes({t.name: t.concrete(sizes) for t in spec.inputs},
                              {t.name: t.concrete(sizes) for t in spec.outputs})


# ---------------------------------------------------------------- the runtime's shape check
class _CountingRunner(GraphRunner):
    def __init__(self, spec):
        super().__init__(spec)
        self.ran = 0

    def infer_impl(self, inputs, outputs):
        self.ran += 1


def _spec() -> GraphSpec:
    return GraphSpec(name="g", file="g.onnx", sha256="0" * 64, kind="step", block=0, precision="fp32",
                     inputs=[tensor("tokens", "batch", "S", 4), tensor("rope_cos", "S", 8)],
                     outputs=[tensor("scale", "batch", "S", 4)],
                     dims={"batch": DimRange(1, 2, 4), "S": DimRange(1, 4, 16)})


def _io(batch=2, s=3, rows=None, out_s=None):
    return ({"tokens": torch.zeros(batch, s, 4), "rope_cos": torch.zeros(rows or s, 8)},
            {"scale": torch.zeros(batch, out_s or s, 4)})


def test_runner_checks_each_shape_once(monkeypatch):
    runner = _CountingRunner(_spec())
    checks = []
    real = GraphSpec.check_shapes
    monkeypatch.setattr(GraphSpec, "check_shapes", lambda self, *a: (checks.append(a), real(self, *a))[1])
    for _ in range(3):
        runner.run(*_io())
    assert runner.ran == 3 and len(checks) == 1   # cached per shape signature
    runner.infer(*_io(s=5))
    assert len(checks) == 2


@pytest.mark.parametrize("io,message", [
    (_io(batch=5), r"dim batch=5 outside the exported range \[1, 4\]"),
    (_io(s=17), r"dim S=17 outside the exported range \[1, 16\]"),
    (_io(rows=4), "dim 'S' is 3 and 4 in one call"),
    (_io(out_s=2), "dim 'S' is 3 and 2 in one call"),
    (({"tokens": torch.zeros(2, 3, 4)}, {"scale": torch.zeros(2, 3, 4)}), "input 'rope_cos' not given"),
    (({**_io()[0], "text": torch.zeros(1)}, _io()[1]), "has no input 'text'"),
    ((_io()[0], {"scale": torch.zeros(2, 3, 4, dtype=torch.float16)}), "'scale' is torch.float16"),
])
def test_runner_refuses_calls_that_break_the_manifest(io, message):
    runner = _CountingRunner(_spec())
    with pytest.raises(ManifestError, match=message):
        runner.run(*io)
    assert runner.ran == 0


# ---------------------------------------------------------------- backends: registry and lifecycle
def test_backend_registry_and_lifecycle(goldens_export):
    pytest.importorskip("onnxruntime")
    assert backend_names()[:3] == ("ort", "torch", "trt")
    manifest = load_manifest(goldens_export)
    with pytest.raises(InputError, match="unknown backend 'nope': choose ort, torch, trt"):
        make_backend("nope", manifest)
    with pytest.raises(InputError, match="thread pool"):
        make_backend("ort", manifest, thread_pool="global")

    backend = make_backend("ort", manifest)
    with backend:
        runner = backend.load(manifest.graph("deep_prefill"))
        text = torch.randn(1, 4, 16)
        cos, sin = torch.ones(4, 32), torch.zeros(4, 32)
        outs = {t.name: torch.empty(4, 1, 2, 32) for t in runner.spec.outputs}
        runner.run({"text": text, "rope_cos": cos, "rope_sin": sin}, outs)
    assert runner.closed and runner.session is None
    with pytest.raises(StarflowError, match="after its backend was closed"):
        runner.run({"text": text, "rope_cos": cos, "rope_sin": sin}, outs)
    with pytest.raises(StarflowError, match="is closed"):
        backend.load(manifest.graph("deep_prefill"))
    backend.close()   # idempotent


def test_a_registered_backend_is_made_by_name(goldens_export):
    made = []

    class Echo(Backend):
        name = "echo"

        def load_impl(self, spec):
            raise NotImplementedError

    @register_backend("echo", "test backend")
    def _echo(manifest, options):
        made.append(options.threads)
        return Echo()

    try:
        backend = make_backend("echo", load_manifest(goldens_export), threads=3)
        assert isinstance(backend, Echo) and made == [3] and "echo" in backend_names()
    finally:
        BACKENDS.pop("echo")


# ---------------------------------------------------------------- manifest: derive and content hash
def test_derive_copies_without_sharing(goldens_export, tmp_path):
    source = load_manifest(goldens_export)
    spec = source.graph("deep_step")
    new = source.derive(tmp_path, precision="fp16", extra={"note": 1})
    new.graphs["deep_step"] = spec.derive(root=tmp_path, precision="fp16", extra={**spec.extra, "conversion": {}})
    assert new.geometry == source.geometry and new.config is source.config and new.graphs.keys() == {"deep_step"}
    assert new.extra["note"] == 1 and "note" not in source.extra and spec.precision == "fp32"
    assert "conversion" not in spec.extra
    shutil.copy(spec.path, tmp_path / spec.file)
    new.save()
    again = load_manifest(tmp_path, verify=True)
    assert again.precision == "fp16" and again.graph("deep_step").precision == "fp16"
    assert again.geometry == source.geometry and again.extra["note"] == 1


def _edit(directory, change):
    path = directory / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=1))


@pytest.mark.parametrize("change", [
    lambda d: d["geometry"].update(max_batch=64),
    lambda d: d["graphs"]["deep_step"]["dims"]["P"].update(max=4096),
    lambda d: d["graphs"]["forward_0"].update(sha256="0" * 64),
    lambda d: d.pop("content_sha256"),
])
def test_hand_edited_manifest_is_refused(goldens_export, tmp_path, change):
    copy = tmp_path / "copy"
    shutil.copytree(goldens_export, copy)
    load_manifest(copy, verify=True)   # the untouched copy loads
    _edit(copy, change)
    with pytest.raises(ManifestError, match="edited after it was written"):
        load_manifest(copy)
    out = CliRunner().invoke(main, ["build", str(copy), "--dry-run"])
    assert out.exit_code == 2 and len(out.output.strip().splitlines()) == 1
    assert out.output.startswith("error:") and "content hash" in out.output


def test_rewritten_manifest_with_same_content_loads(goldens_export, tmp_path):
    """Only content counts: key order and whitespace may change."""
    copy = tmp_path / "copy"
    shutil.copytree(goldens_export, copy)
    data = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(dict(reversed(list(data.items())))))
    assert load_manifest(copy, verify=True).geometry.max_batch == 4


# ---------------------------------------------------------------- calibration reads each kind's policy
def test_calibration_follows_the_kind_policy(goldens_export, tmp_path, monkeypatch):
    pytest.importorskip("onnxconverter_common")
    from starflow_trt.calibration.calibrate import _convert_graphs
    from starflow_trt.calibration.capture import CaptureSet
    from starflow_trt.calibration.policy import KIND_POLICIES, PRECISIONS, PrecisionPolicy

    source = load_manifest(goldens_export)
    one = source.derive(goldens_export, graphs={"deep_step": source.graph("deep_step")})
    call = {"tokens": torch.zeros(1, 1, 4).numpy()}
    float_only = PrecisionPolicy(targets=dict.fromkeys(PRECISIONS, "fp32"), reason="test: stays in float")
    monkeypatch.setitem(KIND_POLICIES, "step", float_only)   # a kind that must stay in float
    kept = _convert_graphs(one, tmp_path, "int8", "minmax", CaptureSet(calls={"deep_step": [call]}), (), "10.3.0",
                           log=lambda _: None)
    assert kept.graph("deep_step").precision == "fp32"
    assert kept.graph("deep_step").sha256 == source.graph("deep_step").sha256
    monkeypatch.delitem(KIND_POLICIES, "step")

    default = _convert_graphs(one, tmp_path, "fp16", "minmax", CaptureSet(), (), "10.3.0", log=lambda _: None)
    info = default.graph("deep_step").extra["conversion"]
    assert 0 < info["fp32_nodes"] < info["nodes"]
    monkeypatch.setitem(KIND_POLICIES, "step", PrecisionPolicy(fp16_modules=("no_such_module",)))
    none = _convert_graphs(one, tmp_path, "fp16", "minmax", CaptureSet(), (), "10.3.0", log=lambda _: None)
    info = none.graph("deep_step").extra["conversion"]
    assert info["fp32_nodes"] == info["nodes"]   # no module of the kind's list: every node stays fp32
