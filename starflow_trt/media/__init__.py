"""Media stages around the flow: the T5 text encoder, the Wan2.2 VAE, image/video I/O.

* :mod:`.text` — upstream's caption templates (spec §13), the flan-T5 encoder from a local
  Hugging Face directory, the ``text_encoder`` export wrapper.
* the Wan2.2 VAE (diffusers ``AutoencoderKLWan``), one module per job: :mod:`.vae_load` (its
  dims, loading upstream's ``Wan2.2_VAE.pth`` or a diffusers directory), :mod:`.latents`
  (latent normalisation, draws and noise, spec §14), :mod:`.vae_graphs` (the cache-explicit
  ``vae_decode_first`` / ``vae_decode_step`` / ``vae_encode*`` wrappers), :mod:`.vae_stream`
  (streaming decode, frame counts).
* :mod:`.images` — image bytes in and out (Pillow, no torch: the HTTP ingress uses it).
* :mod:`.io` — image/video loading (resize to cover, centre crop, [-1, 1]), the float → uint8
  rule of every output (clamp, round) and its one mp4 writer (H.264, frames appended as they are decoded).
* :mod:`.graphs` — the graph contracts (names, symbolic shapes, example inputs) of
  ``text_encoder`` (T5 or the toy's word table) and the ``vae_*`` graphs; their graph kinds
  (:mod:`starflow_trt.export.media_kinds`) export them with the one exporter.
* :mod:`.tiny` — tiny random T5 / Wan VAE builders (tests, demos) and the flan-t5-xl dims.

transformers / diffusers are optional (the ``[media]`` extra); importing this package
does not import them.
"""
