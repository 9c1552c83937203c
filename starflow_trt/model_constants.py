"""STARFlow-V's fixed numbers (spec §1.2 "hard-coded constants", §1.3 the VAE): nothing configures them.

A leaf module beside the reference package rather than inside it: the config and the sampling core,
which the reference model imports, read them too, and a module inside ``reference/`` cannot be imported
without the whole reference package.
"""

#: Wan2.2 VAE (the one STARFlow-V uses): pixels per latent pixel along H and W
VAE_SPATIAL_FACTOR = 16
#: Wan2.2 VAE: pixel frames per latent frame after the first (``T = (F − 1) // 4 + 1``)
VAE_TEMPORAL_FACTOR = 4
#: ``c0`` of the softplus scale ``softplus(a + c0)``: softplus(c0) = 1, so a zero output scales by one
SOFTPLUS_OFFSET = 0.541324854612918
#: transformer layers of the learnable self-denoiser (spec §12.1)
DENOISER_LAYERS = 8
#: ``x − 0.3 · d(x, y)``: the sample-time denoising step, whatever ``noise_std`` (spec §12.3)
DENOISE_CONSTANT = 0.3
