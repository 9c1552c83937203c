"""Latent glue around the VAE (spec §14, §11), as upstream's sampling code does it.

Encoding gives raw ``mean, logvar`` [B, T, z, h, w]; ``mean`` is normalised per channel,
``(mean - m) * (1 / s)``; a stochastic draw adds ``exp(0.5 * clamp(logvar, -30, 20)) * eps``
(``logvar`` is *not* normalised: upstream's quirk, kept); latent frames ``1:`` are multiplied
by the temporal scale (0.6). Decoding undoes the scale, then ``z / (1 / s) + m``
(:class:`LatentNorm`). :func:`context_latents`: the image-to-video context (spec §11).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from ..errors import InputError
from .vae_load import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD

LOGVAR_RANGE = (-30.0, 20.0)


@dataclass(frozen=True)
class LatentNorm:
    """Per-channel ``mean`` / ``std`` and the temporal scale of latent frames ``1:`` (JSON-able)."""

    mean: tuple[float, ...] = WAN22_LATENTS_MEAN
    std: tuple[float, ...] = WAN22_LATENTS_STD
    temporal_scale: float = 1.0

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise InputError(f"latent mean/std must have the same non-zero length, got {len(self.mean)} / "
                             f"{len(self.std)}")
        if not self.temporal_scale > 0:
            raise InputError(f"temporal scale must be > 0, got {self.temporal_scale}")

    @classmethod
    def from_vae(cls, vae, temporal_scale: Optional[float] = None) -> "LatentNorm":
        """From an ``AutoencoderKLWan`` config; ``temporal_scale`` from the model config's ``vae`` field (``:0.6``)."""
        return cls(tuple(float(v) for v in vae.config.latents_mean), tuple(float(v) for v in vae.config.latents_std),
                   1.0 if temporal_scale is None else float(temporal_scale))

    def to_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "temporal_scale": self.temporal_scale}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LatentNorm":
        return cls(tuple(data["mean"]), tuple(data["std"]), float(data["temporal_scale"]))

    @property
    def channels(self) -> int:
        return len(self.mean)

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if z.dim() != 5 or z.shape[2] != self.channels:
            raise InputError(f"latents must be [B, T, {self.channels}, h, w], got {tuple(z.shape)}")
        mean = torch.tensor(self.mean, dtype=torch.float32, device=z.device).view(1, 1, -1, 1, 1)
        inv_std = 1.0 / torch.tensor(self.std, dtype=torch.float32, device=z.device).view(1, 1, -1, 1, 1)
        return mean, inv_std

    def _time_factor(self, z: torch.Tensor, start: int) -> torch.Tensor:
        """[1, T, 1, 1, 1]: 1 for global latent frame 0, ``temporal_scale`` for the others."""
        index = torch.arange(start, start + z.shape[1], device=z.device)
        one = torch.ones((), dtype=torch.float32, device=z.device)
        return torch.where(index >= 1, one * self.temporal_scale, one).view(1, -1, 1, 1, 1)

    def normalize_mean(self, mean: torch.Tensor) -> torch.Tensor:
        """Raw VAE mean [B, T, z, h, w] → ``(mean - m) * (1 / s)`` (float32)."""
        m, inv_std = self._stats(mean)
        return (mean.float() - m) * inv_std

    def scale_time(self, z: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Multiply latent frames with global index ≥ 1 by the temporal scale (``start``: index of ``z[:, 0]``)."""
        return z if self.temporal_scale == 1.0 else z * self._time_factor(z, start)

    def unscale_time(self, z: torch.Tensor, start: int = 0) -> torch.Tensor:
        return z if self.temporal_scale == 1.0 else z / self._time_factor(z, start)

    def to_vae(self, z: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Model latents [B, T, z, h, w] → raw VAE latents for the decoder (undo scale, then ``z / (1/s) + m``)."""
        m, inv_std = self._stats(z)
        return self.unscale_time(z.float(), start) / inv_std + m

    def latents_from_moments(self, mean: torch.Tensor, logvar: torch.Tensor, *, sample: bool = True,
                         generator: Optional[torch.Generator] = None, start: int = 0) -> torch.Tensor:
        """Encoder ``mean, logvar`` [B, T, z, h, w] → model latents (normalised, drawn, time-scaled).

        ``sample=False`` returns the normalised mean (scaled); ``sample=True`` adds
        ``exp(0.5 * clamp(logvar, -30, 20)) * eps`` with ``eps ~ N(0, 1)`` drawn from ``generator``.
        """
        z = self.normalize_mean(mean)
        if sample:
            z = draw_latents(z, logvar, generator)
        return self.scale_time(z, start)


def draw_latents(mean: torch.Tensor, logvar: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``mean + exp(0.5 * clamp(logvar, -30, 20)) * eps`` (eps from ``generator``, same shape as ``mean``)."""
    if mean.shape != logvar.shape:
        raise InputError(f"mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} must have the same shape")
    std = torch.exp(0.5 * logvar.float().clamp(*LOGVAR_RANGE))
    eps = torch.randn(std.shape, generator=generator, dtype=std.dtype, device="cpu").to(std.device)
    return mean.float() + std * eps


def add_noise(z: torch.Tensor, noise_std: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``z + noise_std * randn`` (the training noise the flow models; spec §11, §14)."""
    eps = torch.randn(z.shape, generator=generator, dtype=torch.float32, device="cpu").to(z.device)
    return z.float() + noise_std * eps


def context_latents(mean: torch.Tensor, logvar: torch.Tensor, norm: LatentNorm, noise_std: float,
                    generator: Optional[torch.Generator] = None, sample: bool = True) -> torch.Tensor:
    """Image-to-video context (spec §11): encoder moments [B, 1, z, h, w] → drawn, normalised, noised latents.

    Draws in upstream's order from one generator: the VAE sample's ``eps``, then the
    ``noise_std`` noise. ``sample=False`` uses the mean (still noised).
    """
    return add_noise(norm.latents_from_moments(mean, logvar, sample=sample, generator=generator), noise_std,
                     generator)
