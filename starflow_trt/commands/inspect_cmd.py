"""``starflow-trt inspect CONFIG [CHECKPOINT]``: model layout, sizes and costs (meta tensors only)."""

from __future__ import annotations

from typing import Optional

import click

from ..config import ModelConfig, applied_defaults, load_config
from ..costs import block_params, denoiser_params, generation_costs, kv_bytes_per_frame
from ..geometry import frame_geometry
from ..model_constants import DENOISER_LAYERS
from . import options


def _fmt(n: float) -> str:
    for unit, div in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def inspect_report(cfg: ModelConfig, aspect: str = "16:9", frames: Optional[int] = None) -> dict:
    """Everything ``inspect`` prints, as a dict (meta device: nothing allocated)."""
    geo = frame_geometry(cfg, aspect)
    T = frames or cfg.latent_frames
    F = geo["tokens_per_frame"]
    blocks = []
    for k in range(cfg.num_blocks):
        blocks.append({"index": k, "role": "deep" if k == cfg.top_index else "shallow",
                       "layers": cfg.layers[k], "width": cfg.block_width(k), "heads": cfg.block_heads(k),
                       "permutation": cfg.block_permutation(k), "text": cfg.block_has_text(k),
                       "params": block_params(cfg, k)})
    den = denoiser_params(cfg)
    costs = generation_costs(cfg, T, F, batch=1, guidance=True, chunk=1)
    return {
        "blocks": blocks,
        "denoiser": {"layers": DENOISER_LAYERS if den else 0, "width": cfg.channels, "heads": cfg.denoiser_heads,
                     "params": den},
        "params_flow": sum(b["params"] for b in blocks), "params_total": sum(b["params"] for b in blocks) + den,
        "token_channels": cfg.token_channels, "patch_size": cfg.patch_size, "text": [cfg.txt_size, cfg.text_width],
        "frame": geo, "latent_frames": T, "video_frames": cfg.video_frames,
        "kv_bytes_per_frame_fp16": {"guidance": kv_bytes_per_frame(cfg, F, True),
                                    "no_guidance": kv_bytes_per_frame(cfg, F, False)},
        "flops_per_latent_frame": {k: v.flops / T for k, v in costs.items()},
        "unknown_keys": list(cfg.unknown_keys), "training_keys": list(cfg.training_keys),
        "defaults_applied": applied_defaults(cfg),
    }


@click.command("inspect")
@click.argument("config", type=click.Path(exists=True, dir_okay=False))
@click.argument("checkpoint", required=False, type=click.Path(exists=True, dir_okay=False))
@click.option("--aspect", default="16:9", show_default=True, callback=options.aspect, help="frame aspect for VAE configs")
@click.option("--frames", type=options.POSITIVE_INT, default=None, help="latent frames (default: the config's vid_size)")
@click.option("--text-encoder", "text_encoder", default=None, callback=options.text_encoder_dir,
              help="local Hugging Face T5 folder: txt_dim is its hidden size (as export takes it)")
def inspect_command(config: str, checkpoint: Optional[str], aspect: str, frames: Optional[int],
                    text_encoder: Optional[str]) -> None:
    """Blocks, parameters, geometry, KV-cache size and FLOPs of CONFIG; validates CHECKPOINT if given.

    Keys absent from CONFIG take upstream's defaults (listed on one line); txt_dim, which upstream
    takes from its text encoder, comes from --text-encoder, else CHECKPOINT, else the named encoder."""
    cfg = load_config(config)  # validated: sizes, ranges and combinations, one error naming the fields
    notes: list[str] = []
    if checkpoint:
        from ..reference import load_weights

        cfg, _, notes = load_weights(cfg, checkpoint, text_encoder)
    elif text_encoder:
        from ..reference import infer_text_width

        cfg = infer_text_width(cfg, None, text_encoder)
    r = inspect_report(cfg, aspect, frames)
    echo = click.echo
    echo(f"config: {config}")
    echo(f"{'block':>5} {'role':8} {'layers':>6} {'width':>6} {'heads':>5} {'perm':18} {'text':5} {'params':>15}")
    for b in r["blocks"]:
        echo(f"{b['index']:>5} {b['role']:8} {b['layers']:>6} {b['width']:>6} {b['heads']:>5} {b['permutation']:18} "
             f"{str(b['text']):5} {b['params']:>15,}")
    d = r["denoiser"]
    echo(f"{'den':>5} {'denoiser':8} {d['layers']:>6} {d['width']:>6} {d['heads']:>5} {'-':18} {'True':5} {d['params']:>15,}")
    echo(f"parameters: flow {r['params_flow']:,}  total (with denoiser) {r['params_total']:,}")
    f = r["frame"]
    echo(f"tokens: {r['token_channels']} channels/token (patch {r['patch_size']}), frame {f['H']}x{f['W']} -> "
         f"grid {f['h']}x{f['w']} = {f['tokens_per_frame']} tokens/frame, {r['latent_frames']} latent frames"
         + (f" ({r['video_frames']} video frames)" if r["video_frames"] else "")
         + f", text {r['text'][0]} x {r['text'][1]}")
    kv = r["kv_bytes_per_frame_fp16"]
    echo(f"deep KV cache per latent frame (fp16): {_fmt(kv['no_guidance'])}B, with guidance {_fmt(kv['guidance'])}B")
    fl = r["flops_per_latent_frame"]
    echo("FLOPs per generated latent frame (one sweep, guidance on): " +
         ", ".join(f"{k} {_fmt(v)}" for k, v in fl.items()))
    if r["defaults_applied"]:
        echo(f"upstream defaults applied (absent from the YAML): {', '.join(r['defaults_applied'])}")
    if r["training_keys"]:
        echo(f"ignored training-only keys: {', '.join(r['training_keys'])}")
    if r["unknown_keys"]:
        echo(f"kept unknown config keys: {', '.join(r['unknown_keys'])}")
    if checkpoint:
        for note in notes:
            echo(f"note: {note}")
        echo(f"checkpoint {checkpoint}: OK (all keys and shapes match)")
