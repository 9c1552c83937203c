"""GPU projections for the real 7B config from the analytic cost model and datasheet rates.

PROJECTIONS, not measurements: each graph call takes max(FLOPs / peak, bytes / bandwidth)
(a roofline), summed over the calls of one latent frame / one 81-frame 480p video. Peaks are
dense (no sparsity) tensor-core rates from NVIDIA's datasheets; real kernels reach a
fraction of them, so read these as lower bounds on time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from ..config import ModelConfig
from ..costs import step_cost, text_encoder_flops
from ..geometry import frame_geometry

GPUS = {  # dense tensor-core peaks and memory, per the NVIDIA datasheets named (fp8: E4M3, where the GPU has it)
    "H100 80GB SXM": {"fp16_tflops": 989.0, "int8_tops": 1979.0, "fp8_tflops": 1979.0, "bandwidth_gbs": 3350.0,
                      "memory_gb": 80, "source": "NVIDIA H100 Tensor Core GPU datasheet (SXM5, dense)"},
    "H200 141GB SXM": {"fp16_tflops": 989.0, "int8_tops": 1979.0, "fp8_tflops": 1979.0, "bandwidth_gbs": 4800.0,
                       "memory_gb": 141, "source": "NVIDIA H200 Tensor Core GPU datasheet (SXM, dense = half the "
                                                   "sparsity figures)"},
    "L4": {"fp16_tflops": 121.0, "int8_tops": 242.0, "fp8_tflops": 242.0, "bandwidth_gbs": 300.0, "memory_gb": 24,
           "source": "NVIDIA L4 Tensor Core GPU datasheet (dense = half the sparsity figures)"},
    "Jetson AGX Orin 64GB": {"fp16_tflops": 42.5, "int8_tops": 85.0, "bandwidth_gbs": 204.8, "memory_gb": 64,
                             "source": "NVIDIA Jetson AGX Orin series datasheet (GPU only, dense; 275 TOPS is "
                                       "sparse INT8 GPU+DLA)"},
}


@dataclass(frozen=True)
class ScheduleWork:
    """Measured deep-block work of one Jacobi schedule (bench config, several prompts).

    sweeps: deep tokens evaluated per generated token; tokens_per_call: deep tokens per deep call.
    """

    name: str
    sweeps: float
    tokens_per_call: float

    @classmethod
    def from_counts(cls, name: str, deep_tokens: int, deep_calls: int, generated_tokens: int) -> "ScheduleWork":
        return cls(name, deep_tokens / generated_tokens, deep_tokens / max(deep_calls, 1))


def _frame_calls(cfg: ModelConfig, frame: int, tokens: int, chunk: int, guidance: bool, dtype_bytes: int):
    """Deep-step calls that generate latent frame ``frame`` (0-based) with ``chunk`` tokens per call."""
    bp = 2 if guidance else 1
    L = cfg.txt_size
    start = frame * tokens
    out = []
    for i in range(0, tokens, chunk):
        s = min(chunk, tokens - i)
        out.append(step_cost(cfg, cfg.top_index, bp, s, L + start + i, dtype_bytes))
    return out


#: peak rate key per precision of the GEMMs
PEAK_KEY = {"fp16": "fp16_tflops", "int8": "int8_tops", "fp8": "fp8_tflops"}


def project(cfg: ModelConfig, tokens_per_frame: int, frames: int, gpu: dict, precision: str = "fp16",
            sweeps_per_token: float = 1.0, chunk: int = 1, guidance: bool = True, kv_bytes: int = 2) -> dict:
    """Seconds per latent frame (average) and per video for the deep block + shallow blocks + denoiser.

    chunk=1 is token-by-token decoding (each call streams all deep weights: memory bound). With
    ``chunk`` tokens per call and ``sweeps_per_token`` deep evaluations per token, a video makes
    ``sweeps · tokens / chunk`` deep calls (a measured schedule: chunk = its tokens per call).
    ``precision``: of weights and GEMMs (fp16, int8, fp8: 1 byte per weight at the fp8 / int8 rate);
    ``kv_bytes``: per cached K/V element (2: fp16, 1: ``--kv-dtype fp8``), for the memory columns.
    """
    if PEAK_KEY[precision] not in gpu:
        raise ValueError(f"no {precision} rate for this GPU")
    dtype_bytes = 1 if precision in ("int8", "fp8") else 2
    peak = gpu[PEAK_KEY[precision]] * 1e12
    bw = gpu["bandwidth_gbs"] * 1e9
    deep = 0.0
    calls = 0.0
    bound = {"compute": 0, "memory": 0}
    for t in range(frames):
        for cost in _frame_calls(cfg, t, tokens_per_frame, chunk, guidance, dtype_bytes):
            tc, tm = cost.flops / peak, cost.bytes / bw
            bound["compute" if tc >= tm else "memory"] += 1
            deep += max(tc, tm) * (sweeps_per_token if chunk > 1 else 1.0)
            calls += sweeps_per_token if chunk > 1 else 1.0
    shallow = 0.0
    for k in range(cfg.num_blocks - 1):
        if cfg.layers[k] == 0:
            continue
        for i in range(0, tokens_per_frame, max(chunk, 1)):
            s = min(max(chunk, 1), tokens_per_frame - i)
            c = step_cost(cfg, k, frames, s, i, dtype_bytes)  # all frames of the video batched
            shallow += max(c.flops / peak, c.bytes / bw) * (sweeps_per_token if chunk > 1 else 1.0)
    from ..costs import denoiser_cost

    den = denoiser_cost(cfg, 1, min(frames, cfg.local_attn_window or frames), tokens_per_frame, dtype_bytes)
    den_s = max(den.flops / peak, den.bytes / bw)
    total = deep + shallow + den_s
    # K/V stay fp16 in int8 / fp8 exports (the Q/DQ graphs quantise GEMM inputs, not the cache) unless kv_bytes=1
    kv_gb = 2 * cfg.layers[cfg.top_index] * (2 if guidance else 1) * cfg.block_heads(cfg.top_index) * \
        cfg.head_dim * (cfg.txt_size + frames * tokens_per_frame) * kv_bytes / 1e9
    weights_gb = (sum(p for p in _params(cfg))) * dtype_bytes / 1e9
    return {"seconds_per_frame": total / frames, "seconds_per_video": total, "deep_s": deep, "shallow_s": shallow,
            "denoiser_s": den_s, "deep_calls": round(calls),
            "calls_compute_bound": bound["compute"], "calls_memory_bound": bound["memory"],
            "kv_cache_gb": kv_gb, "weights_gb": weights_gb,
            "fits_in_memory": kv_gb + weights_gb < gpu["memory_gb"]}


def _params(cfg: ModelConfig):
    from ..costs import block_params, denoiser_params

    yield from (block_params(cfg, k) for k in range(cfg.num_blocks))
    yield denoiser_params(cfg)


def projection_table(cfg: ModelConfig, schedules: Sequence[ScheduleWork], aspect: str = "16:9",
                     frames: int = 21) -> list[dict]:
    """Rows per GPU: autoregressive S=1 fp16, then every measured schedule in fp16 and int8.

    Each schedule keeps the deep calls and tokens per generated token it was measured with; the
    shallow blocks and the denoiser are modelled alike. No CUDA-graph replay is assumed: the trt
    backend replays graphs only for repeated (S, P) shapes, and P grows with every call.
    """
    tokens = frame_geometry(cfg, aspect)["tokens_per_frame"]
    plans = [("AR S=1", 1, 1.0, "fp16")]
    for w in schedules:
        chunk = max(1, round(w.tokens_per_call))
        plans += [(f"{w.name} (S≈{chunk}, {w.sweeps:.2f} sweeps)", chunk, w.sweeps, p) for p in ("fp16", "int8")]
    rows = []
    for name, gpu in GPUS.items():
        for label, chunk, sweeps, precision in plans:
            r = project(cfg, tokens, frames, gpu, precision, sweeps, chunk)
            rows.append({"gpu": name, "schedule": label, "precision": precision, **r, "source": gpu["source"]})
    return rows


def fp8_projection_table(cfg: ModelConfig, schedules: Sequence[ScheduleWork], aspect: str = "16:9",
                         frames: int = 21, gpus: Sequence[str] = ("H100 80GB SXM", "H200 141GB SXM")) -> list[dict]:
    """FP8 vs FP16 (and INT8) for every measured schedule on Hopper, with the FP16 and FP8 K/V cache sizes:
    PROJECTIONS (roofline on datasheet peaks), not measurements."""
    tokens = frame_geometry(cfg, aspect)["tokens_per_frame"]
    rows = []
    for name in gpus:
        gpu = GPUS[name]
        for w in schedules:
            chunk = max(1, round(w.tokens_per_call))
            for precision, kv_bytes in (("fp16", 2), ("int8", 2), ("fp8", 2), ("fp8", 1)):
                r = project(cfg, tokens, frames, gpu, precision, w.sweeps, chunk, kv_bytes=kv_bytes)
                rows.append({"gpu": name, "schedule": f"{w.name} (S≈{chunk}, {w.sweeps:.2f} sweeps)",
                             "precision": precision, "kv_dtype": "fp8" if kv_bytes == 1 else "fp16", **r,
                             "source": gpu["source"]})
    return rows


# ------------------------------------------------------------------ per stage: text, flow, VAE decode
#: flan-t5-xl encoder dims (the 7B's text encoder; the same numbers as media.tiny.FLAN_T5_XL)
T5_XL = dict(d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24)


def t5_linear_params(d_model: int, d_ff: int, d_kv: int, num_heads: int, num_layers: int, gated: bool = True) -> int:
    """Linear weights of a T5 encoder: q, k, v, o (4 · d_model · inner) and the feed-forward
    (3 or 2 matrices d_model × d_ff for gated / plain GELU) per layer."""
    inner = num_heads * d_kv
    return num_layers * (4 * d_model * inner + (3 if gated else 2) * d_model * d_ff)


def vae_decode_flops(h: int, w: int, frames: int, config: Optional[dict] = None) -> float:
    """FLOPs of decoding ``frames`` latent frames of an [h, w] latent grid with the Wan2.2 VAE.

    Counted by running diffusers' decoder on the meta device under torch's FLOP counter (no
    memory, no weights): the first latent frame and one steady step, the rest scaled.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ..media.vae_load import WAN22_VAE_CONFIG, diffusers_wan

    with torch.device("meta"):
        vae = diffusers_wan().AutoencoderKLWan(**(config or WAN22_VAE_CONFIG))
    z_dim = (config or WAN22_VAE_CONFIG).get("z_dim", 48)
    counts = []
    for t in (1, 2):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            vae.decode(torch.empty(1, z_dim, t, h, w, device="meta"))
        counts.append(counter.get_total_flops())
    first, step = counts[0], counts[1] - counts[0]
    return float(first + step * max(frames - 1, 0))


