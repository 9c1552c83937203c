"""The flan-T5 text encoder and upstream's caption templates (spec §13).

``TextTemplate`` turns captions into the strings upstream tokenises; ``T5TextEncoder``
tokenises them (padding and truncation to ``txt_size``) and runs the encoder stack in
float32 (never float16: T5 activations overflow it), returning
``last_hidden_state * attention_mask`` so padded rows are exactly zero.

The model and tokenizer come from a local Hugging Face directory (``config.json``,
weights, tokenizer files); nothing is downloaded (``local_files_only=True``).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from ..staging import sha256_file
from ..errors import CheckpointError, InputError, StarflowError

PathLike = Union[str, os.PathLike]

#: Files a Hugging Face tokenizer directory may hold (copied into an export and hashed).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model",
                   "added_tokens.json")


def _require_transformers():
    try:
        import transformers
    except ImportError as exc:
        raise StarflowError("the T5 text encoder needs transformers: pip install 'starflow-trt[media]'") from exc
    return transformers


@dataclass(frozen=True)
class TextTemplate:
    """Upstream's caption template options (spec §13), JSON-able via :meth:`to_dict`.

    ``fps_cond`` / ``cond_noise_level`` / ``mix_aspect`` are the config flags that switch each
    part on; ``noise_std`` gives the noise level ``int(noise_std * 1000)``; ``txt_size`` is the
    token count after padding/truncation.
    """

    fps_cond: bool = True
    cond_noise_level: bool = True
    noise_std: float = 0.5
    mix_aspect: bool = True
    txt_size: int = 256

    @classmethod
    def from_config(cls, cfg: Any) -> "TextTemplate":
        """From a :class:`~starflow_trt.config.ModelConfig` (its ``fps_cond``, ``cond_noise_level``, … fields)."""
        return cls(fps_cond=bool(cfg.fps_cond), cond_noise_level=bool(cfg.cond_noise_level),
                   noise_std=float(cfg.noise_std), mix_aspect=bool(cfg.mix_aspect), txt_size=int(cfg.txt_size))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TextTemplate":
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise InputError(f"unknown text template option(s) {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**dict(data))

    @property
    def noise_level(self) -> int:
        return int(self.noise_std * 1000)

    def apply(self, caption: str, fps: Optional[int] = None, aspect: Optional[str] = None) -> str:
        """One caption → the string upstream encodes.

        ``fps`` is the output fps (0: an image); ``aspect`` the ratio string (``"16:9"``).
        Each part applies only when its config flag is on and its value is given, in upstream's
        order: fps wrapper, then noise-level prefix, then aspect suffix.
        """
        if self.fps_cond and fps is not None:
            fps = int(fps)
            caption = f"A video with {fps} fps:\n{caption}\n" if fps > 0 else f"An image:\n{caption}\n"
        if self.cond_noise_level:
            caption = f"Noise Level {self.noise_level}:\n{caption}"
        if self.mix_aspect and aspect is not None:
            caption = f"{caption}\n in a {aspect} aspect ratio.\n"
        return caption

    def captions(self, prompts: Sequence[str], fps: Optional[int] = None, aspect: Optional[str] = None,
                 negative: Optional[Sequence[str]] = None) -> list[str]:
        """``[cond_0 … cond_{B-1}; uncond_0 … uncond_{B-1}]``: the CFG batch in upstream's order.

        The unconditional caption is the same template around ``""`` (or around
        ``negative[b]`` when negative prompts are given), never a zero embedding.
        """
        prompts = _as_list(prompts, "prompts")
        if negative is None:
            negative = [""] * len(prompts)
        negative = _as_list(negative, "negative prompts")
        if len(negative) != len(prompts):
            raise InputError(f"{len(negative)} negative prompt(s) for {len(prompts)} prompt(s); give one per prompt")
        return [self.apply(c, fps, aspect) for c in [*prompts, *negative]]


def _as_list(texts: Sequence[str], what: str) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise InputError(f"{what} must be a non-empty list of strings, got {texts!r}")
    return texts


def tokenizer_files(directory: PathLike) -> dict[str, str]:
    """``{file name: sha256}`` of the tokenizer files present in ``directory`` (for the manifest)."""
    directory = Path(directory)
    found = {name: sha256_file(directory / name) for name in TOKENIZER_FILES if (directory / name).is_file()}
    if "tokenizer.json" not in found and "spiece.model" not in found:
        raise CheckpointError(f"{directory} holds no tokenizer (tokenizer.json or spiece.model); "
                              "pass the Hugging Face T5 directory that has its tokenizer files")
    return found


def copy_tokenizer(src: PathLike, dst: PathLike) -> dict[str, str]:
    """Copy the tokenizer files of ``src`` into ``dst``; returns their ``{name: sha256}``."""
    hashes = tokenizer_files(src)
    Path(dst).mkdir(parents=True, exist_ok=True)
    for name in hashes:
        shutil.copyfile(Path(src) / name, Path(dst) / name)
    return hashes


def carry_tokenizer(manifest, dst_root: PathLike) -> None:
    """Copy the tokenizer folder that ``manifest``'s text_encoder graph records (an export made with
    ``--text-encoder DIR``) into the directory derived from it (calibrated graphs, engines): its prompts
    need the same files. Nothing to do for exports without one or with the toy's word table."""
    from ..export.names import TEXT_ENCODER

    spec = manifest.graphs.get(TEXT_ENCODER)
    folder = spec.extra.get("tokenizer_dir") if spec is not None else None
    if folder:
        copy_tokenizer(Path(manifest.root) / folder, Path(dst_root) / folder)


