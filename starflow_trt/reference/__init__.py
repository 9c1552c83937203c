"""Clean-room PyTorch STARFlow-V (the numerical reference every other stage is checked against).

    from starflow_trt.reference import load_reference, JacobiConfig
    model = load_reference(config_path, checkpoint_path, dtype=torch.float32)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch

from ..checkpoint import load_checkpoint
from ..config import ModelConfig, load_config
from ..errors import ConfigError
from ..sampling import KVCache
from .flow import FlowBlock, guide, patchify, unpatchify
from .model import StarflowV, deprecated_buffer_values
from .sampler import JacobiConfig

__all__ = ["load_reference", "build_model", "JacobiConfig", "StarflowV", "FlowBlock", "KVCache",
           "guide", "patchify", "unpatchify", "infer_text_width", "text_encoder_width", "parameter_shapes",
           "load_weights"]

PathLike = Union[str, os.PathLike]


def infer_text_width(cfg: ModelConfig, state_dict: Optional[dict[str, torch.Tensor]] = None,
                     text_encoder: Optional[PathLike] = None) -> ModelConfig:
    """Fill a ``txt_dim`` the YAML does not state, as upstream does from its text encoder: the hidden size
    (``d_model``) of the ``text_encoder`` directory when given, else the width the checkpoint's top-block
    ``proj_txt.weight`` [width, txt_dim] takes, else (:attr:`ModelConfig.text_width`) the named encoder's.

    A directory whose width differs from the checkpoint's is refused (one line naming both)."""
    if cfg.txt_dim is not None or cfg.txt_size <= 0:
        return cfg
    key = f"blocks.{cfg.top_index}.proj_txt.weight"
    shape = tuple(state_dict[key].shape) if state_dict is not None and key in state_dict else None
    width = text_encoder_width(text_encoder) if text_encoder is not None else None
    if width is not None:
        if shape is not None and len(shape) == 2 and shape[1] != width:
            raise ConfigError(f"text encoder {os.fspath(text_encoder)} has hidden size {width} but the checkpoint's "
                              f"{key} takes {shape[1]}-wide text; pass the encoder the checkpoint was trained with")
        return cfg.with_text_width(width, f"--text-encoder {os.fspath(text_encoder)} (d_model)")
    if shape is not None and len(shape) == 2:
        return cfg.with_text_width(shape[1], f"the checkpoint's {key}")
    return cfg


def text_encoder_width(directory: PathLike) -> Optional[int]:
    """Hidden size (``d_model``) in a Hugging Face T5 directory's config.json; None for anything else
    (the toy's word table is a file, its width is checked when it is loaded)."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        return None
    try:
        width = json.loads(path.read_text(encoding="utf-8")).get("d_model")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise ConfigError(f"cannot read the text encoder's {path} ({exc}); pass the folder save_pretrained wrote") from exc
    return width if isinstance(width, int) and width >= 1 else None


def build_model(cfg: ModelConfig, device: Union[str, torch.device] = "cpu",
                dtype: torch.dtype = torch.float32) -> StarflowV:
    """Model with initial weights (``device="meta"`` allocates nothing: shapes / counts only)."""
    with torch.device(device):
        model = StarflowV(cfg)
    return model.to(dtype=dtype).eval()


def parameter_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{key: shape} of the state_dict the model of ``cfg`` takes (meta tensors: nothing allocated)."""
    return {k: tuple(v.shape) for k, v in build_model(cfg, "meta").state_dict().items()}


def load_weights(cfg: ModelConfig, checkpoint: PathLike, text_encoder: Optional[PathLike] = None
                 ) -> tuple[ModelConfig, dict[str, torch.Tensor], list[str]]:
    """``cfg`` completed by the checkpoint (its ``txt_dim``, :func:`infer_text_width`), the checkpoint's
    state_dict checked against that config's model (:func:`~starflow_trt.checkpoint.load_checkpoint`: one
    :class:`~starflow_trt.errors.CheckpointError` naming every missing, unexpected or mis-shaped key),
    and notes on the wrapper prefixes stripped."""
    def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
        return parameter_shapes(infer_text_width(cfg, state, text_encoder))

    state, notes = load_checkpoint(checkpoint, shapes)
    return infer_text_width(cfg, state, text_encoder), state, notes


def load_reference(config_path: Union[PathLike, ModelConfig], checkpoint_path: Optional[PathLike] = None,
                   dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu") -> StarflowV:
    """Config + upstream state_dict → eval-mode :class:`StarflowV` in ``dtype`` (float32 / float64).

    The checkpoint is validated against the config first: every missing, unexpected or
    mis-shaped key is reported in one :class:`~starflow_trt.errors.CheckpointError`.
    Without a checkpoint the model keeps its initial weights (upstream initialisation is
    not reproduced; use it for shapes and graph structure only).
    """
    cfg = config_path if isinstance(config_path, ModelConfig) else load_config(config_path)
    if checkpoint_path is None:
        return build_model(cfg, device, dtype)
    cfg, state, _notes = load_weights(cfg, checkpoint_path)
    model = build_model(cfg, "meta", dtype)
    full = deprecated_buffer_values(cfg)
    full.update(state)
    full = {k: v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device) for k, v in full.items()}
    model.load_state_dict(full, strict=True, assign=True)
    model.last_trace = []
    return model.eval().requires_grad_(False)
