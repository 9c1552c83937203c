"""Clean-room PyTorch STARFlow-V (the numerical reference every other stage is checked against).

    from starflow_trt.reference import load_reference, JacobiConfig
    model = load_reference(config_path, checkpoint_path, dtype=torch.float32)
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch

from ..config import ModelConfig, load_config
from ..sampling import KVCache
from .flow import FlowBlock, guide, patchify, unpatchify
from .model import StarflowV, deprecated_buffer_values
from .sampler import JacobiConfig

__all__ = ["load_reference", "build_model", "JacobiConfig", "StarflowV", "FlowBlock", "KVCache",
           "guide", "patchify", "unpatchify", "infer_text_width"]

PathLike = Union[str, os.PathLike]


def infer_text_width(cfg: ModelConfig, state_dict: dict[str, torch.Tensor]) -> ModelConfig:
    """Fill ``txt_dim`` from the top block's ``proj_txt`` weight when the config does not give it."""
    if cfg.text_width is not None or cfg.txt_size <= 0:
        return cfg
    key = f"blocks.{cfg.top_index}.proj_txt.weight"
    if key in state_dict:
        return cfg.replace(txt_dim=int(state_dict[key].shape[1]))
    return cfg


def build_model(cfg: ModelConfig, device: Union[str, torch.device] = "cpu",
                dtype: torch.dtype = torch.float32) -> StarflowV:
    """Model with initial weights (``device="meta"`` allocates nothing: shapes / counts only)."""
    with torch.device(device):
        model = StarflowV(cfg)
    return model.to(dtype=dtype).eval()


def load_reference(config_path: Union[PathLike, ModelConfig], checkpoint_path: Optional[PathLike] = None,
                   dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu") -> StarflowV:
    """Config + upstream state_dict → eval-mode :class:`StarflowV` in ``dtype`` (float32 / float64).

    The checkpoint is validated against the config first: every missing, unexpected or
    mis-shaped key is reported in one :class:`~starflow_trt.errors.CheckpointError`.
    Without a checkpoint the model keeps its initial weights (upstream initialisation is
    not reproduced; use it for shapes and graph structure only).
    """
    from ..checkpoint import load_state_dict, strip_wrapper_prefixes, validate_state_dict

    cfg = config_path if isinstance(config_path, ModelConfig) else load_config(config_path)
    if checkpoint_path is None:
        return build_model(cfg, device, dtype)
    state = load_state_dict(checkpoint_path)
    state, _notes = strip_wrapper_prefixes(state)
    cfg = infer_text_width(cfg, state)
    model = build_model(cfg, "meta", dtype)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    validate_state_dict(state, expected)
    full = deprecated_buffer_values(cfg)
    full.update(state)
    full = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in full.items()}
    model.load_state_dict(full, strict=True, assign=True)
    model.last_trace = []
    return model.eval().requires_grad_(False)
