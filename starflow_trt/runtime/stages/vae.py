"""VAE stage: normalised latents ⇄ frames through the exported Wan2.2 graphs (causal, cache-explicit).

    stage = VaeStage(graphs)
    frames = stage.decode(latents, on_frames=writer.write)   # [B, T, z, h, w] → [B, 1+4(T-1), 3, 16h, 16w]
    latents = stage.encode_video(frames, sample=False)        # [B, 1+4n, 3, H, W] → [B, 1+n, z, h, w]

Graph latents are raw VAE latents; the per-channel normalisation and the temporal scale of latent
frames 1: (``LatentNorm``, manifest ``norm``) are applied here in float32. No clamp: frames are
clamped only when written (``media.io.frames_to_uint8``).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

from ...errors import InputError, ManifestError
from ...export import names as n
from ..graphs import Graphs
from ..tensors import as_float32


class VaeStage:
    """The export's VAE graphs and latent statistics (graphs loaded on first use)."""

    def __init__(self, graphs: Graphs):
        from ...media.latents import LatentNorm

        if not graphs.has(n.VAE_DECODE_FIRST):
            raise ManifestError(f"{graphs.manifest.root} has no VAE graphs; re-export with "
                                "`starflow-trt export ... --vae PATH`")
        self.graphs = graphs
        first = graphs.manifest.graph(n.VAE_DECODE_FIRST)
        self.norm = LatentNorm.from_dict(first.extra["norm"])
        self.spatial = int(first.extra["spatial_factor"])
        self.temporal = int(first.extra["temporal_factor"])

    # -------------------------------------------------------------- calls
    def _call(self, name: str, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run graph ``name`` on positional ``inputs`` (manifest order); outputs in manifest order."""
        spec = self.graphs.manifest.graph(name)
        if len(inputs) != len(spec.inputs):
            raise InputError(f"graph {name!r} takes {len(spec.inputs)} inputs, got {len(inputs)}")
        x = inputs[0]
        height, width = (x.shape[-2], x.shape[-1])
        if spec.inputs[0].name == n.FRAMES:
            height, width = height // self.spatial, width // self.spatial
        sizes = {"batch": x.shape[0], "h": height, "w": width, "H": height * self.spatial, "W": width * self.spatial}
        for r in (2, 4, 8):
            sizes[f"h_x{r}"], sizes[f"w_x{r}"] = height * r, width * r
        dev = self.graphs.device
        feed = {t.name: v.to(dev).contiguous() for t, v in zip(spec.inputs, inputs)}
        out = {t.name: torch.empty(*t.concrete(sizes), device=dev) for t in spec.outputs}
        self.graphs.runner(name).run(feed, out)
        return [out[t.name] for t in spec.outputs]

    # ------------------------------------------------------------- decode
    def decode(self, latents: torch.Tensor,
               on_frames: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
        """Normalised latents [B, T, z, h, w] → frames [B, 1+4(T-1), 3, 16h, 16w] (not clamped).

        One latent frame per step; ``on_frames(chunk [B, f, 3, H, W])`` fires as each chunk decodes.
        """
        from ...media.vae_stream import decode_streaming

        z = self._check_latents(latents)
        raw = self.norm.to_vae(z)
        return decode_streaming(lambda x: self._call(n.VAE_DECODE_FIRST, [x]),
                                lambda x, *c: self._call(n.VAE_DECODE_STEP, [x, *c]),
                                raw, on_frames=(lambda f: on_frames(f.cpu())) if on_frames else None).cpu()

    def decoder(self, on_frames: Callable[[torch.Tensor], None]) -> "StreamingDecoder":
        """A decoder fed one normalised latent frame at a time (frame index order) as the flow finishes them."""
        return StreamingDecoder(self, on_frames)

    # ------------------------------------------------------------- encode
    def moments(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frames [B, 1+4n, 3, H, W] in [-1, 1] → raw (mean, logvar) [B, 1+n, z, h, w]."""
        from ...media.vae_stream import check_frame_count

        frames = as_float32(frames, "frames")
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise InputError(f"frames must be [B, F, 3, H, W], got {tuple(frames.shape)}")
        check_frame_count(frames.shape[1])
        if frames.shape[-2] % self.spatial or frames.shape[-1] % self.spatial:
            raise InputError(f"frame size {tuple(frames.shape[-2:])} must be a multiple of {self.spatial}")
        if frames.shape[1] == 1 and self.graphs.has(n.VAE_ENCODE):
            mean, logvar = self._call(n.VAE_ENCODE, [frames])
            return mean.cpu(), logvar.cpu()
        if not self.graphs.has(n.VAE_ENCODE_FIRST):
            raise ManifestError("this export has no vae_encode_first / vae_encode_step graphs; re-export with --vae")
        mean, logvar, *caches = self._call(n.VAE_ENCODE_FIRST, [frames[:, :1]])
        means, logvars = [mean.cpu()], [logvar.cpu()]
        for s in range(1, frames.shape[1], self.temporal):
            mean, logvar, *caches = self._call(n.VAE_ENCODE_STEP, [frames[:, s:s + self.temporal], *caches])
            means.append(mean.cpu())
            logvars.append(logvar.cpu())
        return torch.cat(means, 1), torch.cat(logvars, 1)

    def encode_video(self, frames: torch.Tensor, sample: bool = False,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Frames [B, 1+4n, 3, H, W] → latents [B, 1+n, z, H/16, W/16], normalised and time-scaled like
        upstream (``sample``: draw from the posterior, else its mean)."""
        mean, logvar = self.moments(frames)
        return self.norm.latents_from_moments(mean, logvar, sample=sample, generator=generator)

    def _check_latents(self, latents) -> torch.Tensor:
        z = as_float32(latents, "latents")
        if z.dim() != 5 or z.shape[2] != self.norm.channels:
            raise InputError(f"latents must be [B, T, {self.norm.channels}, h, w], got {tuple(z.shape)}")
        return z


class StreamingDecoder:
    """Decode normalised latent frames one at a time (``push(i, frame [B, z, h, w])``, in order)."""

    def __init__(self, stage: VaeStage, on_frames: Callable[[torch.Tensor], None]):
        self.stage, self.on_frames = stage, on_frames
        self.caches: Optional[list[torch.Tensor]] = None
        self.next = 0

    def push(self, index: int, frame: torch.Tensor) -> None:
        if index != self.next:
            raise InputError(f"latent frame {index} pushed before frame {self.next}")
        raw = self.stage.norm.to_vae(frame.float().cpu()[:, None], start=index)
        name = n.VAE_DECODE_FIRST if index == 0 else n.VAE_DECODE_STEP
        frames, *self.caches = self.stage._call(name, [raw] if index == 0 else [raw, *self.caches])
        self.next += 1
        self.on_frames(frames.cpu())
