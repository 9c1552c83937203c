"""The exportable VAE graphs: explicit causal-conv caches and the first / step wrappers.

Decoding is causal, one latent frame at a time, each causal 3-D conv keeping the last 2
frames of its input as a cache; the first latent frame is special (it decodes to one frame,
later ones to four). :class:`VaeDecodeFirst` / :class:`VaeDecodeStep` make those caches explicit
graph inputs/outputs with fixed shapes (:class:`CachePlan`, probed by :func:`probe_cache_plan`);
the same for the encoder (:class:`VaeEncodeFirst` one frame, :class:`VaeEncodeStep` ``4k`` frames;
:class:`VaeEncode` images). Neither clamps: upstream clamps only when writing video
(:func:`starflow_trt.media.io.frames_to_uint8`). Latents here are raw VAE latents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .vae_load import diffusers_wan
from .vae_stream import check_frame_count


@dataclass(frozen=True)
class CacheEntry:
    """One cached causal conv: ``[B, channels, frames, height·scale, width·scale]`` for a latent frame
    ``height × width`` (latent pixels; ONNX dims ``h`` / ``w``, ``h_xS`` / ``w_xS``)."""

    module: str
    channels: int
    frames: int
    scale: int

    def shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int, int]:
        return (batch, self.channels, self.frames, height * self.scale, width * self.scale)

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

    def shapes(self, batch: int, height: int, width: int) -> list[tuple[int, ...]]:
        return [e.shape(batch, height, width) for e in self.entries]

    def zeros(self, batch: int, height: int, width: int, like: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        kw = {"dtype": like.dtype, "device": like.device} if like is not None else {}
        return [torch.zeros(s, **kw) for s in self.shapes(batch, height, width)]

    def bytes(self, batch: int, height: int, width: int, itemsize: int = 4) -> int:
        return sum(math.prod(s) for s in self.shapes(batch, height, width)) * itemsize

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
    conv_type = diffusers_wan().WanCausalConv3d
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
        x = patchify(vae, torch.zeros(1, vae.config.in_channels // (p * p), 5, h * s, w * s))
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


def _settle(feat: Sequence, plan: CachePlan, ref: torch.Tensor, height: int, width: int) -> list[torch.Tensor]:
    """First-chunk cache list → steady shapes.

    A conv that has seen one frame holds one; zero-padding it in front to two frames is
    exact (the conv pads with zeros itself). A temporal upsampler not yet run (``"Rep"``)
    is a cache of zeros, for the same reason.
    """
    out = []
    for entry, t in zip(plan.entries, feat):
        if t is None or isinstance(t, str):
            t = ref.new_zeros((ref.shape[0], entry.channels, entry.frames, height * entry.scale, width * entry.scale))
        elif t.shape[2] < entry.frames:
            t = F.pad(t, (0, 0, 0, 0, entry.frames - t.shape[2], 0))
        elif t.shape[2] > entry.frames:
            t = t[:, :, -entry.frames:]
        out.append(t)
    return out


def unpatchify(vae, x: torch.Tensor) -> torch.Tensor:
    """The VAE's output channels → pixels (its ``patch_size``; identity without one)."""
    p = vae.config.patch_size
    return diffusers_wan().unpatchify(x, p) if p and p > 1 else x


def patchify(vae, x: torch.Tensor) -> torch.Tensor:
    """Pixels → the VAE's input channels (its ``patch_size``; identity without one)."""
    p = vae.config.patch_size
    return diffusers_wan().patchify(x, p) if p and p > 1 else x


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
        frames = unpatchify(self.vae, out).permute(0, 2, 1, 3, 4)
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
        frames = unpatchify(self.vae, out).permute(0, 2, 1, 3, 4)
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
        x = patchify(self.vae, frames.permute(0, 2, 1, 3, 4).contiguous())
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
        x = patchify(self.vae, frames.permute(0, 2, 1, 3, 4).contiguous())
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
        x = patchify(self.vae, frames.permute(0, 2, 1, 3, 4).contiguous())
        feat: list = [None] * len(_cached_convs(self.vae.encoder))
        outs = [self.vae.encoder(x[:, :, :1], feat_cache=feat, feat_idx=[0])]
        for i in range(1, x.shape[2], 4):
            outs.append(self.vae.encoder(x[:, :, i:i + 4], feat_cache=feat, feat_idx=[0]))
        return _moments(self.vae, torch.cat(outs, dim=2))

