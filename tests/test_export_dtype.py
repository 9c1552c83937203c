"""``export --dtype fp16|bf16``: half-precision graphs with FP32 islands and half K/V caches."""

from __future__ import annotations

import pytest
import torch

from starflow_trt.export.limits import ExportLimits
from starflow_trt.export.manifest import load_manifest

from .exports import GOLDENS_FLOW

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def toy_fp16(exports):
    """The bundled toy exported in FP16 with the limits of the ``toy_export`` fixture."""
    return exports(model="toy", max_batch=8, dtype="fp16")


@pytest.fixture(scope="module")
def goldens_bf16(exports):
    return exports(**GOLDENS_FLOW, graphs=("deep_step", "forward_5"), dtype="bf16", trt_variants=True)


def _initializer_bytes(path) -> dict[int, int]:
    """ONNX element type → bytes of the graph's initializers (external data included)."""
    import onnx

    model = onnx.load(str(path))
    out: dict[int, int] = {}
    for init in model.graph.initializer:
        arr = onnx.numpy_helper.to_array(init)
        out[init.data_type] = out.get(init.data_type, 0) + arr.nbytes
    return out


@pytest.mark.slow   # the toy's fp16 export, shared with the fake TensorRT's build
def test_fp16_toy_within_the_calibration_gate(toy_export, toy_fp16):
    from starflow_trt.calibration.calibrate import _check_gate, _compare, default_gate
    from starflow_trt.reference import JacobiConfig
    from starflow_trt.runtime.pipeline import Pipeline
    from starflow_trt.toy.calibration import toy_calibration_set

    m32, m16 = load_manifest(toy_export), load_manifest(toy_fp16)
    assert m16.precision == "fp16" and m16.graph("deep_step").precision == "fp16"
    text, uncond, clips = toy_calibration_set(m32, samples=4)
    with Pipeline.from_dir(toy_export) as p32, Pipeline.from_dir(toy_fp16) as p16:
        quality = _compare(p32, p16, text, uncond, 2.0, JacobiConfig(block_size=16, max_iter=32, threshold=1e-3),
                           clips)
        # the K/V cache follows the graphs: FP16 buffers, bound straight to the graphs' FP16 K/V
        assert p16.workspace._flat["deep_kv"].dtype == torch.float16
        assert p32.workspace._flat["deep_kv"].dtype == torch.float32
        if "shallow_kv" in p16.workspace._flat:
            assert p16.workspace._flat["shallow_kv"].dtype == torch.float16
    gate = default_gate("fp16")
    assert _check_gate({"graphs": {}, **quality}, gate) == [], quality
    assert quality["latent_psnr_db"] >= gate.min_psnr_db and abs(quality["bpd_increase"]) <= gate.max_bpd_increase


@pytest.mark.slow   # the toy's fp16 export, shared with the fake TensorRT's build
def test_fp16_graph_contract_and_half_size_weights(toy_export, toy_fp16):
    import onnx

    m32, m16 = load_manifest(toy_export), load_manifest(toy_fp16)
    for name, spec in m16.graphs.items():
        kv = [t for t in (*spec.inputs, *spec.outputs) if t.name.startswith(("past_", "new_"))]
        assert all(t.dtype == "float16" for t in kv), name
        other = [t for t in (*spec.inputs, *spec.outputs) if t not in kv]
        assert all(t.dtype == "float32" for t in other), name   # tokens, rope, text, scale/shift, z, logdet
        b32, b16 = _initializer_bytes(m32.graph(name).path), _initializer_bytes(spec.path)
        total32, total16 = sum(b32.values()), sum(b16.values())
        half = b16.get(onnx.TensorProto.FLOAT16, 0)
        assert half > 0.8 * total16, name                  # the Linear weights are FP16 ...
        assert total16 < 0.6 * total32, (name, total16, total32)   # ... so the weights take about half