def stage_projection_table(cfg: ModelConfig, schedule: ScheduleWork, aspect: str = "16:9", frames: int = 21,
                           prompts: int = 1, vae_flops: Optional[float] = None) -> list[dict]:
    """Seconds per stage (text encoder, flow, VAE decode) of one video per GPU — PROJECTIONS.

    Text: flan-t5-xl on [cond; uncond] × ``txt_size`` tokens in bf16, max(compute, weight streaming). Flow:
    :func:`project` with the measured ``schedule``, fp16 and int8. VAE decode: FLOPs counted by
    :func:`vae_decode_flops` at the fp16 rate (its convolutions are compute bound).
    """
    geo = frame_geometry(cfg, aspect)
    text_params = t5_linear_params(**T5_XL)
    text_flops = text_encoder_flops(2 * prompts, cfg.txt_size, text_params, T5_XL["num_layers"],
                                    T5_XL["num_heads"], T5_XL["d_kv"])
    vae = vae_flops if vae_flops is not None else vae_decode_flops(geo["h"] * cfg.patch_size,
                                                                   geo["w"] * cfg.patch_size, frames)
    rows = []
    for name, gpu in GPUS.items():
        fp16 = gpu["fp16_tflops"] * 1e12
        text_s = max(text_flops / fp16, 2 * text_params / (gpu["bandwidth_gbs"] * 1e9))
        vae_s = prompts * vae / fp16
        for precision in ("fp16", "int8"):
            flow = project(cfg, geo["tokens_per_frame"], frames, gpu, precision, schedule.sweeps,
                           chunk=max(1, round(schedule.tokens_per_call)))
            flow_s = prompts * flow["seconds_per_video"]
            rows.append({"gpu": name, "schedule": schedule.name, "flow_precision": precision,
                         "text_s": text_s, "flow_s": flow_s,
                         "vae_decode_s": vae_s, "total_s": text_s + flow_s + vae_s,
                         "text_tflop": text_flops / 1e12, "vae_tflop": vae / 1e12, "source": gpu["source"]})
    return rows
