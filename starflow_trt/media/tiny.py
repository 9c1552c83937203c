"""Tiny random stand-ins for flan-T5 and the Wan2.2 VAE, made on the fly (tests, demos, sizing).

Same structure as the real models, small widths: a T5 encoder with a sentencepiece
tokenizer trained on a few sentences, saved as a local Hugging Face directory; an
``AutoencoderKLWan`` with Wan2.2's structure flags. Nothing is downloaded.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from .vae_load import WAN22_VAE_CONFIG

PathLike = Union[str, os.PathLike]

SENTENCES = (
    "a red square moving right", "a blue circle moving left", "a green triangle moving up",
    "A video with 16 fps:", "An image:", "Noise Level 500:", "in a 16:9 aspect ratio.",
    "a cat sitting on a mat", "the quick brown fox jumps over the lazy dog",
)

#: flan-t5-xl's encoder dims (random weights of this size: ~1.22 B parameters).
FLAN_T5_XL = dict(vocab_size=32128, d_model=2048, d_kv=64, num_heads=32, d_ff=5120, num_layers=24,
                  feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                  relative_attention_max_distance=128, tie_word_embeddings=False)


def train_tokenizer(sentences: Sequence[str] = SENTENCES, vocab_size: int = 64):
    """A T5 tokenizer (pad 0, EOS 1, unk 2, like flan-T5's) from a unigram sentencepiece model trained here."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(sentences) * 8), model_writer=model, vocab_size=vocab_size, pad_id=0,
        eos_id=1, unk_id=2, bos_id=-1, model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
        minloglevel=2)
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def make_t5_dir(directory: PathLike, seed: int = 0, tokenizer=None, **config: Any) -> Path:
    """Save a random ``T5EncoderModel`` (tiny unless ``config`` says otherwise) + tokenizer into ``directory``."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = tokenizer if tokenizer is not None else train_tokenizer()
    dims = dict(vocab_size=len(tokenizer), d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                feed_forward_proj="gated-gelu")
    dims.update(config)
    torch.manual_seed(seed)
    model = T5EncoderModel(T5Config(**dims))
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_vae(seed: int = 0, base_dim: int = 8, decoder_base_dim: int = 12, z_dim: int = 4,
             num_res_blocks: int = 2, noise: float = 0.05, stats: Optional[tuple[list, list]] = None):
    """A random ``AutoencoderKLWan`` with Wan2.2's structure (residual, patch 2, 16×/4×) and small widths.

    Weights get ``noise``-scaled Gaussian perturbations so no layer stays at its (often
    zero/identity) init; latent statistics are random unless ``stats`` = (mean, std).
    """
    from diffusers import AutoencoderKLWan

    g = torch.Generator().manual_seed(seed)
    if stats is None:
        stats = ((torch.randn(z_dim, generator=g) * 0.2).tolist(), (0.5 + torch.rand(z_dim, generator=g)).tolist())
    cfg = dict(WAN22_VAE_CONFIG)
    cfg.update(base_dim=base_dim, decoder_base_dim=decoder_base_dim, z_dim=z_dim, num_res_blocks=num_res_blocks,
               latents_mean=list(stats[0]), latents_std=list(stats[1]))
    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**cfg).float().eval().requires_grad_(False)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn(p.shape, generator=g) * noise)
    return vae
