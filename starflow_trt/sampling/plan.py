"""What one sampling call runs (:class:`SamplingPlan`): its tensors, schedule, long-video window and denoising plan.

    spec = SamplerSpec(channels=4, patch_size=1, text_length=4, text_width=16, ...)
    plan = check_request(spec, y, noise, y_uncond=..., guidance=2.0, jacobi=..., context=..., denoise=True)
    plan.solver, plan.window, plan.denoise_chunks, plan.describe()

:func:`check_request` validates the reference sampler's arguments, then plans; the runtime plans a
:class:`~starflow_trt.request.GenerationRequest` that :func:`~starflow_trt.request.build_request` has
validated already (:func:`plan_sampling`, no second check).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ..errors import InputError
from ..frame_plan import DenoiseChunk, denoise_plan, denoise_steps, resolve_window
from .block import Solver
from .options import SCHEDULES, JacobiConfig


@dataclass(frozen=True)
class SamplerSpec:
    """What a sampler accepts: the model's facts and, for an export, its fixed size and limits.

    ``size``: the exact (H, W) of the latents (None: any multiple of ``patch_size``);
    ``max_frames`` / ``max_batch``: None for no limit; ``schedules`` / ``default_schedule``: the
    Jacobi schedules this sampler runs and the one ``JacobiConfig(schedule=None)`` means;
    ``residual_floor``: the Jacobi residual floor of quantised graphs (a thresholded request's
    ``JacobiConfig.floor`` unless it sets a larger one; 0: float graphs).
    """

    channels: int
    patch_size: int
    text_length: int
    text_width: Optional[int]
    local_attn_window: Optional[int] = None
    denoiser_window: Optional[int] = None
    size: Optional[tuple[int, int]] = None
    max_frames: Optional[int] = None
    max_batch: Optional[int] = None
    schedules: tuple[str, ...] = SCHEDULES
    default_schedule: str = "upstream"
    residual_floor: float = 0.0


def _shape(x: Any) -> Any:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def check_video(x: Any, spec: SamplerSpec, name: str) -> None:
    """Raise InputError unless x is a finite [B, T, C, H, W] tensor of the spec's C and (H, W)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        raise InputError(f"{name} must be a [B, T, C, H, W] tensor, got {_shape(x)}")
    C, p = spec.channels, spec.patch_size
    if spec.size is not None:
        H, W = spec.size
        if tuple(x.shape[2:]) != (C, H, W):
            raise InputError(f"{name} must be [B, T, C, H, W] = [B, T, {C}, {H}, {W}] (C={C} channels, the "
                             f"exported geometry), got {tuple(x.shape)}")
    elif x.shape[2] != C or x.shape[3] % p or x.shape[4] % p:
        raise InputError(f"{name} must be [B, T, C, H, W] with C={C} channels and H, W multiples of "
                         f"patch_size {p}, got {tuple(x.shape)}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise InputError(f"{name} is empty: shape {tuple(x.shape)} needs B >= 1 and T >= 1")
    if not torch.isfinite(x).all():
        raise InputError(f"{name} contains NaN or Inf")


def check_text(y: Any, spec: SamplerSpec, batch: Optional[int], name: str) -> None:
    """Raise InputError unless y is finite text embeddings [batch, L, D] (batch None: any)."""
    L, D = spec.text_length, spec.text_width
    ok = isinstance(y, torch.Tensor) and y.dim() == 3 and tuple(y.shape[1:]) == (L, D)
    if not ok or (batch is not None and y.shape[0] != batch):
        raise InputError(f"{name} must be text embeddings [B, L, D] = [{batch if batch is not None else 'B'}, "
                         f"{L}, {D}] (length {L}, width {D}), got {_shape(y)}")
    if not torch.isfinite(y).all():
        raise InputError(f"{name} contains NaN or Inf; check the text encoder output")


def check_guidance(guidance: Any) -> float:
    """The guidance scale as a float: finite and >= 0."""
    try:
        w = float(guidance)
    except (TypeError, ValueError):
        w = math.nan
    if not math.isfinite(w) or w < 0:
        raise InputError(f"guidance must be a finite number >= 0, got {guidance!r}")
    return w


def resolve_frames(num_frames: Any, noise: Optional[torch.Tensor], default: Optional[int]) -> int:
    """Frames to generate: the noise's, else ``num_frames``, else ``default``; a mismatch raises."""
    if num_frames is not None:
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise InputError(f"num_frames must be a whole number >= 1, got {num_frames!r}")
        if noise is not None and num_frames != noise.shape[1]:
            raise InputError(f"num_frames={num_frames} but noise has {noise.shape[1]} frames")
        return num_frames
    if noise is not None:
        return noise.shape[1]
    if default is None:
        raise InputError("pass noise [B, T, C, H, W] or num_frames")
    return default


def resolve_schedule(jacobi: Optional[JacobiConfig], spec: SamplerSpec) -> Optional[str]:
    """The Jacobi schedule to run (None: autoregressive)."""
    if jacobi is None:
        return None
    schedule = jacobi.schedule or spec.default_schedule
    if schedule not in spec.schedules:
        raise InputError(f"unknown Jacobi schedule {schedule!r} here: choose {', '.join(spec.schedules)}")
    return schedule


@dataclass(frozen=True)
class SamplingPlan:
    """One sampling call, resolved; tensors as given (the caller converts dtype and device)."""

    y: torch.Tensor                      # [B, L, D]
    y_uncond: Optional[torch.Tensor]     # [B, L, D] when guidance > 0, else None
    noise: Optional[torch.Tensor]        # [B, T, C, H, W]; None: the caller draws it
    batch: int
    frames: int
    guidance: float
    jacobi: Optional[JacobiConfig]
    schedule: Optional[str]              # None: autoregressive
    window: Optional[int]                # long-video window (frames), None: none
    context_length: Optional[int]
    context: Optional[torch.Tensor]      # [B, N, C, H, W], N < T
    denoise_chunks: Optional[list[DenoiseChunk]]   # None: no denoising

    @property
    def n_ctx(self) -> int:
        return 0 if self.context is None else self.context.shape[1]

    @property
    def solver(self) -> Solver:
        """The top block's solver (shallow blocks: ``solver.unwindowed()``)."""
        return Solver(self.jacobi, self.schedule or "upstream", self.window, self.context_length)

    def text(self) -> torch.Tensor:
        """[B', L, D]: ``[y ; y_uncond]`` with guidance, else y."""
        return torch.cat([self.y, self.y_uncond]) if self.y_uncond is not None else self.y

    def describe(self) -> dict:
        """JSON-serialisable summary (no tensors)."""
        return {"guidance": self.guidance, "num_frames": self.frames, "batch": self.batch,
                "jacobi": None if self.jacobi is None else dataclasses.asdict(self.jacobi),
                "schedule": self.schedule or "autoregressive", "window": self.window,
                "context_length": self.context_length, "context_frames": self.n_ctx,
                "denoise": self.denoise_chunks is not None}


def check_request(spec: SamplerSpec, y: Any, noise: Any = None, *, y_uncond: Any = None, num_frames: Any = None,
                  guidance: Any = 0.0, jacobi: Optional[JacobiConfig] = None, context: Any = None,
                  denoise: bool = False) -> SamplingPlan:
    """Validate a sampling call of the reference sampler (raises one-line InputErrors), then plan it
    (:func:`plan_sampling`). noise None: ``num_frames`` (or ``spec.max_frames``) frames, drawn by the caller."""
    if noise is not None:
        check_video(noise, spec, "noise")
    check_text(y, spec, None if noise is None else noise.shape[0], "y")
    batch = y.shape[0]
    if spec.max_batch is not None and batch > spec.max_batch:
        raise InputError(f"batch {batch} exceeds the export's max_batch {spec.max_batch}; re-export with --max-batch")
    w = check_guidance(guidance)
    if w > 0:
        if y_uncond is None:
            raise InputError("guidance > 0 needs y_uncond: the empty-prompt embeddings [B, L, D]")
        check_text(y_uncond, spec, batch, "y_uncond")
    frames = resolve_frames(num_frames, noise, spec.max_frames)
    if context is not None:
        check_video(context, spec, "context")
        if context.shape[0] != batch or context.shape[1] >= frames or (
                noise is not None and context.shape[2:] != noise.shape[2:]):
            raise InputError(f"context must be [B, N, C, H, W] with B={batch}, N < T={frames} and the noise's "
                             f"C, H, W, got {tuple(context.shape)}")
    return plan_sampling(spec, y, noise, y_uncond=y_uncond if w > 0 else None, frames=frames, guidance=w,
                         jacobi=jacobi, context=context, denoise=denoise)


def plan_sampling(spec: SamplerSpec, y: torch.Tensor, noise: Optional[torch.Tensor], *,
                  y_uncond: Optional[torch.Tensor], frames: int, guidance: float, jacobi: Optional[JacobiConfig],
                  context: Optional[torch.Tensor], denoise: bool) -> SamplingPlan:
    """The plan of a valid call: the schedule (``jacobi`` None: autoregressive), the export's residual floor,
    the long-video window and the denoising chunks. y [B, L, D]; y_uncond [B, L, D] when guidance > 0."""
    schedule = resolve_schedule(jacobi, spec)
    if jacobi is not None and spec.residual_floor > jacobi.floor:
        jacobi = dataclasses.replace(jacobi, floor=spec.residual_floor)
    window, context_length = resolve_window(jacobi, frames, spec.local_attn_window, spec.max_frames)
    chunks = None
    if denoise:
        chunks = denoise_plan(frames, denoise_steps(window, spec.local_attn_window, frames), spec.denoiser_window)
    return SamplingPlan(y=y, y_uncond=y_uncond if guidance > 0 else None, noise=noise, batch=y.shape[0],
                        frames=frames, guidance=guidance, jacobi=jacobi, schedule=schedule, window=window,
                        context_length=context_length, context=context, denoise_chunks=chunks)
