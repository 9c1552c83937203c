"""Stage projections: the FLOP formulas against torch's FLOP counter on real library modules."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from starflow_trt.bench.projection import GPUS, ScheduleWork, stage_projection_table, t5_linear_params, vae_decode_flops
from starflow_trt.costs import text_encoder_flops
from starflow_trt.bench.paths import model_config_7b
from starflow_trt.config import load_config


def test_text_encoder_flops_match_counter_on_a_t5():
    from transformers import T5Config, T5EncoderModel

    dims = dict(d_model=64, d_ff=96, d_kv=16, num_heads=4, num_layers=3)
    config = T5Config(vocab_size=50, feed_forward_proj="gated-gelu", **dims)
    config._attn_implementation = "eager"   # the counter sees QK^T and AV as bmm (CPU SDPA is not counted)
    model = T5EncoderModel(config).eval()
    ids = torch.randint(0, 50, (2, 40))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=ids)
    linear = t5_linear_params(**dims)
    assert linear == sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    flops = text_encoder_flops(2, 40, linear, dims["num_layers"], dims["num_heads"], dims["d_kv"])
    assert flops == pytest.approx(counter.get_total_flops(), rel=1e-9)


def test_vae_decode_flops_scale_from_first_and_step():
    from starflow_trt.media.tiny import make_vae

    vae = make_vae()
    config = dict(vae.config)
    z_dim = config["z_dim"]
    with torch.device("meta"), FlopCounterMode(display=False) as counter, torch.no_grad():
        type(vae)(**config).decode(torch.empty(1, z_dim, 4, 3, 5))
    assert vae_decode_flops(3, 5, 4, config) == pytest.approx(counter.get_total_flops(), rel=1e-9)


def test_stage_projection_rows():
    cfg = load_config(model_config_7b())
    rows = stage_projection_table(cfg, ScheduleWork("predictive", 1.3, 36.0), vae_flops=608e12)
    assert {r["gpu"] for r in rows} == set(GPUS) and len(rows) == 2 * len(GPUS)
    h100 = {r["flow_precision"]: r for r in rows if r["gpu"].startswith("H100")}
    assert h100["int8"]["flow_s"] < h100["fp16"]["flow_s"]
    assert h100["fp16"]["vae_decode_s"] == pytest.approx(608e12 / (GPUS["H100 80GB SXM"]["fp16_tflops"] * 1e12))
    for r in rows:
        assert r["total_s"] == pytest.approx(r["text_s"] + r["flow_s"] + r["vae_decode_s"])


def test_fp8_projection_on_hopper():
    """FP8 rows: the fp8 rate where calls are compute bound, 1-byte weights; ``--kv-dtype fp8`` halves the cache."""
    from starflow_trt.bench.projection import fp8_projection_table, project

    cfg = load_config(model_config_7b())
    rows = fp8_projection_table(cfg, [ScheduleWork("predictive", 1.1, 60.0)])
    assert {r["gpu"] for r in rows} == {"H100 80GB SXM", "H200 141GB SXM"} and len(rows) == 8
    by = {(r["gpu"], r["precision"], r["kv_dtype"]): r for r in rows}
    for gpu in ("H100 80GB SXM", "H200 141GB SXM"):
        fp16, fp8 = by[(gpu, "fp16", "fp16")], by[(gpu, "fp8", "fp16")]
        assert fp8["seconds_per_video"] < fp16["seconds_per_video"] and fp8["weights_gb"] == fp16["weights_gb"] / 2
        assert by[(gpu, "fp8", "fp8")]["kv_cache_gb"] == pytest.approx(fp16["kv_cache_gb"] / 2)
    assert by[("H200 141GB SXM", "fp8", "fp16")]["seconds_per_video"] < by[("H100 80GB SXM", "fp8", "fp16")]["seconds_per_video"]
    with pytest.raises(ValueError, match="no fp8 rate"):   # Orin (Ampere) has no FP8 tensor cores
        project(cfg, 100, 2, GPUS["Jetson AGX Orin 64GB"], "fp8")
