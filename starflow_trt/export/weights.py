"""Weights of one graph taken from a (memory-mapped) state dict, without building the whole model."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..config import ModelConfig
from ..reference.denoiser import Denoiser
from ..reference.flow import FlowBlock
from ..reference.model import deprecated_buffer_values


class BlockLoader:
    """Builds one block (or the denoiser, or any module) with only its tensors taken from the state dict."""

    def __init__(self, cfg: ModelConfig, state: dict[str, torch.Tensor]):
        self.cfg = cfg
        self.state = state
        self.defaults = deprecated_buffer_values(cfg)

    def __call__(self, prefix: str) -> nn.Module:
        """``blocks.{k}.`` → FlowBlock k, ``learnable_self_denoiser.`` → Denoiser."""
        if prefix.startswith("learnable_self_denoiser"):
            return self.denoiser()
        return self.block(int(prefix.split(".")[1]))

    def block(self, k: int) -> FlowBlock:
        return self.load(lambda: FlowBlock(self.cfg, k), f"blocks.{k}.")

    def denoiser(self) -> Denoiser:
        return self.load(lambda: Denoiser(self.cfg), "learnable_self_denoiser.")

    def load(self, factory: Callable[[], nn.Module], prefix: str) -> nn.Module:
        """``factory()`` built on the meta device, then given the float32 tensors under ``prefix`` (strict)."""
        with torch.device("meta"):
            module = factory()
        sub = {k[len(prefix):]: v for k, v in self.state.items() if k.startswith(prefix)}
        for k, v in self.defaults.items():
            if k.startswith(prefix):
                sub.setdefault(k[len(prefix):], v)
        sub = {k: v.float() for k, v in sub.items()}
        module.load_state_dict(sub, strict=True, assign=True)
        return module.eval().requires_grad_(False)

    def tensor(self, name: str) -> torch.Tensor:
        """One state-dict tensor as float32 (KeyError names it when absent)."""
        return self.state[name].float()
