"""Calibration inputs for exports of the bundled toy: its prompts and held-out clips.

Calibration itself knows nothing about the toy; the commands (``calibrate``, ``demo``, ``bench``)
ask here whether a directory was exported from the bundled checkpoint.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..export.manifest import Manifest

HELD_OUT_CLIPS = 64


def toy_prompts(samples: int) -> list[str]:
    """``samples`` of the toy's training prompts, spread over colours, shapes and directions."""
    from . import PROMPTS

    return [PROMPTS[(7 * i) % len(PROMPTS)] for i in range(samples)]


def toy_calibration_set(manifest: Manifest, samples: int
                        ) -> Optional[tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]:
    """(text [N, L, D], uncond [N, L, D], eval clips (x [64, T, C, H, W], y)) when ``manifest`` was exported
    from the bundled toy checkpoint; None otherwise."""
    from ..staging import sha256_file
    from . import load_bundled
    from .train import held_out_set

    toy = load_bundled()
    if sha256_file(toy.checkpoint_path) != manifest.checkpoint.get("sha256"):
        return None
    prompts = toy_prompts(samples)
    clips, held_prompts = held_out_set(HELD_OUT_CLIPS, manifest.geometry.max_frames)
    noisy = clips + manifest.geometry.noise_std * torch.randn(clips.shape, generator=torch.Generator().manual_seed(12345))
    return toy.encode(prompts), toy.encode([""] * samples), (noisy, toy.encode(held_prompts))
