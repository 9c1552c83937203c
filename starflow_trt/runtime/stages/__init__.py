"""Runtime stages, one job each; :class:`~starflow_trt.runtime.Pipeline` wires them.

* :mod:`.blocks`   a step graph as the sampling core's :class:`~starflow_trt.sampling.BlockModel`
* :mod:`.context`  a given clip through the lower blocks' forward graphs (each block's input on it)
* :mod:`.deep`     the top block: text / context prefill, AR or Jacobi with long-video windows
* :mod:`.shallow`  the blocks below the top on finished frames (frames batched)
* :mod:`.denoiser` the learnable denoiser with its receptive-field lookahead
* :mod:`.text`     prompts → templated captions → tokenizer → ``text_encoder`` graph (or the bundled toy's words)
* :mod:`.vae`      latents ⇄ frames through the VAE graphs (streaming decode, chunked encode)
"""

from .context import context_inputs_of
from .deep import DeepStage
from .denoiser import DenoiserStage
from .shallow import ShallowStage
from .text import BundledToyText, TextStage
from .vae import VaeStage

__all__ = ["BundledToyText", "context_inputs_of", "DeepStage", "ShallowStage", "DenoiserStage", "TextStage", "VaeStage"]
