"""GPU measurements through PyTorch: golden parity on CUDA and per-stage timings of the real 7B sizes.

For a lent GPU machine without TensorRT (its wheels are not on PyPI, and the machine reaches no
index). Every graph is the same torch module the ONNX export wraps, with random weights of the
real shapes (4.84 B-parameter deep block, flan-t5-xl encoder, Wan2.2 VAE decoder): the timings are
eager PyTorch on the GPU, not TensorRT. Medians of CUDA-event timings after warm-up.

    python benchmarks/gpu_torch.py -o OUT_DIR [--tiny]   # --tiny: small sizes on CPU (a dry run)

Writes OUT_DIR/gpu_torch.json and prints one table.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from starflow_trt.bench.projection import GPUS  # noqa: E402
from starflow_trt.config import load_config  # noqa: E402
from starflow_trt.costs import step_cost  # noqa: E402
from starflow_trt.export.graphs import DenoiserGraph, StepGraph  # noqa: E402
from starflow_trt.reference.denoiser import Denoiser  # noqa: E402
from starflow_trt.reference.flow import FlowBlock  # noqa: E402

ROWS: list[dict] = []


def row(**kw) -> None:
    ROWS.append(kw)
    print(json.dumps(kw), flush=True)


def timed(fn, device: torch.device, warmup: int = 2, iters: int = 7) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on a GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def random_module(factory, device, dtype, std: float = 0.02) -> torch.nn.Module:
    """``factory()`` built on meta, materialised on ``device`` in ``dtype`` with N(0, std) weights, unit norms."""
    with torch.device("meta"):
        module = factory()
    module = module.to_empty(device=device).to(dtype)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.normal_(0.0, std, generator=g)
        for b in module.buffers():
            if b.is_floating_point():
                b.zero_()
    return module.eval().requires_grad_(False)


def section(name):
    def wrap(fn):
        def run(*a, **kw):
            t = time.perf_counter()
            try:
                fn(*a, **kw)
            except Exception as e:  # one failing section must not lose the others
                row(section=name, error=f"{type(e).__name__}: {e}", trace=traceback.format_exc()[-2000:])
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                print(f"# {name}: {time.perf_counter() - t:.1f} s", flush=True)
        return run
    return wrap


@section("env")
def env(device) -> None:
    info = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1),
                    capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda)
    for mod in ("tensorrt", "onnxruntime", "polygraphy", "cuda", "diffusers", "transformers"):
        try:
            m = importlib.import_module(mod)
            info[mod] = getattr(m, "__version__", "present")
        except Exception as e:
            info[mod] = f"absent ({type(e).__name__})"
    try:
        import onnxruntime as ort
        info["ort_providers"] = ort.get_available_providers()
    except Exception:
        pass
    row(section="env", **info)


@section("ceilings")
def ceilings(device, tiny) -> None:
    n = 1024 if tiny else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = timed(lambda: a @ b, device)
    row(section="ceilings", what="bf16 matmul", n=n, ms=ms, tflops=2 * n ** 3 / ms / 1e9)
    x = torch.empty(2 ** (24 if tiny else 30), dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    ms = timed(lambda: y.copy_(x), device)
    row(section="ceilings", what="d2d copy", bytes=x.numel(), ms=ms, gbs=2 * x.numel() / ms / 1e6)


@section("goldens")
def goldens(device) -> None:
    sys.path.insert(0, str(ROOT))
    from starflow_trt.reference import load_reference
    from tests.conftest import GOLDENS, golden_error
    from tests.test_reference_goldens import compute_all

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cases = torch.load(GOLDENS / "cases.pt", weights_only=True)
    model = load_reference(GOLDENS / "config.yaml", GOLDENS / "model.pth", dtype=torch.float32, device=device)
    t = time.perf_counter()
    ours = compute_all(model, {k: v.to(device) for k, v in cases.items()})
    seconds = time.perf_counter() - t
    worst, failed = 0.0, []
    for name, value in ours.items():
        err, bound = golden_error(value.cpu(), cases[name], name)
        worst = max(worst, err / bound if bound else 0.0)
        if err > bound:
            failed.append(f"{name}: {err:.2e} > {bound:.2e}")
    row(section="goldens", device=str(device), tensors=len(ours), worst_err_over_bound=worst, failed=failed,
        seconds=seconds)


def _seven_b():
    cfg = load_config(ROOT / "starflow_trt/configs/starflow_v_7b.yaml")
    return cfg


@section("deep_step")
def deep_step(device, dtype, tiny) -> None:
    cfg = _seven_b()
    k = cfg.num_blocks - 1
    if tiny:
        import dataclasses
        cfg = dataclasses.replace(cfg, layers_per_block=tuple(cfg.layers[:-1]) + (1,), top_block_channels=256)
    block = random_module(lambda: FlowBlock(cfg, k), device, dtype)
    graph = StepGraph(block)
    params = sum(p.numel() for p in block.parameters())
    heads, hd, layers = cfg.block_heads(k), cfg.head_dim, cfg.layers[k]
    L, F, T = cfg.txt_size, 30 * 52, 21
    if tiny:
        F, T = 16, 3
    N = T * F
    bp = 2
    pmax = L + N
    past = [torch.randn(pmax, bp, heads, hd, device=device, dtype=dtype) for _ in range(2 * layers)]
    peak = 798e12 if device.type == "cuda" else 1e12
    for s in (1, 16, 64, 256):
        for p in sorted({L, L + N // 2, L + N - s}):
            tokens = torch.randn(bp, s, cfg.token_channels, device=device, dtype=dtype)
            cos = torch.randn(s, hd, device=device, dtype=dtype)
            sin = torch.randn(s, hd, device=device, dtype=dtype)
            feeds = [tokens, cos, sin, *(x[:p] for x in past)]
            with torch.no_grad():
                ms = timed(lambda: graph(*feeds), device, warmup=2, iters=5 if p > L else 9)
            cost = step_cost(cfg, k, bp, s, p, dtype_bytes=2)
            row(section="deep_step", dtype=str(dtype), params=params, batch=bp, S=s, P=p, ms=ms,
                tflops=cost.flops / ms / 1e9, pct_peak=100 * cost.flops / ms / 1e9 / (peak / 1e12),
                gbs=cost.bytes / ms / 1e6, ms_per_token=ms / s)
    del past


@section("deep_step_graphed")
def deep_step_graphed(device, dtype, tiny, compiled: bool = False, layout: str = "pbhd") -> None:
    """The same deep step replayed from a CUDA graph (launch overhead gone) and, with ``compiled``,
    through torch.compile (fused kernels) inside the graph.

    layout "pbhd": past K/V [P, B, H, hd] as the exported graphs take them; "bhpd": [B, H, P, hd]
    (what attention reads), to measure what the cache layout costs at long contexts.
    """
    if device.type != "cuda":
        return
    with _past_layout(layout):
        _graphed_rows(device, dtype, compiled, layout)


@contextmanager
def _past_layout(layout: str):
    """"bhpd": the step wrappers take past K/V already [B, H, P, hd] (``kv_to_layers`` an identity
    pairing) for the duration; the module's own ``kv_to_layers`` is restored after, even on error."""
    from starflow_trt.export import graphs as export_graphs

    original = export_graphs.kv_to_layers
    if layout == "bhpd":
        export_graphs.kv_to_layers = lambda flat: [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
    try:
        yield
    finally:
        export_graphs.kv_to_layers = original


def _graphed_rows(device, dtype, compiled: bool, layout: str) -> None:
    cfg = _seven_b()
    k = cfg.num_blocks - 1
    block = random_module(lambda: FlowBlock(cfg, k), device, dtype)
    graph = StepGraph(block)
    heads, hd, layers = cfg.block_heads(k), cfg.head_dim, cfg.layers[k]
    L, N, bp = cfg.txt_size, 30 * 52 * 21, 2
    for s in ((1, 64) if compiled else (1, 16, 64, 256)):
        for p in ((L + N // 2,) if compiled else (L, L + N // 2)):   # P = L: see run 2
            tokens = torch.randn(bp, s, cfg.token_channels, device=device, dtype=dtype)
            cos = torch.randn(s, hd, device=device, dtype=dtype)
            shape = (bp, heads, p, hd) if layout == "bhpd" else (p, bp, heads, hd)
            past = [torch.randn(*shape, device=device, dtype=dtype) for _ in range(2 * layers)]
            fn = torch.compile(graph, dynamic=False) if compiled else graph
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.no_grad():
                for _ in range(3):
                    fn(tokens, cos, cos, *past)
            torch.cuda.current_stream().wait_stream(side)
            cg = torch.cuda.CUDAGraph()
            with torch.cuda.graph(cg), torch.no_grad():
                out = fn(tokens, cos, cos, *past)
            ms = timed(cg.replay, device, warmup=3, iters=15)
            cost = step_cost(cfg, k, bp, s, p, dtype_bytes=2)
            row(section="deep_step_compiled" if compiled else "deep_step_graphed", layout=layout, dtype=str(dtype),
                batch=bp,
                S=s, P=p, ms=ms, tflops=cost.flops / ms / 1e9, gbs=cost.bytes / ms / 1e6,
                roofline_ms=max(cost.flops / 728e9, cost.bytes / 2.89e9))
            del out, cg, past


@section("shallow_step")
def shallow_step(device, dtype, tiny) -> None:
    cfg = _seven_b()
    block = random_module(lambda: FlowBlock(cfg, 0), device, dtype)
    graph = StepGraph(block)
    heads, hd = cfg.block_heads(0), cfg.head_dim
    F, T = (16, 3) if tiny else (30 * 52, 21)
    for s, p in ((16, 0), (64, 0), (64, F // 2), (F, 0)):
        s = min(s, F)
        tokens = torch.randn(T, s, cfg.token_channels, device=device, dtype=dtype)
        cos = torch.randn(s, hd, device=device, dtype=dtype)
        feeds = [tokens, cos, cos, *(torch.randn(p, T, heads, hd, device=device, dtype=dtype)
                                     for _ in range(2 * cfg.layers[0]))]
        with torch.no_grad():
            ms = timed(lambda: graph(*feeds), device)
        row(section="shallow_step", dtype=str(dtype), batch=T, S=s, P=p, ms=ms)


@section("denoiser")
def denoiser(device, dtype, tiny) -> None:
    cfg = _seven_b()
    den = DenoiserGraph(random_module(lambda: Denoiser(cfg), device, dtype))
    T, h, w = (3, 4, 4) if tiny else (21, 30, 52)
    L = cfg.txt_size
    x = torch.randn(1, T, h, w, cfg.token_channels, device=device, dtype=dtype)
    y = torch.randn(1, L, cfg.text_width, device=device, dtype=dtype)
    n = L + T * h * w
    cos = torch.randn(n, cfg.head_dim, device=device, dtype=dtype)
    with torch.no_grad():
        ms = timed(lambda: den(x, y, cos, cos), device, warmup=1, iters=3)
    row(section="denoiser", dtype=str(dtype), frames=T, grid=[h, w], ms=ms,
        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)


@section("text_encoder")
def text_encoder(device, dtype, tiny) -> None:
    from transformers import T5Config, T5EncoderModel

    from starflow_trt.media.tiny import FLAN_T5_XL

    dims = dict(FLAN_T5_XL)
    if tiny:
        dims.update(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16)
    config = T5Config(**dims)
    model = random_module(lambda: T5EncoderModel(config), device, dtype, std=0.05)
    ids = torch.randint(0, config.vocab_size, (2, 256), device=device)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ms = timed(lambda: model(input_ids=ids, attention_mask=mask), device)
    row(section="text_encoder", dtype=str(dtype), batch=2, tokens=256,
        params=sum(p.numel() for p in model.parameters()), ms=ms)


@section("vae_decode")
def vae_decode(device, dtype, tiny) -> None:
    from diffusers import AutoencoderKLWan

    from starflow_trt.media.vae_load import WAN22_VAE_CONFIG

    cfg = dict(WAN22_VAE_CONFIG)
    if tiny:
        cfg.update(base_dim=8, decoder_base_dim=12)
    vae = random_module(lambda: AutoencoderKLWan(**cfg), device, dtype)
    T, h, w = (2, 4, 4) if tiny else (21, 30, 52)
    z = torch.randn(1, cfg.get("z_dim", 48), T, h, w, device=device, dtype=dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        ms = timed(lambda: vae.decode(z).sample, device, warmup=1, iters=3)
        out = vae.decode(z).sample
    row(section="vae_decode", dtype=str(dtype), latent=list(z.shape), video=list(out.shape), ms=ms,
        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--out", type=Path, default=Path("gpu_out"))
    ap.add_argument("--tiny", action="store_true", help="small sizes on CPU: check the script runs")
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    low = torch.float32 if device.type == "cpu" else torch.bfloat16
    plan = {"env": lambda: env(device), "ceilings": lambda: ceilings(device, args.tiny),
            "goldens": lambda: goldens(device),
            "deep_step": lambda: deep_step(device, low, args.tiny),
            "deep_step_graphed": lambda: deep_step_graphed(device, low, args.tiny),
            "deep_step_compiled": lambda: deep_step_graphed(device, low, args.tiny, compiled=True),
            "deep_step_layout": lambda: deep_step_graphed(device, low, args.tiny, compiled=True, layout="bhpd"),
            "shallow_step": lambda: shallow_step(device, low, args.tiny),
            "denoiser": lambda: denoiser(device, low, args.tiny),
            "text_encoder": lambda: (text_encoder(device, low, args.tiny),
                                     text_encoder(device, torch.float32, args.tiny)),
            "vae_decode": lambda: vae_decode(device, low, args.tiny)}
    for name, fn in plan.items():
        if args.only is None or name in args.only:
            fn()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_torch.json").write_text(json.dumps({"rows": ROWS, "datasheet": GPUS}, indent=1))
    print("\nsection        | what                                  | ms")
    for r in ROWS:
        if "ms" in r:
            what = " ".join(f"{k}={str(v).replace('torch.', '')}" for k, v in r.items()
                            if k in ("layout", "dtype", "batch", "S", "P", "tokens", "frames", "what"))
            extra = f" ({r['tflops']:.0f} TFLOP/s, {r['gbs']:.0f} GB/s)" if "gbs" in r and "tflops" in r else ""
            print(f"{r['section']:<14} | {what:<37} | {r['ms']:.3f}{extra}")
        elif r["section"] != "env":
            print(r["section"], {k: v for k, v in r.items() if k not in ("section", "trace")})


if __name__ == "__main__":
    main()
