"""Generation and scoring over exported graphs: the product.

    pipe = Pipeline.from_dir(export_or_engine_dir, backend="ort", precision="fp32")
    result = pipe.run(build_request(pipe.summary, prompt=["a cat"], seed=0))   # the executor
    result = pipe.generate(y, y_uncond=None, noise=None, seed=0, num_frames=None,   # = run(build_request(...))
                           guidance=0.0, jacobi=JacobiConfig(...) or None,
                           context=None, denoise=True, on_frame=None,
                           should_stop=None, on_progress=None)
    result.latents      # [B,T,C,H,W]
    result.stats        # graph calls, Jacobi chunks, seconds per stage, time to first frame, the request
    nll, bpd = pipe.score(x, y)     # any B: chunks of max_batch

``run`` executes a :class:`~starflow_trt.request.GenerationRequest` (validated once, by
:func:`~starflow_trt.request.build_request`): prompts and image / video through the text and VAE
stages, then per chunk of ``max_batch`` rows a sampling plan (:mod:`starflow_trt.sampling`) and the
wired stages (:mod:`.stages`) of one per-call :class:`~.run.GenerateRun`, each handing its
result to the next: the context's block inputs (image / video conditioning), the deep block (text
prefill, AR or Jacobi, guidance on the doubled batch), the frame-local shallow blocks on every
finished frame (frames batched), then the denoiser with its receptive-field lookahead. Each
stage's seconds are its own (:class:`~.run.StageClock`).
The sampling loops and model maths live in ``sampling`` and ``reference``, never here.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import torch

from ..defaults import DEFAULT_SCHEDULE, DEFAULT_THREAD_POOL
from ..errors import InputError, ManifestError
from ..export import names as n
from ..export.manifest import Manifest, load_manifest
from ..geometry import Geometry
from ..reference.flow import patchify
from ..sampling import SCHEDULES, JacobiConfig, SamplerSpec, SamplingPlan, check_text, check_video, likelihood, plan_sampling
from .batching import chunk_bounds, merge_stats, rows
from .backends import THREAD_POOLS, Backend, GraphRunner, make_backend
from .graphs import DENOISER, GraphCalls, Graphs
from .kv import Workspace
from .run import FrameCallback, GenerateRun, ProgressCallback, StageClock
from .stages import BundledToyText, DeepStage, DenoiserStage, ShallowStage, TextStage, VaeStage, context_inputs_of
from .tensors import as_float32

if TYPE_CHECKING:
    from ..request import GenerationRequest
    from ..summary import ModelSummary


__all__ = ["Pipeline", "GenerateResult", "make_backend", "THREAD_POOLS", "DEFAULT_SCHEDULE", "SCHEDULES",
           "FrameCallback"]


@dataclass
class GenerateResult:
    """latents [B, T, C, H, W] (denoised when asked), ``raw`` before denoising, and stats;
    ``video`` [B, F, 3, 16H, 16W] uint8 when the export has VAE graphs (F = 1 + 4(T-1))."""

    latents: torch.Tensor
    raw: torch.Tensor
    stats: dict
    video: Optional[torch.Tensor] = None


def sampler_spec(geo: Geometry) -> SamplerSpec:
    """What an export accepts: its exact latent size, frame and batch limits, every schedule."""
    return SamplerSpec(channels=geo.channel_size, patch_size=geo.patch_size, text_length=geo.text_length,
                       text_width=geo.text_width, local_attn_window=geo.local_attn_window,
                       denoiser_window=geo.denoiser_window, size=(geo.height, geo.width), max_frames=geo.max_frames,
                       max_batch=geo.max_batch, schedules=SCHEDULES, default_schedule=DEFAULT_SCHEDULE)


class Pipeline:
    """Runs generation and scoring on the graphs of one export (or engine) directory.

    Long-lived: the loaded graphs, RoPE tables and the KV / scratch workspace (a call only
    allocates when it needs more room). One generate at a time per Pipeline: calls share the
    workspace and IO bindings; everything else of a call lives in its :class:`GenerateRun`.
    """

    def __init__(self, manifest: Manifest, backend: Backend):
        self.manifest = manifest
        self.backend = backend
        self.cfg = manifest.config
        self.geo = manifest.geometry
        self.graphs = Graphs(manifest, backend)
        self.spec = dataclasses.replace(sampler_spec(self.geo), residual_floor=manifest.residual_floor)
        self.workspace = Workspace(backend.device)
        self._text: Optional[TextStage] = None
        self._vae: Optional[VaeStage] = None
        self._summary = None

    @classmethod
    def from_dir(cls, directory: Union[str, os.PathLike], backend: str = "ort", precision: Optional[str] = None,
                 providers: Optional[Sequence] = None, checkpoint: Optional[Union[str, os.PathLike]] = None,
                 threads: Optional[int] = None, verify: bool = True, thread_pool: str = DEFAULT_THREAD_POOL,
                 device: Optional[str] = None, dtype: Optional[str] = None, cuda_graphs: bool = False) -> "Pipeline":
        """Load ``directory/manifest.json``; verify graph hashes; pick a backend.

        precision: expected precision of the directory (``None``: whatever it holds).
        providers: ORT execution providers (default CPU; ``"auto"``: best available).
        thread_pool: ``"session"`` (default: :data:`~starflow_trt.defaults.DEFAULT_THREAD_POOL`) or ``"shared"``:
        all ORT CPU sessions of the process share one pool (1-3 % faster end to end than the per-session pools,
        which spin only while they run; once on, every later ORT session of the process must share it, so ORT's
        quantization tools no longer run in that process).
        cuda_graphs (``trt``; ``torch`` on CUDA): capture each repeated call once and replay it.
        device / dtype (``backend="torch"``): ``"cpu"`` | ``"cuda[:N]"``; ``"fp32"`` | ``"fp16"`` | ``"bf16"``
        (None: the export's).
        """
        manifest = load_manifest(directory, verify=verify)
        if precision is not None and precision != manifest.precision:
            raise ManifestError(f"{directory} holds {manifest.precision} graphs, not {precision}; "
                                f"use `starflow-trt calibrate --precision {precision}` to make them")
        return cls(manifest, make_backend(backend, manifest, providers, checkpoint, threads, thread_pool, device, dtype,
                                          cuda_graphs))

    def close(self) -> None:
        """Release the backend (sessions, TensorRT contexts, CUDA graphs); the Pipeline is unusable after."""
        self.backend.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def runner(self, name: str) -> GraphRunner:
        """The loaded graph ``name`` (loaded once, shared by every call)."""
        return self.graphs.runner(name)

    # ---------------------------------------------------------------- media
    @property
    def text_stage(self) -> Union[TextStage, BundledToyText]:
        """The export's text encoder: its text_encoder graph, else the bundled toy's word encoder for a toy
        export (ManifestError if it has neither)."""
        if self._text is None:
            toy = not self.graphs.has(n.TEXT_ENCODER) and self.summary.prompt_encoder == "toy"
            self._text = BundledToyText() if toy else TextStage(self.graphs)
        return self._text

    @property
    def vae_stage(self) -> VaeStage:
        """The export's VAE graphs (ManifestError if it has none)."""
        if self._vae is None:
            self._vae = VaeStage(self.graphs)
        return self._vae

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str], fps: Optional[int] = None, aspect: Optional[str] = None,
                    negative_prompt: Optional[Sequence[str]] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts → (y, y_uncond) [B, L, D] each, with upstream's templates (fps / noise level / aspect as
        the export's template options say); y_uncond is the template around ``""`` (or the negative prompt)."""
        return self.text_stage.encode(prompts, fps=fps, aspect=aspect, negative=negative_prompt)

    @torch.no_grad()
    def decode(self, latents, on_frames: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
        """latents [B, T, z, h, w] (normalised, like ``generate``'s) → frames [B, 1+4(T-1), 3, 16h, 16w]
        in [-1, 1] (not clamped); ``on_frames(chunk)`` fires as each latent frame decodes."""
        with self.backend.host_thread_limit():
            return self.vae_stage.decode(latents, on_frames)

    @torch.no_grad()
    def encode_video(self, frames, sample: bool = False, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """frames [B, 1+4n, 3, H, W] in [-1, 1] → latents [B, 1+n, z, H/16, W/16], normalised and
        time-scaled like upstream (``sample=False``: the posterior mean)."""
        with self.backend.host_thread_limit():
            return self.vae_stage.encode_video(frames, sample=sample, generator=generator)

    # ------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(self, y=None, y_uncond=None, noise=None, seed: Union[int, Sequence[int]] = 0,
                 num_frames: Optional[int] = None, guidance: Optional[float] = None,
                 jacobi: Optional[JacobiConfig] = None, context=None,
                 denoise: bool = True, on_frame: Optional[FrameCallback] = None,
                 should_stop: Optional[Callable[[], bool]] = None,
                 on_progress: Optional[ProgressCallback] = None, *, prompt: Optional[Sequence[str]] = None,
                 negative_prompt: Optional[Sequence[str]] = None, image=None, video=None,
                 fps: Optional[int] = None, aspect: Optional[str] = None,
                 on_video: Optional[Callable[[torch.Tensor], None]] = None) -> GenerateResult:
        """``self.run(build_request(self.summary, ...))``: the request in Python's names, then the one executor.

        Text: ``prompt`` (B strings; an export with a text encoder, or the bundled toy) encoded with upstream's
        templates (``fps``, ``aspect``; ``negative_prompt`` for the unconditional rows), or embeddings y
        [B, L, D] with y_uncond [B, L, D] (guidance > 0). image (path or [h, w, 3] uint8) / video (path or
        [F, h, w, 3] uint8; VAE graphs): the context, encoded and noised from ``seed``; or ``context``
        latents [B, N, C, H, W]. noise [B, T, C, H, W] or drawn from ``seed`` (``num_frames`` frames, default
        the export's max; an int: the call's, chunk k of a batch beyond max_batch drawing from seed + k; a
        sequence: one seed per row, row b as a one-row call with ``seed[b]``). guidance None: the export's
        cfg with a prompt, else 0. jacobi None: autoregressive; a :class:`JacobiConfig` (``schedule`` None: the
        runtime's default). aspect: an exported aspect (None: the grid of the noise / context, else the
        export's default). The field rules and their errors are :func:`~starflow_trt.request.build_request`'s
        (its JSON names: ``text_embeddings`` for y, ``frames`` for num_frames); hooks as :meth:`run`'s.
        """
        from ..request import RequestError, build_request

        try:
            request = build_request(self.summary, prompt=prompt, negative_prompt=negative_prompt, text_embeddings=y,
                                    negative_embeddings=y_uncond, image=image, video=video, context_latents=context,
                                    noise=noise, seed=seed, frames=num_frames, aspect=aspect, fps=fps,
                                    guidance=guidance, sampler="autoregressive" if jacobi is None else "jacobi",
                                    jacobi=jacobi, denoise=denoise)
        except RequestError as exc:   # the error names this method's argument
            head, dot, rest = exc.field.partition(".")
            raise RequestError(_ARGUMENT_OF.get(head, head) + dot + rest, exc.reason) from None
        return self.run(request, on_frame=on_frame, should_stop=should_stop, on_progress=on_progress,
                        on_video=on_video)

    @torch.no_grad()
    def run(self, request: "GenerationRequest", on_frame: Optional[FrameCallback] = None,
            should_stop: Optional[Callable[[], bool]] = None, on_progress: Optional[ProgressCallback] = None,
            on_video: Optional[Callable[[torch.Tensor], None]] = None) -> GenerateResult:
        """The executor: every generation (the CLI, :meth:`generate`, the server) runs a validated
        :class:`~starflow_trt.request.GenerationRequest` here, and nothing here validates it again.

        Prompts and image / video go through the text and VAE stages first (:meth:`prepare`). Any batch:
        B > the export's ``max_batch`` runs in chunks of ``max_batch`` rows, one after the other; the result
        is their concatenation, exactly what running each chunk alone gives (a thresholded Jacobi stopping
        test averages over the rows of one chunk). With VAE graphs the latents are decoded as the flow
        finishes them into ``result.video`` uint8 [B, F, 3, 16H, 16W].

        on_frame(i, frame [B, C, H, W]) fires in order as soon as frame i is final (per chunk, indices
        restarting at 0); on_video(chunk [B, f, 3, 16H, 16W] in [-1, 1]) as frames decode;
        should_stop() is checked before every graph call and every emitted frame (True raises
        :class:`~starflow_trt.errors.GenerationCancelled`); on_progress(stage, done, total): ``("deep",
        tokens, tokens)``, ``("shallow" | "denoiser", frames, frames)`` and ``("batch", chunks done, chunks)``.
        """
        geo = self._request_geometry(request)
        r, seconds = self._prepare(request, geo)
        tensor = (lambda a: None if a is None else torch.from_numpy(a))
        y, y_uncond, noise, context = tensor(r.y), tensor(r.y_uncond), tensor(r.noise), tensor(r.context)
        spec = self._spec_on(geo)
        denoise = r.denoise and self.graphs.has(DENOISER)   # no denoiser graph: nothing to do
        bounds = chunk_bounds(r.batch, geo.max_batch)
        results = []
        for k, (start, end) in enumerate(bounds):
            plan = plan_sampling(spec, rows(y, start, end), rows(noise, start, end),
                                 y_uncond=rows(y_uncond, start, end), frames=r.frames, guidance=r.guidance,
                                 jacobi=r.jacobi_options, context=rows(context, start, end), denoise=denoise)
            chunk_seed = r.seed[start:end] if isinstance(r.seed, tuple) else r.seed + k
            results.append(self._generate(plan, None if noise is not None else chunk_seed, on_frame, should_stop,
                                          on_progress, on_video, geo))
            if len(bounds) > 1 and on_progress is not None:
                on_progress("batch", k + 1, len(bounds))
        result = results[0]
        if len(results) > 1:
            result = GenerateResult(latents=torch.cat([c.latents for c in results]),
                                    raw=torch.cat([c.raw for c in results]),
                                    stats=merge_stats([c.stats for c in results], r.batch),
                                    video=None if result.video is None else torch.cat([c.video for c in results]))
        if not request.encoded:
            stats = result.stats
            stats["seconds"].update(seconds)
            stats["request"]["prompt"] = {"fps": request.fps, "aspect": request.aspect,
                                          "image": request.image is not None, "video": request.video is not None}
        return result

    def prepare(self, request: "GenerationRequest") -> "GenerationRequest":
        """The request with its prompts encoded (y, y_uncond [B, L, D]) and its image / video encoded to context
        latents [B, N, C, H, W]: what :meth:`run` executes; the server encodes each request while earlier
        batches generate, then stacks them (:func:`~starflow_trt.request.stack_rows`)."""
        return self._prepare(request, self._request_geometry(request))[0]

    def _request_geometry(self, request: "GenerationRequest") -> Geometry:
        """The token grid of a request: its aspect's, else that of its noise / context latents."""
        return self._call_geometry(request.aspect, request.noise if request.noise is not None else request.context)

    def _prepare(self, r: "GenerationRequest", geo: Geometry) -> tuple["GenerationRequest", dict]:
        """(:meth:`prepare`'s request, seconds of its ``text`` and ``encode`` stages).

        The context noise comes from ``seed + 1`` (not the flow noise's stream): one draw for the call,
        or per row from ``seed[b] + 1``. Pixel-space models (no VAE, RGB latents) take the fitted image
        itself as the context frame plus ``noise_std`` noise.
        """
        if r.encoded:
            return r, {}
        start = time.perf_counter()
        y, y_uncond = r.y, r.y_uncond
        if r.prompts is not None:
            y, y_uncond = (t.numpy() for t in self.encode_text(r.prompts, fps=r.fps, aspect=r.aspect,
                                                               negative_prompt=r.negative_prompts))
        text_s = time.perf_counter() - start
        start = time.perf_counter()
        context = r.context
        if r.image is not None or r.video is not None:
            context = self._context(r.image, r.video, r.seed, r.batch, geo).numpy()
        encoded = dataclasses.replace(r, prompts=None, negative_prompts=None, image=None, video=None, y=y,
                                      y_uncond=y_uncond if r.guidance > 0 else None, context=context)
        return encoded, {"text": round(text_s, 6), "encode": round(time.perf_counter() - start, 6)}

    @property
    def summary(self) -> "ModelSummary":
        """What this export serves (sizes, aspects, media graphs): what requests are validated against."""
        if self._summary is None:
            from ..summary import ModelSummary

            self._summary = ModelSummary.from_manifest(self.manifest)
        return self._summary

    def _generate(self, req: SamplingPlan, seed: Union[None, int, tuple[int, ...]], on_frame: Optional[FrameCallback],
                  should_stop: Optional[Callable[[], bool]], on_progress: Optional[ProgressCallback],
                  on_video: Optional[Callable[[torch.Tensor], None]] = None,
                  geo: Optional[Geometry] = None) -> GenerateResult:
        """One call of at most ``max_batch`` rows on token grid ``geo`` (default: the export's); seed None:
        the request's noise. With VAE graphs the final latent frames stream through the decoder
        (``result.video``)."""
        clock = StageClock()
        decoder = self._decoder(on_video, clock) if self.graphs.has(n.VAE_DECODE_FIRST) else None
        if decoder is not None:
            on_frame = _chain(on_frame, decoder.push)
        g = geo or self.geo
        shape = (req.frames, g.channel_size, g.height, g.width)
        noise = req.noise if seed is None else draw(seed, req.batch, shape)
        run = GenerateRun(self.graphs.on_grid(g), self.workspace, req, noise, on_frame, on_progress, should_stop,
                          info={"seed": list(seed) if isinstance(seed, tuple) else seed,
                                "noise": "given" if seed is None else "seed"}, clock=clock)
        with self.backend.host_thread_limit():
            latents, raw = self._execute(run)
        stats = run.stats()
        result = GenerateResult(latents=latents, raw=raw, stats=stats)
        if decoder is not None:
            result.video = decoder.video()
            stats["time_to_first_decoded_frame"] = round(decoder.first_s - run.start, 6)
        return result

    def _spec_on(self, geo: Geometry) -> SamplerSpec:
        """This export's sampler spec on one of its grids (the residual floor is the export's)."""
        return dataclasses.replace(sampler_spec(geo), residual_floor=self.spec.residual_floor)

    def _call_geometry(self, aspect: Optional[str], latents=None) -> Geometry:
        """The token grid of one call: ``aspect``'s, else that of ``latents`` [B, T, C, H, W] when it is an
        exported grid, else the default. Exports without named aspects have one grid."""
        g = self.geo
        if aspect is not None and g.aspects:
            return g.for_aspect(aspect)
        shape = getattr(latents, "shape", None)
        if shape is not None and len(shape) == 5 and len(g.grids) > 1:
            return g.grid_for_size(int(shape[-2]), int(shape[-1])) or g
        return g

    def _context(self, image, video, seeds: Union[int, tuple[int, ...]], batch: int, g: Geometry) -> torch.Tensor:
        """Image / video → noisy context latents [batch, N, C, H, W] on grid ``g`` (see :meth:`_prepare`)."""
        from ..media.io import prepare_image, prepare_video

        if not self.graphs.has(n.VAE_DECODE_FIRST):
            if self.cfg.vae or g.channel_size != 3 or video is not None:
                raise InputError("image / video conditioning needs VAE graphs; re-export with --vae or pass context "
                                 "latents")
            clip = prepare_image(image, g.height, g.width)             # [1, 1, 3, H, W]: the latents are pixels
            noisy = lambda gen: clip + g.noise_std * torch.randn(clip.shape, generator=gen)   # noqa: E731
        else:
            from ..media.latents import context_latents

            vae = self.vae_stage
            H, W = g.height * vae.spatial, g.width * vae.spatial
            clip = prepare_image(image, H, W) if image is not None else prepare_video(
                video, H, W, max_frames=1 + vae.temporal * (g.max_frames - 1))
            with self.backend.host_thread_limit():
                mean, logvar = vae.moments(clip)
            noisy = lambda gen: context_latents(mean, logvar, vae.norm, g.noise_std, gen)   # noqa: E731
        if not isinstance(seeds, tuple):
            return noisy(torch.Generator().manual_seed(int(seeds) + 1)).expand(batch, -1, -1, -1, -1)
        return torch.cat([noisy(torch.Generator().manual_seed(s + 1)) for s in seeds])

    def _decoder(self, on_video, clock: StageClock) -> "_VideoSink":
        return _VideoSink(self.vae_stage, on_video, clock)

    @staticmethod
    def _execute(run: GenerateRun) -> tuple[torch.Tensor, torch.Tensor]:
        """Wire the stages: context → deep → shallow → denoiser, streaming frames through as they finish.

        Each stage hands its result to the next: the context's block inputs to the deep (its prefix)
        and shallow (its frames) stages, the deep output to the shallow stage, its raw latents to the
        denoiser. Returns (latents, raw) [B, T, C, H, W] on the CPU.
        """
        ctx = context_inputs_of(run)
        shallow = ShallowStage(run, None if ctx is None else ctx[0])
        denoiser = DenoiserStage(run, shallow.out)

        def deep_frames(done: int, deep_out: torch.Tensor) -> None:
            if run.geo.frame_local and (run.stream or done == run.frames):
                denoiser.upto(shallow.upto(done, deep_out))

        deep_out = DeepStage(run, None if ctx is None else ctx[-1], deep_frames)()
        denoiser.upto(shallow.upto(run.frames, deep_out))
        return run.latents(denoiser.out), run.latents(shallow.out)

    # --------------------------------------------------------------- score
    @torch.no_grad()
    def score(self, x, y, on_progress: Optional[ProgressCallback] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample NLL (nats/dim, no Gaussian constant) and bits/dim through the forward graphs.

        x [B, T, C, H, W] latents, y [B, L, D] → (nll [B], bpd [B]). Any B: chunks of at most the
        export's ``max_batch`` rows (every row's score is independent of the others');
        on_progress("batch", chunks done, chunks) after every chunk.
        """
        x = as_float32(x, "x")
        g = self._call_geometry(None, x)   # any exported grid
        check_video(x, self._spec_on(g), "x")
        y = as_float32(y, "y")
        check_text(y, self.spec, x.shape[0], "y")
        if x.shape[1] > g.max_frames:
            raise InputError(f"score supports frames <= {g.max_frames} for this export, got {x.shape[1]} frames; "
                             "score shorter clips or re-export with --max-frames")
        bounds = chunk_bounds(x.shape[0], g.max_batch)
        nlls = []
        for k, (start, end) in enumerate(bounds):
            nlls.append(self._score(x[start:end], y[start:end], g))
            if on_progress is not None:
                on_progress("batch", k + 1, len(bounds))
        nll = torch.cat(nlls)
        return nll.float().cpu(), likelihood.bits_per_dim(nll).float().cpu()

    def _score(self, x: torch.Tensor, y: torch.Tensor, geo: Optional[Geometry] = None) -> torch.Tensor:
        """NLL [b] (float64) of at most ``max_batch`` rows x [b, T, C, H, W], y [b, L, D] on grid ``geo``."""
        g = geo or self.geo
        calls = GraphCalls(self.graphs.on_grid(g))
        h = patchify(x, g.patch_size).contiguous().to(self.backend.device)
        y = y.to(self.backend.device)
        logdets = []
        for k in range(g.num_blocks):
            if k not in g.identity_blocks:
                h, logdet = calls.forward(k, h, y if k == g.top_index else None)
                logdets.append(logdet)
        return likelihood.nll(h, logdets, torch.float64).cpu()


#: ``generate``'s argument of each request field it renames
_ARGUMENT_OF = {"text_embeddings": "y", "negative_embeddings": "y_uncond", "frames": "num_frames",
                "context_latents": "context", "sampler": "jacobi"}


def draw(seed: Union[int, tuple[int, ...]], batch: int, shape: Sequence[int]) -> torch.Tensor:
    """Noise [batch, *shape] from ``seed``: one generator for the call, or one per row (a tuple of seeds)."""
    if isinstance(seed, tuple):
        return torch.cat([torch.randn(1, *shape, generator=torch.Generator().manual_seed(s)) for s in seed])
    return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(int(seed)))


def _chain(first: Optional[FrameCallback], then: FrameCallback) -> FrameCallback:
    def both(index: int, frame: torch.Tensor) -> None:
        if first is not None:
            first(index, frame)
        then(index, frame)

    return both


class _VideoSink:
    """Decodes final latent frames as they come (one VAE step each) and keeps the uint8 video; the
    decode is timed as its own stage, ``decode``, on the call's clock."""

    def __init__(self, stage: VaeStage, on_video: Optional[Callable[[torch.Tensor], None]], clock: StageClock):
        self.chunks: list[torch.Tensor] = []
        self.on_video, self.clock = on_video, clock
        self.first_s: Optional[float] = None
        self.decoder = stage.decoder(self._chunk)

    def _chunk(self, frames: torch.Tensor) -> None:
        from ..media.io import frames_to_uint8

        if self.first_s is None:
            self.first_s = time.perf_counter()
        self.chunks.append(torch.from_numpy(frames_to_uint8(frames)).movedim(-1, -3))
        if self.on_video is not None:
            with self.clock.stage("output"):
                self.on_video(frames)

    def push(self, index: int, frame: torch.Tensor) -> None:
        with self.clock.stage("decode"):
            self.decoder.push(index, frame)

    def video(self) -> torch.Tensor:
        return torch.cat(self.chunks, 1)
