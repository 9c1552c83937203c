"""The Wan2.2 VAE (diffusers ``AutoencoderKLWan``): loading, latent normalisation, streaming graphs.

Loading (:func:`load_vae`): upstream's ``Wan2.2_VAE.pth`` (Wan's own key layout, renamed here
by :func:`convert_upstream_state_dict`; model dims inferred from the tensors) or a diffusers
directory (``config.json`` + weights, or a pipeline directory with a ``vae/`` subfolder).

Latent glue (spec §14, :class:`LatentNorm`), as upstream's sampling code does it:
encoding gives raw ``mean, logvar`` [B, T, z, h, w]; ``mean`` is normalised per channel,
``(mean - m) * (1 / s)``; a stochastic draw adds ``exp(0.5 * clamp(logvar, -30, 20)) * eps``
(``logvar`` is *not* normalised: upstream's quirk, kept); latent frames ``1:`` are multiplied
by the temporal scale (0.6). Decoding undoes the scale, then ``z / (1 / s) + m``.

Decoding is causal, one latent frame at a time, each causal 3-D conv keeping the last 2
frames of its input as a cache; the first latent frame is special (it decodes to one frame,
later ones to four). :class:`VaeDecodeFirst` / :class:`VaeDecodeStep` make those caches explicit
graph inputs/outputs with fixed shapes (:class:`CachePlan`); the same for the encoder
(:class:`VaeEncodeFirst` one frame, :class:`VaeEncodeStep` ``4k`` frames). Neither clamps:
upstream clamps only when writing video (:func:`starflow_trt.media.io.frames_to_uint8`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import load_state_dict, validate_state_dict
from ..errors import CheckpointError, InputError, StarflowError

PathLike = Union[str, os.PathLike]

# Per-channel latent statistics of the Wan2.2 VAE (Wan-AI/Wan2.2-TI2V-5B; the same 48 numbers are
# the ``latents_mean`` / ``latents_std`` of diffusers' Wan2.2 VAE config and of upstream's wrapper).
WAN22_LATENTS_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)
WAN22_LATENTS_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)

#: ``AutoencoderKLWan`` arguments of the Wan2.2 VAE (TI2V-5B).
WAN22_VAE_CONFIG: dict[str, Any] = dict(
    base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
    temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
    patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4,
    latents_mean=list(WAN22_LATENTS_MEAN), latents_std=list(WAN22_LATENTS_STD),
)

LOGVAR_RANGE = (-30.0, 20.0)


def _diffusers():
    try:
        from diffusers.models.autoencoders import autoencoder_kl_wan
    except ImportError as exc:
        raise StarflowError("the Wan2.2 VAE needs diffusers: pip install 'starflow-trt[media]'") from exc
    return autoencoder_kl_wan


# --------------------------------------------------------------------------------------------
# upstream key layout → diffusers


_RESIDUAL_PARTS = {"residual.0.gamma": "norm1.gamma", "residual.2.weight": "conv1.weight",
                   "residual.2.bias": "conv1.bias", "residual.3.gamma": "norm2.gamma",
                   "residual.6.weight": "conv2.weight", "residual.6.bias": "conv2.bias",
                   "shortcut.weight": "conv_shortcut.weight", "shortcut.bias": "conv_shortcut.bias"}
_MIDDLE = {"0": "resnets.0", "2": "resnets.1"}
_HEAD = {"0.gamma": "norm_out.gamma", "2.weight": "conv_out.weight", "2.bias": "conv_out.bias"}
_TOP = {"conv1": "quant_conv", "conv2": "post_quant_conv"}
_STAGE = re.compile(r"^(encoder|decoder)\.(downsamples|upsamples)\.(\d+)\.(downsamples|upsamples)\.(\d+)\.(.+)$")


def _residual(rest: str) -> Optional[str]:
    return _RESIDUAL_PARTS.get(rest)


def rename_upstream_key(key: str) -> str:
    """One key of Wan's own VAE module (``Wan2.2_VAE.pth``) → the ``AutoencoderKLWan`` key.

    Wan nests each resolution stage as ``{encoder.downsamples|decoder.upsamples}.i.{…}.j``
    (residual blocks ``residual.{0,2,3,6}`` / ``shortcut``, then one resample);
    diffusers names them ``{down|up}_blocks.i.resnets.j`` (``norm1, conv1, norm2, conv2,
    conv_shortcut``) and ``…downsampler`` / ``…upsampler``. Raises CheckpointError on a key
    that fits neither layout.
    """
    head, _, rest = key.partition(".")
    if head in _TOP:
        return f"{_TOP[head]}.{rest}"
    if head not in ("encoder", "decoder"):
        raise CheckpointError(f"unexpected key {key!r} in a Wan2.2 VAE checkpoint; pass Wan2.2_VAE.pth or a "
                              "diffusers AutoencoderKLWan directory")
    part, _, tail = rest.partition(".")
    if part == "conv1":
        return f"{head}.conv_in.{tail}"
    if part == "head" and tail in _HEAD:
        return f"{head}.{_HEAD[tail]}"
    if part == "middle":
        index, _, leaf = tail.partition(".")
        if index == "1":  # the attention block keeps its leaf names
            return f"{head}.mid_block.attentions.0.{leaf}"
        if index in _MIDDLE and _residual(leaf):
            return f"{head}.mid_block.{_MIDDLE[index]}.{_residual(leaf)}"
    match = _STAGE.match(key)
    if match:
        _, outer, i, _, j, leaf = match.groups()
        blocks = "down_blocks" if outer == "downsamples" else "up_blocks"
        if _residual(leaf):
            return f"{head}.{blocks}.{i}.resnets.{j}.{_residual(leaf)}"
        if leaf.startswith(("resample.", "time_conv.")):
            sampler = "downsampler" if outer == "downsamples" else "upsampler"
            return f"{head}.{blocks}.{i}.{sampler}.{leaf}"
    raise CheckpointError(f"unexpected key {key!r} in a Wan2.2 VAE checkpoint; pass Wan2.2_VAE.pth or a "
                          "diffusers AutoencoderKLWan directory")


def is_upstream_layout(state: Mapping[str, torch.Tensor]) -> bool:
    return "encoder.conv1.weight" in state and "encoder.conv_in.weight" not in state


def convert_upstream_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename every key of an upstream (Wan) VAE state dict to the diffusers layout."""
    out = {rename_upstream_key(k): v for k, v in state.items()}
    if len(out) != len(state):
        raise CheckpointError("two keys of the VAE checkpoint map to the same diffusers key; the file is not a "
                              "Wan2.2 VAE state dict")
    return out


