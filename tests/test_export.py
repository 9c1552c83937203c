"""ONNX export: checker, ORT parity per graph at several dynamic sizes, manifest, atomicity."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from starflow_trt.errors import ManifestError, StarflowError
from starflow_trt.export.graphs import DenoiserGraph, ForwardGraph, StepGraph, TextPrefillGraph
from starflow_trt.export.manifest import load_manifest
from starflow_trt.export.names import kv_names
from starflow_trt.reference.rope import rope_table

ort = pytest.importorskip("onnxruntime")


def session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def assert_parity(sess, module, feeds, rtol=1e-5):
    ref = module(*[torch.from_numpy(v) for v in feeds.values()])
    ref = ref if isinstance(ref, tuple) else (ref,)
    out = sess.run(None, feeds)
    assert len(out) == len(ref)
    for r, o in zip(ref, out):
        r = r.numpy()
        assert r.shape == o.shape
        err = np.abs(r - o).max()
        assert err <= rtol * np.abs(r).max() + 1e-7, f"max error {err} vs max {np.abs(r).max()}"


def rows(n, hd=32, pt=4):
    cos, sin = rope_table(hd, 1, 1, n, 0, pt)
    return cos.numpy(), sin.numpy()


def test_every_graph_passes_full_checker(goldens_export):
    manifest = load_manifest(goldens_export, verify=True)
    assert set(manifest.graphs) == {"deep_prefill", "deep_step", "denoiser",
                                    *(f"shallow_step_{k}" for k in range(5)), *(f"forward_{k}" for k in range(6))}
    for spec in manifest.graphs.values():
        onnx.checker.check_model(str(spec.path), full_check=True)
        model = onnx.load(str(spec.path))
        assert model.opset_import[0].version == manifest.opset == 18
        assert not any(n.op_type == "Attention" for n in model.graph.node)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("S", [1, 8, 37])
@pytest.mark.parametrize("P", [0, 13])
def test_step_graphs_parity(goldens_export, ref32, batch, S, P):
    manifest = load_manifest(goldens_export)
    rng = np.random.default_rng(batch * 100 + S + P)
    cos, sin = rows(P + S)
    for name, block, layers, heads in [("deep_step", 5, 2, 2), ("shallow_step_2", 2, 1, 1)]:
        feeds = {"tokens": rng.standard_normal((batch, S, 4), dtype=np.float32),
                 "rope_cos": cos[P:], "rope_sin": sin[P:],
                 **{n: rng.standard_normal((P, batch, heads, 32), dtype=np.float32)
                    for n in kv_names(layers, "past")}}
        sess = session(manifest.graph(name).path)
        assert [i.name for i in sess.get_inputs()] == list(feeds)
        assert [o.name for o in sess.get_outputs()] == ["scale", "shift", *kv_names(layers, "new")]
        assert_parity(sess, StepGraph(ref32.blocks[block]), feeds)


def test_step_graph_equals_reference_step(ref32):
    """The exported wrapper (per-layer seq-major K/V, two-part attention) is the reference block step."""
    block = ref32.blocks[5]
    g = torch.Generator().manual_seed(3)
    P, S, B = 9, 6, 2
    past = [(torch.randn(B, 2, P, 32, generator=g), torch.randn(B, 2, P, 32, generator=g)) for _ in range(2)]
    tokens = torch.randn(B, S, 4, generator=g)
    cos, sin = (torch.from_numpy(r) for r in rows(P + S))
    a_ref, b_ref, kv_ref = block.step(tokens, cos[P:], sin[P:], past)  # concatenating SDPA path
    flat = [t.permute(2, 0, 1, 3).contiguous() for kv in past for t in kv]
    a, b, *new = StepGraph(block)(tokens, cos[P:], sin[P:], *flat)
    torch.testing.assert_close(a, a_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(b, b_ref, rtol=1e-5, atol=1e-6)
    for got, want in zip(new, [t for kv in kv_ref for t in kv]):
        torch.testing.assert_close(got, want.permute(2, 0, 1, 3), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch", [1, 4])
def test_prefill_parity(goldens_export, ref32, batch):
    manifest = load_manifest(goldens_export)
    cos, sin = rows(4)
    feeds = {"text": np.random.default_rng(batch).standard_normal((batch, 4, 16), dtype=np.float32),
             "rope_cos": cos, "rope_sin": sin}
    assert_parity(session(manifest.graph("deep_prefill").path), TextPrefillGraph(ref32.top), feeds)


@pytest.mark.parametrize("batch,frames", [(1, 1), (4, 1), (1, 3), (4, 3), (2, 2)])
def test_forward_and_denoiser_parity(goldens_export, ref32, batch, frames):
    manifest = load_manifest(goldens_export)
    rng = np.random.default_rng(batch * 10 + frames)
    x = rng.standard_normal((batch, frames, 6, 4, 4), dtype=np.float32)
    text = rng.standard_normal((batch, 4, 16), dtype=np.float32)
    for k in range(6):
        top = k == 5
        cos, sin = rope_table(32, frames if top else 1, 6, 4, 4 if top else 0, 4)
        feeds = {"x": x, "rope_cos": cos.numpy(), "rope_sin": sin.numpy()}
        if top:
            feeds["text"] = text
        assert_parity(session(manifest.graph(f"forward_{k}").path), ForwardGraph(ref32.blocks[k], not top), feeds)
    cos, sin = rope_table(32, frames, 6, 4, 4, 4)
    feeds = {"x": x, "text": text, "rope_cos": cos.numpy(), "rope_sin": sin.numpy()}
    assert_parity(session(manifest.graph("denoiser").path), DenoiserGraph(ref32.learnable_self_denoiser), feeds)


def test_manifest_round_trip(goldens_export):
    manifest = load_manifest(goldens_export, verify=True)
    on_disk = json.loads((goldens_export / "manifest.json").read_text())
    assert manifest.to_dict() == on_disk
    assert manifest.config.hash() == on_disk["config_hash"]
    step = manifest.graph("deep_step")
    prof = step.profile()
    assert prof["tokens"] == ((1, 1, 4), (2, 64 if 72 >= 64 else 72, 4), (8, 72, 4))
    assert prof["past_k_0"][2] == (4 + 72, 8, 2, 32) and prof["past_v_1"][0] == (0, 1, 2, 32)
    assert len(step.extra["sos"]) == 4
    assert manifest.extra["kv_layout"].startswith("per layer past_k_l")


def test_edited_graph_is_detected(goldens_export, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(goldens_export, copy)
    with open(copy / "forward_3.onnx", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ManifestError, match="modified after export"):
        load_manifest(copy, verify=True)
    (copy / "deep_step.onnx").unlink()
    with pytest.raises(ManifestError, match="missing"):
        load_manifest(copy).graph("deep_step").verify()
    (copy / "manifest.json").write_text("{bad json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(copy)


def test_interrupted_export_leaves_nothing(goldens_dir, tmp_path, monkeypatch):
    from starflow_trt.export import onnx_export

    real = onnx_export.export_one
    calls = []

    def failing(plan, *args, **kwargs):
        calls.append(plan.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(plan, *args, **kwargs)

    monkeypatch.setattr(onnx_export, "export_one", failing)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        onnx_export.export_graphs(goldens_dir / "config.yaml", goldens_dir / "model.pth", out,
                                  graphs=["deep_prefill", "deep_step"])
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_export_refuses_bad_requests(goldens_dir, goldens_export, tmp_path):
    from starflow_trt.export.onnx_export import export_graphs

    with pytest.raises(StarflowError, match="not empty"):
        export_graphs(goldens_dir / "config.yaml", goldens_dir / "model.pth", goldens_export)
    with pytest.raises(StarflowError, match="unknown graph"):
        export_graphs(goldens_dir / "config.yaml", goldens_dir / "model.pth", tmp_path / "o", graphs=["nope"])
    with pytest.raises(StarflowError, match="opset"):
        export_graphs(goldens_dir / "config.yaml", goldens_dir / "model.pth", tmp_path / "o", opset=23)


def test_simplified_graph_keeps_parity(goldens_dir, ref32, tmp_path):
    pytest.importorskip("onnxslim")
    from starflow_trt.export.onnx_export import ExportLimits, export_graphs

    manifest, _ = export_graphs(goldens_dir / "config.yaml", goldens_dir / "model.pth", tmp_path / "s",
                                graphs=["deep_step"], simplify=True, limits=ExportLimits(height=6, width=4))
    rng = np.random.default_rng(7)
    cos, sin = rows(5 + 8)
    feeds = {"tokens": rng.standard_normal((2, 8, 4), dtype=np.float32), "rope_cos": cos[5:], "rope_sin": sin[5:],
             **{n: rng.standard_normal((5, 2, 2, 32), dtype=np.float32) for n in kv_names(2, "past")}}
    assert_parity(session(manifest.graph("deep_step").path), StepGraph(ref32.top), feeds)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float8_e4m3fn"])
def test_strided_weights_are_written_in_c_order(dtype):
    """The exporter's folded ``Transpose(W)`` views are written through a torch copy (fast): the same bytes,
    in C order, for every weight dtype (ml_dtypes included) and for negative strides (numpy's copy)."""
    import ml_dtypes
    import onnx_ir as ir

    from starflow_trt.export.onnx_export import _contiguous_weights

    np_dtype = getattr(ml_dtypes, dtype, None) or np.dtype(dtype)
    base = np.arange(6 * 10, dtype=np.float32).reshape(6, 10).astype(np_dtype)
    views = {"transposed": base.T, "flipped": base[::-1], "contiguous": base}
    graph = ir.Graph([], [], nodes=[], initializers=[ir.Value(name=k, const_value=ir.Tensor(v, name=k))
                                                     for k, v in views.items()])
    _contiguous_weights(ir.Model(graph, ir_version=10))
    for name, view in views.items():
        tensor = graph.initializers[name].const_value
        assert isinstance(tensor, ir.LazyTensor) == (name != "contiguous")
        assert tensor.tobytes() == np.ascontiguousarray(view).tobytes() and tensor.shape == view.shape
        assert tensor.dtype == ir.DataType.from_numpy(np.dtype(np_dtype))