def load_tokenizer(directory: PathLike):
    """The Hugging Face tokenizer of a local directory (no download)."""
    transformers = _require_transformers()
    tokenizer_files(directory)
    return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)


def tokenize(tokenizer, texts: Sequence[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts → ``input_ids``, ``attention_mask`` [B, length] int64 (EOS appended, padded with the pad id, truncated)."""
    enc = tokenizer(_as_list(texts, "texts"), padding="max_length", max_length=int(length), truncation=True,
                    return_tensors="pt")
    return enc["input_ids"].to(torch.int64), enc["attention_mask"].to(torch.int64)


class TextEncoderGraph(nn.Module):
    """``text_encoder``: input_ids, attention_mask [B, L] int64 → text [B, L, D] float32.

    The mask is applied in-graph: rows where ``attention_mask`` is 0 are exactly zero.
    """

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden * attention_mask.unsqueeze(-1).to(hidden.dtype)


class T5TextEncoder:
    """Tokenizer + T5 encoder stack (float32, eval) + templates: prompts → ``y, y_uncond`` [B, L, D]."""

    def __init__(self, encoder: nn.Module, tokenizer, template: TextTemplate = TextTemplate()):
        self.encoder = encoder.float().eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.template = template

    @classmethod
    def from_pretrained(cls, directory: PathLike, template: TextTemplate = TextTemplate()) -> "T5TextEncoder":
        """Load ``T5EncoderModel`` (eager attention: SDPA does not export) and its tokenizer from a local directory."""
        transformers = _require_transformers()
        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise CheckpointError(f"{directory} is not a Hugging Face model directory (no config.json); "
                                  "pass the local flan-t5 directory (config, weights, tokenizer)")
        tokenizer = load_tokenizer(directory)
        try:
            model = transformers.T5EncoderModel.from_pretrained(
                str(directory), local_files_only=True, attn_implementation="eager", dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load a T5 encoder from {directory}: {exc}") from exc
        return cls(model, tokenizer, template)

    @property
    def dim(self) -> int:
        return int(self.encoder.config.d_model)

    @property
    def length(self) -> int:
        return self.template.txt_size

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Texts (already templated) → input_ids, attention_mask [B, txt_size] int64."""
        return tokenize(self.tokenizer, texts, self.length)

    def graph(self) -> TextEncoderGraph:
        return TextEncoderGraph(self.encoder)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Templated texts → [B, txt_size, D] float32, padded rows exactly zero."""
        ids, mask = self.tokenize(texts)
        return self.graph()(ids, mask)

    def encode(self, prompts: Sequence[str], fps: Optional[int] = None, aspect: Optional[str] = None,
               negative: Optional[Sequence[str]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts → (y, y_uncond), each [B, txt_size, D]; encoded as one batch [cond; uncond] like upstream."""
        texts = self.template.captions(prompts, fps, aspect, negative)
        out = self.encode_texts(texts)
        b = len(texts) // 2
        return out[:b], out[b:]
