"""The Wan2.2 VAE, by job — this module only re-exports them for importers not yet moved:

* :mod:`.vae_load`   dims, latent statistics, upstream key conversion, :func:`load_vae`
* :mod:`.latents`    :class:`LatentNorm`, latent draws and noise, image-to-video context latents
* :mod:`.vae_graphs` the cache plan and the exportable first / step / image graphs
* :mod:`.vae_stream` streaming decode over a first and a step graph, frame counts
"""

from .latents import LOGVAR_RANGE, LatentNorm, add_noise, context_latents, draw_latents
from .vae_graphs import (CacheEntry, CachePlan, VaeDecodeFirst, VaeDecodeStep, VaeEncode, VaeEncodeFirst,
                         VaeEncodeStep, probe_cache_plan)
from .vae_load import (WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, WAN22_VAE_CONFIG, convert_upstream_state_dict,
                       infer_vae_config, is_upstream_layout, load_vae, rename_upstream_key)
from .vae_stream import check_frame_count, decode_streaming

__all__ = ["CacheEntry", "CachePlan", "LOGVAR_RANGE", "LatentNorm", "VaeDecodeFirst", "VaeDecodeStep", "VaeEncode",
           "VaeEncodeFirst", "VaeEncodeStep", "WAN22_LATENTS_MEAN", "WAN22_LATENTS_STD", "WAN22_VAE_CONFIG",
           "add_noise", "check_frame_count", "context_latents", "convert_upstream_state_dict", "decode_streaming",
           "draw_latents", "infer_vae_config", "is_upstream_layout", "load_vae", "probe_cache_plan",
           "rename_upstream_key"]
