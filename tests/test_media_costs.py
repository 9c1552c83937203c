"""Cost models of the media kinds (FLOPs / bytes of the T5 encoder and the VAE graphs) vs independent counts."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")

from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from starflow_trt.errors import StarflowError  # noqa: E402
from starflow_trt.bench.kinds import kind_bench  # noqa: E402


def _count(module, *args) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*args)
    return counter.get_total_flops()


def test_t5_cost_matches_parameter_count_and_torch_flop_counter(tmp_path):
    from starflow_trt.export.media_kinds import t5_cost_model
    from starflow_trt.media.graphs import text_encoder_graph
    from starflow_trt.media.text import T5TextEncoder, TextTemplate
    from starflow_trt.media.tiny import make_t5_dir

    d, dkv, heads, dff, layers = 16, 8, 2, 32, 3
    t5_dir = make_t5_dir(tmp_path / "t5", d_model=d, d_kv=dkv, num_heads=heads, d_ff=dff, num_layers=layers)
    t5 = T5TextEncoder.from_pretrained(t5_dir, TextTemplate(txt_size=7))
    g = text_encoder_graph(t5)
    model = t5_cost_model(g.module.encoder)
    # independent count from the config: q, k, v, o + gated FFN (wi_0, wi_1, wo) per layer, no biases
    per_layer = 4 * d * heads * dkv + 3 * d * dff
    assert model["linear_params"] == layers * per_layer
    bench = kind_bench("text_encoder")
    b, t = 3, 7
    sizes = {"batch": b, "tokens": t, **{f"cost_{k}": v for k, v in model.items()}}
    cost = bench.cost(None, None, sizes)
    matmuls = 2 * b * t * layers * per_layer          # parameter count · 2 · tokens
    attention = layers * 2 * (2 * b * heads * t * t * dkv)   # QKᵀ and AV
    assert cost.flops == matmuls + attention
    ids = torch.randint(0, 3, (b, t))
    mask = torch.ones(b, t, dtype=torch.int64)
    assert cost.flops == _count(g.module, ids, mask)   # torch's own counter of the same forward
    assert cost.weight_bytes == 4 * sum(p.numel() for p in g.module.parameters())
    with pytest.raises(StarflowError, match="cost_model"):
        bench.cost(None, None, {"batch": b, "tokens": t})


def test_vae_costs_scale_with_latent_pixels_like_torch_counts():
    pytest.importorskip("diffusers")
    from starflow_trt.export.media_kinds import vae_cost_model
    from starflow_trt.media.graphs import vae_graphs
    from starflow_trt.media.tiny import make_vae

    vae = make_vae(seed=0, z_dim=4)
    graphs = vae_graphs(vae)   # example: batch 2, latent grid 2 × 3
    plan = graphs["vae_decode_step"].extra["cache_plan"]
    from starflow_trt.media.vae_graphs import CachePlan

    dec, enc = CachePlan.from_dict(plan), CachePlan.from_dict(graphs["vae_encode_step"].extra["cache_plan"])
    b, h, w = 1, 3, 5   # another batch and grid than the example
    inputs = {"vae_decode_first": (torch.randn(b, 1, 4, h, w),),
              "vae_decode_step": (torch.randn(b, 1, 4, h, w), *dec.zeros(b, h, w)),
              "vae_encode": (torch.rand(b, 1, 3, 16 * h, 16 * w),),
              "vae_encode_first": (torch.rand(b, 1, 3, 16 * h, 16 * w),),
              "vae_encode_step": (torch.rand(b, 4, 3, 16 * h, 16 * w), *enc.zeros(b, h, w))}
    for name, g in graphs.items():
        model = vae_cost_model(g)
        cost = kind_bench(name).cost(None, None, {"batch": b, "h": h, "w": w,
                                                  **{f"cost_{k}": v for k, v in model.items()}})
        counted = _count(g.module, *inputs[name])
        assert counted > 0 and cost.flops == pytest.approx(counted, rel=1e-9), name
        assert cost.weight_bytes == 4 * sum(p.numel() for p in g.module.parameters())
    # the decoder step is the big one: it upsamples 4 frames; the first chunk decodes 1
    assert vae_cost_model(graphs["vae_decode_step"])["flops_per_unit"] > \
        vae_cost_model(graphs["vae_decode_first"])["flops_per_unit"]


def test_media_bench_cases_carry_the_manifest_cost_model():
    from starflow_trt.export.manifest import DimRange, GraphSpec, TensorInfo

    spec = GraphSpec(name="text_encoder", file="t.onnx", sha256="0", kind="text_encoder", block=None, precision="fp32",
                     inputs=[TensorInfo("input_ids", "int64", ("batch", "tokens"))], outputs=[],
                     dims={"batch": DimRange(1, 2, 4), "tokens": DimRange(1, 8, 8)},
                     extra={"cost_model": {"linear_params": 10, "layers": 1, "heads": 1, "d_kv": 2, "d_model": 2,
                                           "weight_bytes": 40}})
    bench = kind_bench("text_encoder")
    (case,) = bench.cases(spec, None)
    assert case["batch"] == 2 and case["tokens"] == 8
    assert bench.cost(None, None, case).flops == 2 * 2 * 8 * 10 + 4 * 2 * 64 * 2
    assert bench.cases(spec.derive(extra={}), None) == []   # older exports: nothing to time
    assert kind_bench("toy_text_encoder").cases(spec, None) == []