def infer_vae_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """``AutoencoderKLWan`` arguments read from the tensors of a diffusers-layout state dict.

    Only the residual (Wan2.2) layout is supported. Latent statistics are Wan2.2's when
    ``z_dim`` is 48 (the dims of Wan2.2), else left to the caller.
    """
    try:
        conv_in = state["encoder.conv_in.weight"]
        base_dim, in_channels = int(conv_in.shape[0]), int(conv_in.shape[1])
        z_dim = int(state["post_quant_conv.weight"].shape[0])
        conv_out = state["decoder.conv_out.weight"]
    except KeyError as exc:
        raise CheckpointError(f"VAE checkpoint lacks {exc}; pass Wan2.2_VAE.pth or a diffusers "
                              "AutoencoderKLWan directory") from exc
    stages = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.", k))})
    if not stages:
        raise CheckpointError("VAE checkpoint has no residual down blocks: only the Wan2.2 VAE (is_residual) "
                              "is supported, not Wan2.1's")
    dim_mult = [int(state[f"encoder.down_blocks.{i}.resnets.0.conv1.weight"].shape[0]) // base_dim for i in stages]
    num_res_blocks = len({k.split(".")[4] for k in state if k.startswith("encoder.down_blocks.0.resnets.")})
    temporal = [f"encoder.down_blocks.{i}.downsampler.time_conv.weight" in state for i in stages[:-1]]
    patch = math.isqrt(in_channels // 3) if in_channels > 3 else None
    cfg: dict[str, Any] = dict(
        base_dim=base_dim, decoder_base_dim=int(conv_out.shape[1]) // dim_mult[0], z_dim=z_dim, dim_mult=dim_mult,
        num_res_blocks=num_res_blocks, temperal_downsample=temporal, is_residual=True, in_channels=in_channels,
        out_channels=int(conv_out.shape[0]), patch_size=patch,
        scale_factor_spatial=2 ** (len(dim_mult) - 1) * (patch or 1), scale_factor_temporal=2 ** sum(temporal))
    if z_dim == len(WAN22_LATENTS_MEAN):
        cfg.update(latents_mean=list(WAN22_LATENTS_MEAN), latents_std=list(WAN22_LATENTS_STD))
    return cfg


def _from_state(state: dict[str, torch.Tensor], source: Path):
    diffusers_wan = _diffusers()
    cfg = infer_vae_config(state)
    with torch.device("meta"):
        vae = diffusers_wan.AutoencoderKLWan(**cfg)
    expected = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    try:
        validate_state_dict(state, expected)
    except CheckpointError as exc:
        raise CheckpointError(f"VAE checkpoint {source} does not match the inferred Wan2.2 VAE: {exc}") from exc
    vae.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return vae.eval().requires_grad_(False)


def load_vae(path: PathLike):
    """``AutoencoderKLWan`` (float32, eval) from upstream's ``.pth`` or a diffusers directory; no download."""
    diffusers_wan = _diffusers()
    p = Path(path)
    if p.is_dir():
        sub = p / "vae" if (p / "vae" / "config.json").is_file() and not (p / "config.json").is_file() else p
        if not (sub / "config.json").is_file():
            raise CheckpointError(f"{p} is not a diffusers VAE directory (no config.json); pass Wan2.2_VAE.pth "
                                  "or the diffusers AutoencoderKLWan directory")
        try:
            vae = diffusers_wan.AutoencoderKLWan.from_pretrained(str(sub), local_files_only=True,
                                                                 torch_dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load a diffusers AutoencoderKLWan from {sub}: {exc}") from exc
        if not vae.config.is_residual:
            raise CheckpointError(f"{sub} is a Wan2.1 VAE (is_residual false); STARFlow-V uses the Wan2.2 VAE")
        return vae.float().eval().requires_grad_(False)
    state = load_state_dict(p)
    if is_upstream_layout(state):
        state = convert_upstream_state_dict(state)
    return _from_state(state, p)


# --------------------------------------------------------------------------------------------
# latent statistics (spec §14)


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


# --------------------------------------------------------------------------------------------
# explicit causal-conv caches


@dataclass(frozen=True)
class CacheEntry:
    """One cached causal conv: ``[B, channels, frames, h·scale, w·scale]`` for latent grid ``h × w``."""

    module: str
    channels: int
    frames: int
    scale: int

    def shape(self, batch: int, h: int, w: int) -> tuple[int, int, int, int, int]:
        return (batch, self.channels, self.frames, h * self.scale, w * self.scale)

    def symbolic(self) -> tuple[Union[int, str], ...]:
        suffix = "" if self.scale == 1 else f"_x{self.scale}"
        return ("batch", self.channels, self.frames, f"h{suffix}", f"w{suffix}")


@dataclass(frozen=True)
class CachePlan:
    """The ordered caches of the decoder or encoder (the order of diffusers' ``feat_cache`` list)."""

    part: str
    entries: tuple[CacheEntry, ...] = field(default_factory=tuple)

    def __len__(self) -> int:
        return len(self.entries)

    def input_names(self) -> list[str]:
        return [f"cache_{i}" for i in range(len(self.entries))]

    def output_names(self) -> list[str]:
        return [f"new_cache_{i}" for i in range(len(self.entries))]

    def shapes(self, batch: int, h: int, w: int) -> list[tuple[int, ...]]:
        return [e.shape(batch, h, w) for e in self.entries]

    def zeros(self, batch: int, h: int, w: int, like: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        kw = {"dtype": like.dtype, "device": like.device} if like is not None else {}
        return [torch.zeros(s, **kw) for s in self.shapes(batch, h, w)]

    def bytes(self, batch: int, h: int, w: int, itemsize: int = 4) -> int:
        return sum(math.prod(s) for s in self.shapes(batch, h, w)) * itemsize

    def to_dict(self) -> dict[str, Any]:
        return {"part": self.part, "names": self.input_names(),
                "entries": [{"module": e.module, "channels": e.channels, "frames": e.frames, "scale": e.scale}
                            for e in self.entries]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CachePlan":
        return cls(data["part"], tuple(CacheEntry(e["module"], int(e["channels"]), int(e["frames"]),
                                                  int(e["scale"])) for e in data["entries"]))


def _cached_convs(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Causal convs with a temporal kernel > 1: exactly those that take a ``feat_cache`` slot."""
    conv_type = _diffusers().WanCausalConv3d
    return [(n, m) for n, m in module.named_modules() if isinstance(m, conv_type) and m.kernel_size[0] > 1]


def _record_order(module: nn.Module, prefix: str, run: Callable[[], Any]) -> list[str]:
    """Names of the cached convs in the order ``run`` calls them."""
    order: list[str] = []
    hooks = [m.register_forward_pre_hook(lambda _m, _a, n=name: order.append(f"{prefix}.{n}"))
             for name, m in _cached_convs(module)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return order


@torch.no_grad()
def probe_cache_plan(vae, part: str) -> CachePlan:
    """Run the first chunk and one step eagerly on a 1×2 latent grid; record every cache's steady shape.

    Names come from the convs called during the step (the first chunk skips the temporal
    upsamplers: diffusers marks them ``"Rep"``).
    """
    if part not in ("decoder", "encoder"):
        raise ValueError(f"part must be 'decoder' or 'encoder', got {part!r}")
    h, w = 1, 2
    module = getattr(vae, part)
    feat: list = [None] * len(_cached_convs(module))
    if part == "decoder":
        x = vae.post_quant_conv(torch.zeros(1, vae.config.z_dim, 2, h, w))
        first, rest, kw = x[:, :, :1], x[:, :, 1:], {"first_chunk": True}
    else:
        s, p = vae.config.scale_factor_spatial, vae.config.patch_size or 1
        x = _patchify(vae, torch.zeros(1, vae.config.in_channels // (p * p), 5, h * s, w * s))
        first, rest, kw = x[:, :, :1], x[:, :, 1:], {}
    module(first, feat_cache=feat, feat_idx=[0], **kw)
    idx = [0]
    order = _record_order(module, part, lambda: module(rest, feat_cache=feat, feat_idx=idx))
    used = idx[0]
    if len(order) != used:
        raise RuntimeError(f"{part}: {used} cache slots used but {len(order)} cached convs called")
    entries = []
    for name, t in zip(order, feat[:used]):
        _, c, f, hh, ww = t.shape
        if hh % h or ww != (hh // h) * w:
            raise RuntimeError(f"{part} cache {name}: unexpected spatial shape {tuple(t.shape)}")
        entries.append(CacheEntry(name, int(c), int(f), hh // h))
    return CachePlan(part, tuple(entries))


def _settle(feat: Sequence, plan: CachePlan, ref: torch.Tensor, h, w) -> list[torch.Tensor]:
    """First-chunk cache list → steady shapes.

    A conv that has seen one frame holds one; zero-padding it in front to two frames is
    exact (the conv pads with zeros itself). A temporal upsampler not yet run (``"Rep"``)
    is a cache of zeros, for the same reason.
    """
    out = []
    for entry, t in zip(plan.entries, feat):
        if t is None or isinstance(t, str):
            t = ref.new_zeros((ref.shape[0], entry.channels, entry.frames, h * entry.scale, w * entry.scale))
        elif t.shape[2] < entry.frames:
            t = F.pad(t, (0, 0, 0, 0, entry.frames - t.shape[2], 0))
        elif t.shape[2] > entry.frames:
            t = t[:, :, -entry.frames:]
        out.append(t)
    return out


def _unpatchify(vae, x: torch.Tensor) -> torch.Tensor:
    p = vae.config.patch_size
    return _diffusers().unpatchify(x, p) if p and p > 1 else x


def _patchify(vae, x: torch.Tensor) -> torch.Tensor:
    p = vae.config.patch_size
    return _diffusers().patchify(x, p) if p and p > 1 else x


class VaeDecodeFirst(nn.Module):
    """``vae_decode_first``: latents [B, 1, z, h, w] (raw VAE space) → frames [B, 1, 3, sh, sw], caches.

    Outputs ``frames`` then ``new_cache_0 … new_cache_{n-1}`` (shapes in ``plan``). No clamp.
    """

    def __init__(self, vae, plan: Optional[CachePlan] = None):
        super().__init__()
        self.vae = vae
        self.plan = plan or probe_cache_plan(vae, "decoder")

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.vae.post_quant_conv(latents.permute(0, 2, 1, 3, 4))
        feat: list = [None] * len(self.plan)
        out = self.vae.decoder(x, feat_cache=feat, feat_idx=[0], first_chunk=True)
        frames = _unpatchify(self.vae, out).permute(0, 2, 1, 3, 4)
        return (frames, *_settle(feat, self.plan, x, latents.shape[3], latents.shape[4]))


class VaeDecodeStep(nn.Module):
    """``vae_decode_step``: latents [B, k, z, h, w] + caches → frames [B, 4k, 3, sh, sw] + new caches (k ≥ 1)."""

    def __init__(self, vae, plan: Optional[CachePlan] = None):
        super().__init__()
        self.vae = vae
        self.plan = plan or probe_cache_plan(vae, "decoder")

    def forward(self, latents: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.vae.post_quant_conv(latents.permute(0, 2, 1, 3, 4))
        feat = list(caches)
        out = self.vae.decoder(x, feat_cache=feat, feat_idx=[0])
        frames = _unpatchify(self.vae, out).permute(0, 2, 1, 3, 4)
        return (frames, *feat)


def _moments(vae, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, logvar = vae.quant_conv(out).chunk(2, dim=1)
    return mean.permute(0, 2, 1, 3, 4), logvar.permute(0, 2, 1, 3, 4)


class VaeEncodeFirst(nn.Module):
    """``vae_encode_first``: frames [B, 1, 3, H, W] → mean, logvar [B, 1, z, H/16, W/16], caches."""

    def __init__(self, vae, plan: Optional[CachePlan] = None):
        super().__init__()
        self.vae = vae
        self.plan = plan or probe_cache_plan(vae, "encoder")

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = _patchify(self.vae, frames.permute(0, 2, 1, 3, 4).contiguous())
        feat: list = [None] * len(self.plan)
        out = self.vae.encoder(x, feat_cache=feat, feat_idx=[0])
        mean, logvar = _moments(self.vae, out)
        return (mean, logvar, *_settle(feat, self.plan, x, mean.shape[3], mean.shape[4]))


class VaeEncodeStep(nn.Module):
    """``vae_encode_step``: frames [B, 4k, 3, H, W] + caches → mean, logvar [B, k, z, h, w] + new caches."""

    def __init__(self, vae, plan: Optional[CachePlan] = None):
        super().__init__()
        self.vae = vae
        self.plan = plan or probe_cache_plan(vae, "encoder")

    def forward(self, frames: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = _patchify(self.vae, frames.permute(0, 2, 1, 3, 4).contiguous())
        feat = list(caches)
        out = self.vae.encoder(x, feat_cache=feat, feat_idx=[0])
        return (*_moments(self.vae, out), *feat)


class VaeEncode(nn.Module):
    """``vae_encode``: frames [B, 1 + 4n, 3, H, W] → mean, logvar [B, 1 + n, z, H/16, W/16].

    The chunk loop (1 frame, then 4 at a time) is unrolled at export, so the frame count is
    fixed by the example input: export it with one frame for images; chain
    :class:`VaeEncodeFirst` / :class:`VaeEncodeStep` for videos of any length.
    """

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        check_frame_count(frames.shape[1])
        x = _patchify(self.vae, frames.permute(0, 2, 1, 3, 4).contiguous())
        feat: list = [None] * len(_cached_convs(self.vae.encoder))
        outs = [self.vae.encoder(x[:, :, :1], feat_cache=feat, feat_idx=[0])]
        for i in range(1, x.shape[2], 4):
            outs.append(self.vae.encoder(x[:, :, i:i + 4], feat_cache=feat, feat_idx=[0]))
        return _moments(self.vae, torch.cat(outs, dim=2))


def check_frame_count(frames: int) -> None:
    if frames < 1 or (frames - 1) % 4:
        raise InputError(f"a video for the VAE needs 1 + 4n frames, got {frames}; trim or pad it "
                         f"(e.g. to {1 + 4 * max(0, (frames - 1) // 4)})")


# --------------------------------------------------------------------------------------------
# chaining and the whole-clip oracle

StepFn = Callable[..., Sequence[torch.Tensor]]


def decode_streaming(first: StepFn, step: StepFn, latents: torch.Tensor,
                     chunks: Optional[Sequence[int]] = None,
                     on_frames: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
    """Chain ``first`` (latent frame 0) and ``step`` (the rest, ``chunks`` latent frames at a time).

    ``first(latents) -> (frames, *caches)``, ``step(latents, *caches) -> (frames, *caches)``: torch
    modules or any callables with that contract. latents [B, T, z, h, w] raw VAE space →
    frames [B, 1 + 4(T-1), 3, sh, sw]. ``chunks`` defaults to one latent frame per step.
    """
    t = latents.shape[1]
    chunks = list(chunks) if chunks is not None else [1] * (t - 1)
    if any(c < 1 for c in chunks) or sum(chunks) != t - 1:
        raise InputError(f"chunks {chunks} must be ≥ 1 each and sum to {t - 1} (latent frames after the first)")
    frames, *caches = first(latents[:, :1])
    pieces = [frames]
    if on_frames:
        on_frames(frames)
    start = 1
    for c in chunks:
        frames, *caches = step(latents[:, start:start + c], *caches)
        pieces.append(frames)
        if on_frames:
            on_frames(frames)
        start += c
    return torch.cat(pieces, dim=1)


@torch.no_grad()
def decode_whole(vae, latents: torch.Tensor) -> torch.Tensor:
    """Test oracle: diffusers' own whole-clip loop, without its clamp. [B, T, z, h, w] → [B, 1+4(T-1), 3, H, W]."""
    vae.clear_cache()
    x = vae.post_quant_conv(latents.permute(0, 2, 1, 3, 4))
    outs = []
    for i in range(x.shape[2]):
        vae._conv_idx = [0]
        outs.append(vae.decoder(x[:, :, i:i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx,
                                first_chunk=i == 0))
    vae.clear_cache()
    return _unpatchify(vae, torch.cat(outs, dim=2)).permute(0, 2, 1, 3, 4)


@torch.no_grad()
def encode_whole(vae, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Test oracle: diffusers' ``encode`` → mean, logvar [B, T, z, h, w] (its logvar is clamped to [-30, 20])."""
    dist = vae.encode(frames.permute(0, 2, 1, 3, 4)).latent_dist
    return dist.mean.permute(0, 2, 1, 3, 4), dist.logvar.permute(0, 2, 1, 3, 4)