@pytest.mark.slow   # the toy's fp16 export, shared with the fake TensorRT's build
def test_fp16_islands_are_float32(toy_fp16):
    import onnx

    path = load_manifest(toy_fp16).graph("deep_step").path
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.value_info, *model.graph.input)}
    f32 = onnx.TensorProto.FLOAT
    ops = {}
    for node in model.graph.node:
        ops.setdefault(node.op_type, []).append(types.get(node.input[0]))
    for op in ("Softmax", "Softplus", "LayerNormalization", "Tanh"):
        assert ops.get(op) and all(t == f32 for t in ops[op]), (op, ops.get(op))
    assert onnx.TensorProto.FLOAT16 in ops["MatMul"]           # the transformer matmuls are FP16


def test_bf16_graph_structure(goldens_bf16):
    """ONNX Runtime's CPU EP has no BF16 MatMul (NOT_IMPLEMENTED): BF16 is checked for its contract here
    and numerically in torch (next test); it targets TensorRT / CUDA."""
    import onnx

    m = load_manifest(goldens_bf16)
    assert m.precision == "bf16"
    step = m.graph("deep_step")
    assert {t.dtype for t in step.inputs if t.name.startswith("past_")} == {"bfloat16"}
    assert {t.dtype for t in step.outputs if t.name.startswith("new_")} == {"bfloat16"}
    assert {t.dtype for t in step.outputs if t.name in ("scale", "shift")} == {"float32"}
    onnx.checker.check_model(str(step.path), full_check=True)
    b = _initializer_bytes(step.path)
    assert b.get(onnx.TensorProto.BFLOAT16, 0) > 0.8 * sum(b.values())
    model = onnx.shape_inference.infer_shapes(onnx.load(str(step.path)))
    types = {v.name: v.type.tensor_type.elem_type for v in model.graph.value_info}
    softmax = [types.get(n.input[0]) for n in model.graph.node if n.op_type == "Softmax"]
    assert softmax and set(softmax) == {onnx.TensorProto.FLOAT}


def test_bf16_directory_builds_its_twin_under_the_fake(goldens_bf16, tmp_path, monkeypatch):
    """A bf16 export is a directory ``build`` takes (the flow policy allows bf16; it refused it before): the
    step graph's fused-attention twin keeps the form in bf16 and is what the strongly typed build parses."""
    import json

    import onnx
    from click.testing import CliRunner

    from starflow_trt.cli import main
    from starflow_trt.export.trt_variant import form_problems

    from . import fake_tensorrt

    m = load_manifest(goldens_bf16)
    step = m.graph("deep_step")
    layers = m.geometry.blocks[step.block].layers
    assert form_problems(onnx.load(str(step.trt_path)), layers, m.geometry.head_dim, past=True) == []
    plan = CliRunner().invoke(main, ["build", str(goldens_bf16), "--dry-run"])
    assert plan.exit_code == 0, plan.output
    graphs = json.loads(plan.output)["graphs"]
    assert graphs["deep_step"]["onnx"] == str(step.trt_path)
    assert {g["precision"] for g in graphs.values()} == {"bf16"} and all(g["flags"] == [] for g in graphs.values())
    rec = fake_tensorrt.install(monkeypatch)
    out = CliRunner().invoke(main, ["build", str(goldens_bf16), "-o", str(tmp_path / "engines")])
    assert out.exit_code == 0, out.output
    assert str(step.trt_path) in {c[1] for c in rec.named("parse_from_file")} and rec.errors == []


