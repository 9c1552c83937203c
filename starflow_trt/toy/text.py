"""A tiny deterministic text encoder for the toy prompts: word → fixed random vector.

``encode(prompts)`` gives ``y [B, L, D]``: one row per word, padded rows exactly
zero (as upstream's T5 output times the attention mask), so the empty prompt
``""`` encodes to all zeros: the unconditional embedding for guidance. The table
and vocabulary are stored in one safetensors file beside the checkpoint (the
vocabulary as UTF-8 bytes of the newline-joined words, ``length`` as a 1-element tensor).

There is no explicit ``<pad>`` token: padding is implicit (zero rows), so the vocabulary is
exactly the 12 prompt words and a prompt of ``length`` words or fewer never needs one.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch

from .data import COLOURS, DIRECTIONS, SHAPES

VOCAB = ["a", "moving", *COLOURS, *SHAPES, *DIRECTIONS]


class ToyTextEncoder:
    """Lower-case words → rows of ``table`` [V, D]; sequences padded to ``length`` with zeros."""

    def __init__(self, table: torch.Tensor, vocab: Sequence[str], length: int):
        if table.dim() != 2 or table.shape[0] != len(vocab):
            raise ValueError(f"table must be [V={len(vocab)}, D], got {tuple(table.shape)}")
        self.table = table.float()
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.length = int(length)

    @property
    def dim(self) -> int:
        return self.table.shape[1]

    @classmethod
    def create(cls, seed: int = 0, dim: int = 16, length: int = 6) -> "ToyTextEncoder":
        """A fixed random table (rows of norm √D, like unit-variance features) from ``seed``."""
        g = torch.Generator().manual_seed(seed)
        table = torch.randn(len(VOCAB), dim, generator=g)
        table = table / table.norm(dim=1, keepdim=True) * dim ** 0.5
        return cls(table, VOCAB, length)

    def tokens(self, prompt: str) -> list[int]:
        words = prompt.lower().split()
        unknown = [w for w in words if w not in self.index]
        if unknown:
            raise ValueError(f"unknown word(s) {unknown} in prompt {prompt!r}; the toy vocabulary is {self.vocab}")
        if len(words) > self.length:
            raise ValueError(f"prompt {prompt!r} has {len(words)} words, the encoder takes at most {self.length}")
        return [self.index[w] for w in words]

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """[B, L, D] float32; rows past the prompt's words are zero."""
        out = torch.zeros(len(prompts), self.length, self.dim)
        for b, prompt in enumerate(prompts):
            ids = self.tokens(prompt)
            if ids:
                out[b, : len(ids)] = self.table[ids]
        return out

    def to_tensors(self) -> dict[str, torch.Tensor]:
        vocab = torch.tensor(list("\n".join(self.vocab).encode("utf-8")), dtype=torch.uint8)
        return {"table": self.table.contiguous(), "vocab": vocab, "length": torch.tensor([self.length])}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "ToyTextEncoder":
        missing = [k for k in ("table", "vocab", "length") if k not in tensors]
        if missing:
            raise ValueError(f"not a toy text encoder: missing tensor(s) {missing}, have {sorted(tensors)}")
        vocab = bytes(tensors["vocab"].tolist()).decode("utf-8").split("\n")
        return cls(tensors["table"], vocab, int(tensors["length"][0]))

    def save(self, path: str | os.PathLike) -> None:
        from ..checkpoint import save_state_dict

        save_state_dict(self.to_tensors(), path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ToyTextEncoder":
        from safetensors.torch import load_file

        return cls.from_tensors(dict(load_file(str(path))))
