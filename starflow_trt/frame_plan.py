"""Which frames a call works on, torch-free (spec §10.4, §12.3-12.4): the long-video attention window and its
context, and the denoiser's frame chunks. The sampler plans with these; a request is checked with them before any
work (:func:`starflow_trt.request.build_request`)."""

from __future__ import annotations

from typing import NamedTuple, Optional

from .errors import InputError
from .jacobi_config import JacobiConfig


def resolve_window(jacobi: Optional[JacobiConfig], frames: int, local_attn_window: Optional[int],
                   max_frames: Optional[int] = None) -> tuple[Optional[int], Optional[int]]:
    """(window, context_length) in frames for a video of ``frames`` frames; (None, None): no windowing.

    window: ``jacobi.window``, else the model's ``local_attn_window``; a window that covers the
    video is the non-window path (§10.4). context_length: ``jacobi.context_length``, else window − 1.
    ``max_frames``: the longest video the sampler takes without a window (exports), None: any.
    """
    window = jacobi.window if jacobi is not None and jacobi.window else local_attn_window
    if window is not None and frames <= window:
        if max_frames is not None and frames > max_frames:
            raise InputError(f"{frames} latent frames fit the attention window of {window} frames but exceed the "
                             f"export's max_frames {max_frames}: pass a window of at most {max_frames} frames "
                             f"(--window) or re-export with --max-frames {frames}")
        return None, None
    if window is None:
        if max_frames is not None and frames > max_frames:
            raise InputError(f"{frames} latent frames exceed the {max_frames} this export supports without an "
                             "attention window; re-export with --max-frames or use a Jacobi window")
        return None, None
    if jacobi is None:
        raise InputError(f"{frames} frames exceed the attention window of {window} frames; autoregressive "
                         "sampling has no window: use Jacobi sampling or fewer frames")
    if max_frames is not None and window > max_frames:
        raise InputError(f"window of {window} frames exceeds the export's max_frames {max_frames}; re-export")
    context = jacobi.context_length if jacobi.context_length is not None else window - 1
    if not 1 <= context < window:
        raise InputError(f"Jacobi context_length must be in [1, {window}) frames (the window), got {context}")
    return window, context


def denoise_steps(window: Optional[int], local_attn_window: Optional[int], frames: int) -> int:
    """Frames per denoising chunk: the (resolved) window, else ``local_attn_window``, else all frames (§12.4)."""
    return window or local_attn_window or frames


class DenoiseChunk(NamedTuple):
    """Frames ``[start, end)`` go through the denoiser; frames ``[write_from, end)`` take its output."""

    start: int
    end: int
    write_from: int


def denoise_plan(frames: int, steps: int, denoiser_window: Optional[int]) -> list[DenoiseChunk]:
    """Chunks of ``steps`` frames; later chunks overlap the previous by ``denoiser_window`` frames
    (None: steps − 1) and see already-denoised frames. Chunks that would write nothing are left out."""
    chunks, s, overlap = [], 0, 0
    while s < frames:
        chunks.append(DenoiseChunk(s, min(s + steps, frames), s + overlap))
        if s + steps >= frames:
            break
        overlap = denoiser_window if denoiser_window is not None else steps - 1
        if steps - overlap <= 0:
            raise InputError(f"denoising {frames} frames in chunks of window={steps} frames that overlap by "
                             f"denoiser_window={overlap} frames cannot advance: pass a window larger than "
                             f"{overlap} frames or denoise=False (CLI: --window, --no-denoise)")
        s += steps - overlap
    return chunks
