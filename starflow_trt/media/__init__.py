"""Media stages around the flow: the T5 text encoder, the Wan2.2 VAE, image/video I/O.

* :mod:`.text` — upstream's caption templates (spec §13), the flan-T5 encoder from a local
  Hugging Face directory, the ``text_encoder`` export wrapper.
* :mod:`.vae` — the Wan2.2 VAE (diffusers ``AutoencoderKLWan``) from upstream's
  ``Wan2.2_VAE.pth`` or a diffusers directory, latent normalisation (spec §14) and the
  cache-explicit ``vae_decode_first`` / ``vae_decode_step`` / ``vae_encode*`` wrappers.
* :mod:`.io` — image/video loading (resize to cover, centre crop, [-1, 1]) and
  the mp4 writer (clamp, truncate to uint8, H.264, frames appended as they are decoded).
* :mod:`.graphs` — the graph contracts (names, symbolic shapes, example inputs) of
  ``text_encoder`` and the ``vae_*`` graphs; :mod:`.export` exports one and runs it on ORT.
* :mod:`.tiny` — tiny random T5 / Wan VAE builders (tests, demos) and the flan-t5-xl dims.

transformers / diffusers are optional (the ``[media]`` extra); importing this package
does not import them.
"""
