"""Bundled toy STARFlow-V (trained here, pixel space) and its procedural data.

    from starflow_trt.toy import load_bundled, render_clip, PROMPTS
    toy = load_bundled()            # .config_path, .checkpoint_path, .encode(prompts) -> y [B, L, D]
    clip = render_clip(prompt, seed)   # [T, 3, H, W] float in [-1, 1]

Viewing helpers (a labelled grid video, contact sheets) live in :mod:`starflow_trt.runtime.video_io`.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch

from .data import DEMO_PROMPTS, PROMPTS, detect_colour, detect_direction, make_dataset, parse_prompt, render_clip, score_clips
from .text import ToyTextEncoder

__all__ = ["load_bundled", "BundledToy", "render_clip", "make_dataset", "PROMPTS", "ToyTextEncoder",
           "score_clips", "detect_colour", "detect_direction", "parse_prompt", "ASSETS", "DEMO_PROMPTS"]

ASSETS = Path(str(resources.files(__package__) / "assets"))


@dataclass
class BundledToy:
    """Paths of the bundled checkpoint (upstream layout) and its text encoder."""

    config_path: Path
    checkpoint_path: Path
    encoder: ToyTextEncoder
    summary_path: Path

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Prompts → y [B, L, D]; ``[""]`` gives the empty-prompt embedding used for guidance."""
        return self.encoder.encode(list(prompts))

    @property
    def text_encoder_path(self) -> Path:
        """The word-table encoder file (``export --text-encoder`` takes it: the toy's ``text_encoder`` graph)."""
        return self.checkpoint_path.parent / "text_encoder.safetensors"

    @property
    def frames(self) -> int:
        from ..config import load_config

        return load_config(self.config_path).latent_frames


def load_bundled() -> BundledToy:
    """The toy model shipped inside the package (no download)."""
    from ..errors import StarflowError

    needed = ["config.yaml", "model.pth", "text_encoder.safetensors"]
    missing = [n for n in needed if not (ASSETS / n).exists()]
    if missing:
        raise StarflowError(f"bundled toy model incomplete in {ASSETS} (missing {', '.join(missing)}); "
                            "reinstall starflow-trt or retrain with python -m starflow_trt.toy.train")
    return BundledToy(ASSETS / "config.yaml", ASSETS / "model.pth",
                      ToyTextEncoder.load(ASSETS / "text_encoder.safetensors"), ASSETS / "summary.json")