def test_bf16_on_ort_is_one_line_naming_the_fix(goldens_bf16, tmp_path):
    """ORT cannot run BF16 graphs: refused before any session (was: NOT_IMPLEMENTED / KeyError internal errors)."""
    import numpy as np
    from click.testing import CliRunner

    from starflow_trt.cli import main
    from starflow_trt.errors import BackendUnavailable
    from starflow_trt.runtime.backends import make_backend
    from starflow_trt.runtime.backends.ort_backend import OrtBackend

    m = load_manifest(goldens_bf16)
    with pytest.raises(BackendUnavailable, match="bf16 .*--backend torch .*--dtype fp16 or fp32"):
        make_backend("ort", m)
    with pytest.raises(BackendUnavailable, match="deep_step"):   # a backend made without the manifest
        OrtBackend().load(m.graph("deep_step"))
    y = tmp_path / "y.npy"
    np.save(y, np.zeros((1, m.geometry.text_length, m.geometry.text_width), np.float32))
    res = CliRunner().invoke(main, ["generate", str(goldens_bf16), "--text-embeddings", str(y), "-o",
                                    str(tmp_path / "out")])
    assert res.exit_code == 2 and res.output.startswith("error: ") and res.output.count("\n") == 1, res.output
    assert "--backend torch" in res.output and "Traceback" not in res.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_step_graph_modules_match_fp32(goldens_dir, dtype):
    """The torch graph wrappers in FP16/BF16 (weights as the export converts them) vs FP32: scale/shift and K/V."""
    from starflow_trt.checkpoint import load_state_dict
    from starflow_trt.config import load_config
    from starflow_trt.export.graphs import StepGraph
    from starflow_trt.export.weights import BlockLoader
    from starflow_trt.reference.rope import rope_table

    cfg = load_config(goldens_dir / "config.yaml")
    state = load_state_dict(goldens_dir / "model.pth")
    full, half = BlockLoader(cfg, state), BlockLoader(cfg, {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                                                            for k, v in state.items()}, dtype)
    k = cfg.num_blocks - 1
    m32, m16 = StepGraph(full.block(k)), StepGraph(half.block(k))
    assert m16.block.attn_blocks[0].attention.qkv.weight.dtype == dtype
    assert m16.block.proj_out.weight.dtype == torch.float32 and m16.block.final_norm.weight.dtype == torch.float32
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(2, 6, cfg.token_channels, generator=g)
    cos, sin = rope_table(cfg.head_dim, 1, 1, 16, 0, cfg.rope_seq_len)
    heads = m32.block.heads
    past = [torch.randn(10, 2, heads, cfg.head_dim, generator=g) for _ in range(2 * m32.block.num_layers)]
    with torch.no_grad():
        a32, b32, *kv32 = m32(tokens, cos[10:], sin[10:], *past)
        a16, b16, *kv16 = m16(tokens, cos[10:], sin[10:], *[p.to(dtype) for p in past])
    assert a16.dtype == torch.float32 and kv16[0].dtype == dtype
    bound = 0.01 if dtype == torch.float16 else 0.05   # bf16 weights are rounded from the fp32 checkpoint here
    for x, y in ((a16, a32), (b16, b32), (kv16[0].float(), kv32[0])):
        assert ((x - y).norm() / y.norm()).item() < bound


def test_export_refuses_unknown_dtype(goldens_dir, tmp_path):
    from starflow_trt.errors import StarflowError
    from starflow_trt.export.onnx_export import export_graphs

    with pytest.raises(StarflowError, match="fp32, fp16, bf16"):
        export_graphs(goldens_dir / "config.yaml", goldens_dir / "model.pth", tmp_path / "o",
                      limits=ExportLimits(dtype="int4"))
    assert not (tmp_path / "o").exists()


@pytest.mark.slow   # the toy's fp16 export, shared with the fake TensorRT's build
def test_torch_backend_runs_fp16_exports_like_ort(toy_fp16):
    from starflow_trt.calibration.calibrate import psnr
    from starflow_trt.runtime.pipeline import Pipeline
    from starflow_trt.toy.calibration import toy_calibration_set

    text, _, _ = toy_calibration_set(load_manifest(toy_fp16), samples=1)
    with Pipeline.from_dir(toy_fp16, backend="torch") as pt, Pipeline.from_dir(toy_fp16) as po:
        a = pt.generate(text[:1], seed=5, denoise=False)
        b = po.generate(text[:1], seed=5, denoise=False)
        assert pt.workspace._flat["deep_kv"].dtype == torch.float16
    assert psnr(a.latents, b.latents) > 40
