"""Graph and tensor names of the manifest contract, defined once.

Export writes them into the ONNX graphs and the manifest; the runtime, calibration and
benchmarks bind tensors by these names (``inputs[names.TOKENS] = …``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..geometry import Geometry

# ------------------------------------------------------------------ graphs
DEEP_PREFILL = "deep_prefill"
DEEP_STEP = "deep_step"
DENOISER = "denoiser"


def shallow_step_graph(block: int) -> str:
    """Step graph of shallow block ``block``."""
    return f"shallow_step_{block}"


def step_graph(block: int, geo: Geometry) -> str:
    """The step graph of block ``block``: ``deep_step`` (top) or ``shallow_step_{k}``."""
    return DEEP_STEP if block == geo.top_index else shallow_step_graph(block)


def forward_graph(block: int) -> str:
    """Forward (scoring) graph of block ``block``."""
    return f"forward_{block}"


# ------------------------------------------------------------------ tensors
TOKENS = "tokens"        # step input [batch, S, c]
TEXT = "text"            # text embeddings [batch, L, D]
X = "x"                  # block / denoiser input [batch, T, h, w, c]
ROPE_COS = "rope_cos"    # RoPE rows [rows, head_dim] of the slots written
ROPE_SIN = "rope_sin"
SCALE = "scale"          # step outputs [batch, S, c] (a after softplus, b)
SHIFT = "shift"
Z = "z"                  # forward outputs
LOGDET = "logdet"
D = "d"                  # denoiser output
PAST = "past"            # KV inputs past_k_l / past_v_l [P, batch, heads, head_dim]
NEW = "new"              # KV outputs new_k_l / new_v_l [S, batch, heads, head_dim]
ROPE_INPUTS = (ROPE_COS, ROPE_SIN)
SOS = "sos"              # manifest extra of step graphs: the block's start-of-sequence vector [c]


def kv_names(layers: int, prefix: str) -> list[str]:
    """Graph tensor names of a per-layer KV list: ``{prefix}_k_0, {prefix}_v_0, {prefix}_k_1, …``."""
    return [f"{prefix}_{kind}_{l}" for l in range(layers) for kind in ("k", "v")]

# ------------------------------------------------------------- media graphs
TEXT_ENCODER = "text_encoder"            # input_ids, attention_mask [batch, tokens] -> text [batch, tokens, D]
VAE_DECODE_FIRST = "vae_decode_first"    # latents [batch, 1, z, h, w] -> frames [batch, 1, 3, H, W], new_cache_i
VAE_DECODE_STEP = "vae_decode_step"      # latents [batch, 1, z, h, w], cache_i -> frames [batch, 4, 3, H, W], new_cache_i
VAE_ENCODE = "vae_encode"                # frames [batch, 1, 3, H, W] -> latent_mean, latent_logvar [batch, 1, z, h, w]
VAE_ENCODE_FIRST = "vae_encode_first"    # video: frames [batch, 1, 3, H, W] -> latent_mean/logvar, new_cache_i
VAE_ENCODE_STEP = "vae_encode_step"      # frames [batch, 4, 3, H, W], cache_i -> latent_mean/logvar [batch, 1, ...], new_cache_i
#: the VAE graphs; each is its own graph kind, of the same name
VAE_GRAPHS = (VAE_DECODE_FIRST, VAE_DECODE_STEP, VAE_ENCODE, VAE_ENCODE_FIRST, VAE_ENCODE_STEP)
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
LATENTS = "latents"                      # raw VAE latents (normalisation stays outside the graphs, fp32)
FRAMES = "frames"                        # pixels in [-1, 1], [batch, F, 3, H, W]
LATENT_MEAN = "latent_mean"              # not "mean": the exporter names an internal value so
LATENT_LOGVAR = "latent_logvar"
TOKENIZER_DIR = "tokenizer"              # the tokenizer files' folder inside an export
