"""The sampling core: every sampling loop, check and formula, written once over a step function.

Both the PyTorch reference (:meth:`StarflowV.sample`, torch modules) and the runtime
(:meth:`Pipeline.generate`, exported graphs) drive these; neither has a loop of its own.

* :mod:`.plan`       what one call runs (:class:`SamplingPlan`, :func:`plan_sampling`); the reference's
  argument checks (:func:`check_request`)
* :mod:`starflow_trt.frame_plan` (torch-free, re-exported) the long-video window, its context, the denoising chunks
* :mod:`.block`      :class:`BlockModel` (the step function), text / context prefill, AR,
  the Jacobi driver with long-video windows and re-encoding (:class:`BlockInversion`)
* :mod:`.schedule`   what a Jacobi schedule sees of an inversion (:class:`Inversion`, :class:`Schedule`)
* :mod:`.jacobi`     the upstream, sliding and predictive schedules and their state (:func:`new_schedule`)
* :mod:`.context`    context prefill through the lower blocks
* :mod:`.denoise`    the denoising lookahead driver
* :mod:`.likelihood` NLL and bits/dim
* :mod:`.kv`         the one KV-cache type; :mod:`.options` ``BlockTrace`` (``JacobiConfig``: :mod:`starflow_trt.jacobi_config`)
"""

from .block import BlockInversion, BlockModel, Hooks, Solver
from .context import context_inputs
from ..frame_plan import DenoiseChunk, denoise_plan, denoise_steps, resolve_window
from .denoise import ChunkedDenoise, denoise_lookahead
from .kv import KVCache
from .likelihood import bits_per_dim, nll
from .options import SCHEDULES, BlockTrace, ChunkLog, JacobiConfig
from .plan import SamplerSpec, SamplingPlan, check_guidance, check_request, check_text, check_video, plan_sampling

__all__ = ["BlockInversion", "BlockModel", "BlockTrace", "ChunkLog", "ChunkedDenoise", "DenoiseChunk", "Hooks",
           "JacobiConfig", "KVCache", "SCHEDULES", "SamplerSpec", "SamplingPlan", "Solver", "bits_per_dim",
           "check_guidance", "check_request", "check_text", "check_video", "context_inputs", "denoise_lookahead",
           "denoise_plan", "denoise_steps", "nll", "plan_sampling", "resolve_window"]
