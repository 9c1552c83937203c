"""Generation and scoring over exported graphs: the product.

    pipe = Pipeline.from_dir(export_or_engine_dir, backend="ort", precision="fp32")
    result = pipe.generate(y, y_uncond=None, noise=None, seed=0, num_frames=None,
                           guidance=0.0, jacobi=JacobiConfig(...) or None,
                           context=None, denoise=True, on_frame=None)
    result.latents      # [B,T,C,H,W]
    result.stats        # graph calls, Jacobi iterations per chunk, seconds per stage, time to first frame
    nll, bpd = pipe.score(x, y)

The loop drives the graphs the way the reference sampler drives the PyTorch
model (spec §9-§12): deep block (text prefill, AR or Jacobi, guidance on the
doubled batch), frame-local shallow blocks on every finished frame (frames
batched), then the denoiser with its receptive-field lookahead. Model maths
(guidance, permutations, RoPE tables) is imported from ``reference``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from ..config import DENOISE_CONSTANT, DENOISER_LAYERS
from ..errors import BackendUnavailable, InputError, ManifestError
from ..export.manifest import Manifest, load_manifest
from ..reference.flow import guide, patchify, permute_tokens, unpatchify, unpermute_tokens
from ..reference.rope import rope_table
from ..reference.sampler import ChunkLog, JacobiConfig, upstream_jacobi_phase
from .backends.base import Backend, CallStats, GraphRunner
from .kv import KVCache, Workspace

#: The runtime's default Jacobi schedule (``"upstream"`` reproduces upstream exactly).
DEFAULT_SCHEDULE = "sliding"
SCHEDULES = ("upstream", "sliding")
FrameCallback = Callable[[int, torch.Tensor], None]


@dataclass
class GenerateResult:
    """latents [B, T, C, H, W] (denoised when asked), ``raw`` before denoising, and stats."""

    latents: torch.Tensor
    raw: torch.Tensor
    stats: dict


@dataclass
class _BlockRun:
    """What one block inversion did, for ``stats``."""

    name: str
    calls: int = 0
    tokens: int = 0
    chunks: list[ChunkLog] = field(default_factory=list)
    scale: Optional[torch.Tensor] = None   # sliding schedule: latest (a, b) per position [B', N, c]
    shift: Optional[torch.Tensor] = None
    known: int = 0                          # positions [0, known) have (a, b)


def _as_tensor(value, name: str) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        raise InputError(f"{name} must be a numpy array or torch tensor, got {type(value).__name__}")
    return value.detach().to("cpu", torch.float32).contiguous()


THREAD_POOLS = ("session", "shared")


def make_backend(kind: str, manifest: Manifest, providers=None, checkpoint=None, threads=None,
                 thread_pool: str = "session") -> Backend:
    """Backend by name: ``ort`` | ``torch`` | ``trt``. ``thread_pool`` (ort): ``session`` | ``shared``."""
    if thread_pool not in THREAD_POOLS:
        raise InputError(f"unknown thread pool {thread_pool!r}: choose {' or '.join(THREAD_POOLS)}")
    if kind == "ort":
        from .backends.ort_backend import OrtBackend

        return OrtBackend(providers=providers, threads=threads, shared_pool=thread_pool == "shared")
    if kind == "torch":
        from .backends.torch_backend import TorchBackend

        return TorchBackend(manifest, checkpoint)
    if kind == "trt":
        try:
            from .backends.trt_backend import TrtBackend
        except ImportError as exc:
            raise BackendUnavailable(f"backend 'trt' is not available here ({exc}); "
                                     "install 'starflow-trt[gpu]' on a machine with an NVIDIA GPU") from exc
        return TrtBackend(manifest)
    raise InputError(f"unknown backend {kind!r}: choose ort, torch or trt")


class Pipeline:
    """Runs generation and scoring on the graphs of one export (or engine) directory."""

    def __init__(self, manifest: Manifest, backend: Backend):
        self.manifest = manifest
        self.backend = backend
        self.cfg = manifest.config
        self.geo = manifest.geometry
        self._runners: dict[str, GraphRunner] = {}
        self._ropes: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        # KV caches and scratch live across calls: a call only allocates when it needs more room
        self.workspace = Workspace(backend.device)
        self.kv_allocations = 0  # buffers allocated by the last generate call

    @classmethod
    def from_dir(cls, directory: Union[str, os.PathLike], backend: str = "ort", precision: Optional[str] = None,
                 providers: Optional[Sequence] = None, checkpoint: Optional[Union[str, os.PathLike]] = None,
                 threads: Optional[int] = None, verify: bool = True, thread_pool: str = "session") -> "Pipeline":
        """Load ``directory/manifest.json``; verify graph hashes; pick a backend.

        precision: expected precision of the directory (``None``: whatever it holds).
        providers: ORT execution providers (default CPU; ``"auto"``: best available).
        thread_pool: ``"session"`` (default) or ``"shared"``: all ORT CPU sessions of the process
        share one spinning pool (measured faster end to end; once on, every later ORT session of
        the process must share it, so ORT's quantization tools no longer run in that process).
        """
        manifest = load_manifest(directory, verify=verify)
        if precision is not None and precision != manifest.precision:
            raise ManifestError(f"{directory} holds {manifest.precision} graphs, not {precision}; "
                                f"use `starflow-trt calibrate --precision {precision}` to make them")
        return cls(manifest, make_backend(backend, manifest, providers, checkpoint, threads, thread_pool))

    # ------------------------------------------------------------ plumbing
    def runner(self, name: str) -> GraphRunner:
        if name not in self._runners:
            self._runners[name] = self.backend.load(self.manifest.graph(name))
        return self._runners[name]

    def _call(self, name: str, inputs: dict, outputs: dict) -> None:
        self._stats.timed(self.runner(name), inputs, outputs)

    def _sos(self, block: int) -> torch.Tensor:
        name = "deep_step" if block == self.geo.top_index else f"shallow_step_{block}"
        values = self.manifest.graph(name).extra.get("sos")
        if values is None:
            raise ManifestError(f"graph {name!r} has no 'sos' vector in the manifest; re-export")
        return torch.tensor(values, dtype=torch.float32, device=self.backend.device)

    def _rope(self, frames: int, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin) [rows, hd] on the backend's device (computed once per shape)."""
        key = (frames, text_len)
        if key not in self._ropes:
            g = self.geo
            self._ropes[key] = rope_table(g.head_dim, frames, g.h, g.w, text_len, g.rope_length,
                                          device=self.backend.device)
        return self._ropes[key]

    # -------------------------------------------------------------- checks
    def _check_text(self, y: torch.Tensor, batch: Optional[int], name: str) -> None:
        L, D = self.geo.text_length, self.geo.text_width
        if y.dim() != 3 or y.shape[1] != L or y.shape[2] != D or (batch is not None and y.shape[0] != batch):
            want = f"[{batch if batch is not None else 'B'}, {L}, {D}]"
            raise InputError(f"{name} must be text embeddings {want} (length {L}, width {D}), got {tuple(y.shape)}")
        if not torch.isfinite(y).all():
            raise InputError(f"{name} contains NaN or Inf; check the text encoder output")

    def _check_video(self, x: torch.Tensor, name: str) -> None:
        g = self.geo
        want = (g.channel_size, g.height, g.width)
        if x.dim() != 5 or tuple(x.shape[2:]) != want:
            raise InputError(f"{name} must be [B, T, {want[0]}, {want[1]}, {want[2]}] (the exported geometry), "
                             f"got {tuple(x.shape)}")
        if not torch.isfinite(x).all():
            raise InputError(f"{name} contains NaN or Inf")

    def _window(self, jacobi: Optional[JacobiConfig], frames: int) -> Optional[int]:
        window = (jacobi.window if jacobi is not None and jacobi.window else self.geo.local_attn_window)
        if window is not None and frames <= window:
            return None
        max_frames = self.geo.max_frames
        if window is None and frames > max_frames:
            raise InputError(f"{frames} latent frames exceed the {max_frames} this export supports without an "
                             "attention window; re-export with --max-frames or use a Jacobi window")
        if window is not None and jacobi is None:
            raise InputError(f"{frames} frames exceed the attention window of {window} frames; autoregressive "
                             "sampling has no window: use Jacobi sampling or fewer frames")
        if window is not None and window > max_frames:
            raise InputError(f"window of {window} frames exceeds the export's max_frames {max_frames}; re-export")
        return window

    # ------------------------------------------------------------ generate
    @torch.no_grad()
    def generate(self, y, y_uncond=None, noise=None, seed: int = 0, num_frames: Optional[int] = None,
                 guidance: float = 0.0, jacobi: Optional[JacobiConfig] = None, context=None,
                 denoise: bool = True, on_frame: Optional[FrameCallback] = None,
                 should_stop: Optional[Callable[[], bool]] = None) -> GenerateResult:
        """Sample latents [B, T, C, H, W] for text embeddings y [B, L, D].

        noise [B, T, C, H, W] or drawn from ``seed``; guidance > 0 needs y_uncond [B, L, D];
        jacobi None → autoregressive, else ``jacobi.schedule`` (None → the runtime default);
        context [B, N, C, H, W]: N given (noisy) latent frames to continue from; on_frame(i, frame
        [B, C, H, W]) fires in order as soon as frame i is final.
        """
        start = time.perf_counter()
        self._stats = CallStats()
        g = self.geo  # one generate at a time per Pipeline: calls share its workspace and IO bindings
        y = _as_tensor(y, "y")
        self._check_text(y, None, "y")
        batch = y.shape[0]
        if batch > g.max_batch:
            raise InputError(f"batch {batch} exceeds the export's max_batch {g.max_batch}; re-export with --max-batch")
        w = float(guidance)
        if w < 0:
            raise InputError(f"guidance must be >= 0, got {guidance}")
        if w > 0:
            if y_uncond is None:
                raise InputError("guidance > 0 needs y_uncond: the empty-prompt embeddings [B, L, D]")
            y_uncond = _as_tensor(y_uncond, "y_uncond")
            self._check_text(y_uncond, batch, "y_uncond")
        if noise is not None:
            noise = _as_tensor(noise, "noise")
            self._check_video(noise, "noise")
            if noise.shape[0] != batch:
                raise InputError(f"noise has batch {noise.shape[0]}, y has {batch}")
            if num_frames is not None and num_frames != noise.shape[1]:
                raise InputError(f"num_frames={num_frames} but noise has {noise.shape[1]} frames")
        else:
            frames = num_frames or g.max_frames
            if frames < 1:
                raise InputError(f"num_frames must be >= 1, got {frames}")
            gen = torch.Generator().manual_seed(int(seed))
            noise = torch.randn(batch, frames, g.channel_size, g.height, g.width, generator=gen)
        frames = noise.shape[1]
        window = self._window(jacobi, frames)
        schedule = None
        if jacobi is not None:
            schedule = jacobi.schedule or DEFAULT_SCHEDULE
            if schedule not in SCHEDULES:
                raise InputError(f"unknown Jacobi schedule {schedule!r}: choose {', '.join(SCHEDULES)}")
        n_ctx = 0
        if context is not None:
            context = _as_tensor(context, "context")
            self._check_video(context, "context")
            if context.shape[0] != batch or context.shape[1] >= frames:
                raise InputError(f"context must be [B={batch}, N < {frames}, C, H, W], got {tuple(context.shape)}")
            n_ctx = context.shape[1]
        if denoise and "denoiser" not in self.manifest.graphs:
            denoise = False  # model without a learnable denoiser
        run = _GenerateRun(self, y, y_uncond if w > 0 else None, noise, w, jacobi, schedule, window,
                           context, n_ctx, denoise, on_frame, start)
        run.should_stop = should_stop  # [serving stub] minimal cancellation hook; superseded at merge
        with self.backend.host_thread_limit():
            latents, raw = run.execute()
        stats = run.stats()
        self.kv_allocations = run.allocations
        return GenerateResult(latents=latents, raw=raw, stats=stats)

    # --------------------------------------------------------------- score
    @torch.no_grad()
    def score(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample NLL (nats/dim, no Gaussian constant) and bits/dim through the forward graphs.

        x [B, T, C, H, W] latents, y [B, L, D] → (nll [B], bpd [B]).
        """
        self._stats = CallStats()
        g = self.geo
        x = _as_tensor(x, "x")
        self._check_video(x, "x")
        y = _as_tensor(y, "y")
        self._check_text(y, x.shape[0], "y")
        if x.shape[0] > g.max_batch or x.shape[1] > g.max_frames:
            raise InputError(f"score supports batch <= {g.max_batch} and frames <= {g.max_frames} "
                             f"for this export, got {tuple(x.shape[:2])}")
        dev = self.backend.device
        h = patchify(x, g.patch_size).contiguous().to(dev)
        y = y.to(dev)
        b, t = h.shape[:2]
        logdet_sum = torch.zeros(b, dtype=torch.float64, device=dev)
        for k in range(g.num_blocks):
            if k in g.identity_blocks:
                continue
            top = k == g.top_index
            local = g.frame_local and not top
            cos, sin = self._rope(1 if local else t, g.text_length if top else 0)
            z = torch.empty_like(h)
            logdet = torch.empty((b, t, g.tokens_per_frame, h.shape[-1]) if local else
                                 (b, t * g.tokens_per_frame, h.shape[-1]), dtype=torch.float32, device=dev)
            inputs = {"x": h, "rope_cos": cos.contiguous(), "rope_sin": sin.contiguous()}
            if top:
                inputs["text"] = y
            self._call(f"forward_{k}", inputs, {"z": z, "logdet": logdet})
            logdet_sum += logdet.double().flatten(1).mean(1)
            h = z
        nll = 0.5 * h.double().pow(2).flatten(1).mean(1) - logdet_sum
        bpd = (nll + 0.5 * math.log(2 * math.pi)) / math.log(2)
        return nll.float().cpu(), bpd.float().cpu()


class _GenerateRun:
    """State of one generate call (buffers allocated once in ``__init__``)."""

    def __init__(self, pipe: Pipeline, y, y_uncond, noise, w, jacobi, schedule, window, context, n_ctx,
                 denoise, on_frame, start):
        self.pipe, self.geo, self.cfg = pipe, pipe.geo, pipe.cfg
        self.y, self.w, self.jacobi, self.schedule, self.window = y, w, jacobi, schedule, window
        self.context, self.n_ctx, self.denoise, self.on_frame = context, n_ctx, denoise, on_frame
        self.start = start
        self.seconds: dict[str, float] = {"prefill": 0.0, "deep": 0.0, "shallow": 0.0, "denoiser": 0.0}
        self.first_frame_s: Optional[float] = None
        self.runs: list[_BlockRun] = []
        g = self.geo
        self.batch, self.frames = noise.shape[:2]
        self.device = dev = pipe.backend.device
        self.y = y.to(dev)
        self.text = (torch.cat([y, y_uncond]) if w > 0 else y).to(dev)
        self.bp = self.text.shape[0]
        self.F = g.tokens_per_frame
        self.c = g.token_channels
        self.L = g.text_length
        self.x = patchify(noise, g.patch_size).contiguous().to(dev)  # [B, T, h, w, c]
        self.n_tokens = self.frames * self.F
        top = g.blocks[g.top_index]
        cap = self.L + (window * self.F if window else self.n_tokens)
        self.ws = pipe.workspace
        allocated_before = self.ws.allocations
        hd = g.head_dim
        self.ws.reserve("deep_kv", cap * top.layers * 2 * self.bp * top.heads * hd, torch.float32)
        shallow = [g.blocks[k] for k in g.shallow_blocks]
        seqs = self.batch * (self.frames if g.frame_local else 1)
        s_len = self.F if g.frame_local else self.n_tokens
        if shallow:
            per_slot = max(b.layers * b.heads for b in shallow) * 2 * hd
            self.ws.reserve("shallow_kv", s_len * per_slot * seqs, torch.float32)
        max_s = max(self.n_tokens, self.F * max(n_ctx, 1))
        self.ws.reserve("scale", max_s * max(self.bp, seqs) * self.c, torch.float32)
        self.ws.reserve("shift", max_s * max(self.bp, seqs) * self.c, torch.float32)
        self.allocations = self.ws.allocations - allocated_before
        self.deep_kv = KVCache(self.ws.view("deep_kv", (top.layers, 2, cap, self.bp, top.heads, hd)))
        self.cos, self.sin = pipe._rope(self.frames, self.L)
        self.deep_out = torch.empty_like(self.x)   # channels-last deep output [B, T, h, w, c]
        self.shallow_out = torch.empty_like(self.x)
        self.final = torch.empty_like(self.x)
        self.frames_deep = 0      # frames final after the deep block
        self.frames_shallow = 0   # frames final after the shallow blocks
        self.frames_emitted = 0
        self._nested = 0.0  # seconds of shallow/denoiser work run from inside the deep loop (streaming)
        self.ctx_inputs: list[torch.Tensor] = []
        # Frames go through the shallow blocks as soon as they are final only when the caller
        # streams (on_frame): one batch of all frames needs far fewer graph calls. Upstream's
        # stopping test averages over every sequence of a shallow batch (all frames), so the
        # upstream-exact thresholded schedule always inverts all frames in one batch.
        self.stream = on_frame is not None and not (jacobi is not None and schedule == "upstream"
                                                    and jacobi.threshold > 0)

    # ------------------------------------------------------------ driver
    def execute(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.geo
        self._denoise_plan()
        self._deep()
        self._shallow_upto(self.frames)
        self._denoise_upto(self.frames)
        raw = unpatchify(self.shallow_out, g.patch_size)
        final = unpatchify(self.final if self.denoise else self.shallow_out, g.patch_size)
        return final.cpu(), raw.cpu()

    def stats(self) -> dict:
        st = self.pipe._stats
        return {
            "graph_calls": dict(st.calls), "graph_seconds": {k: round(v, 6) for k, v in st.seconds.items()},
            "total_graph_calls": sum(st.calls.values()),
            "seconds": {**{k: round(v, 6) for k, v in self.seconds.items()},
                        "total": round(time.perf_counter() - self.start, 6)},
            "time_to_first_frame": None if self.first_frame_s is None else round(self.first_frame_s, 6),
            "jacobi": [{"block": r.name, "calls": r.calls, "tokens": r.tokens,
                        "chunks": [{"start": c.start, "length": c.length, "iterations": c.iterations,
                                    "delta": c.delta} for c in r.chunks]} for r in self.runs],
            "schedule": self.schedule or "autoregressive", "backend": self.pipe.backend.describe(),
            "frames": self.frames, "batch": self.batch, "guidance": self.w,
        }

    # ---------------------------------------------------------- deep block
    def _prefill_text(self) -> None:
        L = self.L
        t0 = time.perf_counter()
        kv = self.deep_kv
        kv.idx = 0
        self.pipe._call("deep_prefill", {"text": self.text, "rope_cos": self.cos[:L].contiguous(),
                                          "rope_sin": self.sin[:L].contiguous()}, kv.slots(L))
        kv.idx = L
        self.seconds["prefill"] += time.perf_counter() - t0

    def _deep(self) -> None:
        g = self.geo
        top = g.top_index
        perm = g.blocks[top].permutation
        x = torch.cat([self.x, self.x]) if self.w > 0 else self.x
        seq = permute_tokens(x, perm).contiguous()          # ζ [B', N, c]
        self._prefill_text()
        t0 = time.perf_counter()
        start = 0
        work = torch.empty(self.bp, self.n_tokens + 1, self.c, device=self.device)
        work[:, 0] = self.pipe._sos(top)
        work[:, 1:] = seq
        if self.context is not None:
            prefix = self._context_prefill(perm)
            work[:, 1 : 1 + prefix.shape[1]] = prefix
            start = prefix.shape[1]
        self.seconds["deep"] += time.perf_counter() - t0
        streamable = perm != "flip"
        run = _BlockRun("deep_step")
        self.runs.append(run)

        def progress(done_tokens: int) -> None:
            if streamable:
                self._frames_ready(done_tokens // self.F, work, perm)

        t0 = time.perf_counter()
        self._invert("deep_step", run, work, seq, self.deep_kv, self.w, frames=self.frames,
                     text_len=self.L, start=start, window=self.window, progress=progress)
        self.seconds["deep"] += time.perf_counter() - t0 - self._nested
        self._frames_ready(self.frames, work, perm)

    def _frames_ready(self, frames_done: int, work: torch.Tensor, perm: str) -> None:
        """Deep block finished frames [0, frames_done): publish them and run the later stages."""
        if frames_done <= self.frames_deep:
            return
        t0 = time.perf_counter()
        out = work[: self.batch, 1:]
        lo, hi = self.frames_deep, frames_done
        if perm == "flip":
            full = unpermute_tokens(out.contiguous(), perm, self.x.shape)
            self.deep_out.copy_(full)
        else:
            part = out[:, lo * self.F : hi * self.F].reshape(self.batch, hi - lo, self.geo.h, self.geo.w, self.c)
            if perm == "flip_within_frame":
                part = unpermute_tokens(part.reshape(self.batch, -1, self.c), perm, part.shape)
            self.deep_out[:, lo:hi] = part
        self.frames_deep = frames_done
        if self.geo.frame_local and (self.stream or frames_done == self.frames):
            self._shallow_upto(frames_done)
            self._denoise_upto(self.frames_shallow)
        self._nested += time.perf_counter() - t0

    def _context_prefill(self, perm: str) -> torch.Tensor:
        """Shallow forward graphs on the context, then the deep K/V of its tokens (spec §11)."""
        g = self.geo
        t0 = time.perf_counter()
        h = patchify(self.context, g.patch_size).contiguous().to(self.device)
        n = h.shape[1]
        self.ctx_inputs = [h]
        for k in range(g.num_blocks - 1):
            if k in g.identity_blocks:
                self.ctx_inputs.append(h)
                continue
            local = g.frame_local
            cos, sin = self.pipe._rope(1 if local else n, 0)
            z = torch.empty_like(h)
            shape = (h.shape[0], n, self.F, self.c) if local else (h.shape[0], n * self.F, self.c)
            self.pipe._call(f"forward_{k}", {"x": h, "rope_cos": cos.contiguous(), "rope_sin": sin.contiguous()},
                            {"z": z, "logdet": torch.empty(shape, device=self.device)})
            h = z
            self.ctx_inputs.append(h)
        hh = torch.cat([h, h]) if self.w > 0 else h
        prefix = permute_tokens(hh, perm).contiguous()      # [B', n·F, c]
        kv = self.deep_kv
        s = prefix.shape[1]
        tokens = torch.cat([self.pipe._sos(g.top_index).expand(self.bp, 1, self.c), prefix[:, :-1]], 1)
        rows = slice(kv.idx, kv.idx + s)
        self.pipe._call("deep_step", {"tokens": tokens.contiguous(), **kv.past(),
                                      "rope_cos": self.cos[rows].contiguous(), "rope_sin": self.sin[rows].contiguous()},
                        {"scale": self.ws.view("scale", (self.bp, s, self.c)),
                         "shift": self.ws.view("shift", (self.bp, s, self.c)), **kv.slots(s)})
        kv.idx += s
        self.seconds["prefill"] += time.perf_counter() - t0
        return prefix

    # -------------------------------------------------------- block inverse
    def _step(self, graph: str, kv: KVCache, tokens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
              w: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One graph call at the cache's write index; returns (a, b) after guidance."""
        self._check_stop()  # [serving stub]
        bsz, s = tokens.shape[:2]
        a = self.ws.view("scale", (bsz, s, self.c))
        b = self.ws.view("shift", (bsz, s, self.c))
        rows = slice(kv.idx, kv.idx + s)
        self.pipe._call(graph, {"tokens": tokens.contiguous(), **kv.past(),
                                "rope_cos": cos[rows].contiguous(), "rope_sin": sin[rows].contiguous()},
                        {"scale": a, "shift": b, **kv.slots(s)})
        if w > 0:
            return guide(a, b, w)
        return a, b

    def _invert(self, graph: str, run: _BlockRun, work: torch.Tensor, seq: torch.Tensor, kv: KVCache, w: float,
                frames: int, text_len: int, start: int = 0, window: Optional[int] = None,
                progress: Optional[Callable[[int], None]] = None, cos=None, sin=None) -> None:
        """Invert one block in place: ``work`` [B', N+1, c] (row 0 = SOS, row n+1 = token n).

        seq [B', N, c] is the block's noise in sequence order; ``kv`` holds the text
        prefix (``text_len`` slots) and any context; ``start`` is the first token to produce.
        """
        cos = self.cos if cos is None else cos
        sin = self.sin if sin is None else sin
        n = seq.shape[1]
        if self.jacobi is None:
            for t in range(start, n):
                a, b = self._step(graph, kv, work[:, t : t + 1], cos, sin, w)
                kv.idx += 1
                run.calls += 1
                run.tokens += 1
                work[:, t + 1] = (seq[:, t : t + 1] * a + b)[:, 0]
                if progress is not None and (t + 1) % self.F == 0:
                    progress(t + 1)
            return
        fs = n // frames
        if window is not None:
            wtok, ctx = window * fs, (self.jacobi.context_length if self.jacobi.context_length is not None
                                      else window - 1) * fs
            if not 0 < ctx < wtok:
                raise InputError(f"Jacobi context_length must be in [1, {window}) frames")
            target = min(n, wtok)
        else:
            target = n
        s = start
        solve = self._upstream_phase if self.schedule == "upstream" else self._sliding_phase
        while True:
            s = solve(graph, run, work, seq, kv, w, fs, s, target, cos, sin, progress)
            if target >= n:
                break
            target = min(n, target + wtok - ctx)
            self._reencode(graph, work, s, ctx, kv, cos, sin, text_len)
            run.calls += 1

    def _upstream_phase(self, graph, run, work, seq, kv, w, fs, s, target, cos, sin, progress) -> int:
        """Upstream's block-wise Jacobi (spec §10.2), exactly: the reference's loop over graph calls."""
        def step(inp: torch.Tensor):
            run.calls += 1
            run.tokens += inp.shape[1]
            return self._step(graph, kv, inp, cos, sin, w)

        def commit(k: int) -> None:
            kv.idx += k

        return upstream_jacobi_phase(step, commit, work, seq, s, target, fs, self.jacobi, run.chunks, progress)

    def _sliding_phase(self, graph, run, work, seq, kv, w, fs, s, target, cos, sin, progress) -> int:
        """Sliding-window Jacobi: after every sweep commit the longest converged prefix, refill the window.

        Windows start at upstream's sizes k (``block_size`` in frame 0, ``4·block_size`` after).
        A prefix is committed when it is exact (all its inputs were final before the sweep) or
        when upstream's own test holds on every prefix of it (mean squared update over mean
        squared value below ``threshold``) and each of its tokens has been evaluated at least
        twice, so that, as in upstream, the test compares two network evaluations and never a
        heuristic guess. Its K/V come from the inputs of that sweep, as upstream's last iteration.

        Instead of re-solving a converged chunk head while its tail converges, the window slides
        on; after a sweep that committed everything it evaluated twice, the next window also takes
        k new positions (at most 2k in all), so one call verifies a chunk and starts the next.
        A new position n starts from ``b + a·ζ_n`` with (a, b) of the co-located token one frame
        earlier (final by then): the same fixed point, a closer start than upstream's noise.
        ``threshold = 0`` commits exact tokens only: the autoregressive result. A window whose
        first position has been evaluated ``max_iter`` times is committed as it is (upstream's cap).
        """
        jac = self.jacobi
        exact = s           # tokens < exact are exact
        frontier = s        # tokens < frontier have an initial guess
        evals = torch.zeros(target, dtype=torch.int32)   # network evaluations of each position
        if run.scale is None or run.scale.shape != seq.shape:
            run.scale, run.shift = torch.empty_like(seq), torch.empty_like(seq)  # latest (a, b) per position
            run.known = 0
        verified = False    # the last sweep committed every position it evaluated for the second time
        while s < target:
            k = jac.block_size if s <= fs else 4 * jac.block_size
            e = min(s + k, target)
            if verified and frontier > s:
                e = min(target, max(e, frontier + k), s + 2 * k)
            exact = max(exact, s)
            if e > frontier:
                lo = max(frontier, fs, s + 1)   # position s's input is final already
                if e > lo and lo - fs < run.known:
                    hi = min(e, run.known + fs)
                    prev = slice(lo - fs, hi - fs)
                    work[:, lo + 1 : hi + 1] = run.shift[:, prev] + run.scale[:, prev] * seq[:, lo:hi]
                frontier = e
            a, b = self._step(graph, kv, work[:, s:e], cos, sin, w)
            run.calls += 1
            run.tokens += e - s
            run.scale[:, s:e], run.shift[:, s:e] = a, b
            run.known = max(run.known, e)
            evals[s:e] += 1
            new = b + a * seq[:, s:e]
            sq = ((new - work[:, s + 1 : e + 1]) ** 2).mean(dim=(0, 2))   # per token
            mag = (new ** 2).mean(dim=(0, 2))
            prefix_delta = torch.cumsum(sq, 0) / torch.cumsum(mag, 0).clamp_min(1e-30)
            work[:, s + 1 : e + 1] = new
            exact = min(e, exact + 1)
            twice = int(torch.cumprod(evals[s:e] >= 2, 0).sum())   # leading positions evaluated twice
            bad = (prefix_delta[:twice] >= jac.threshold).nonzero()
            m = max(exact - s, int(bad[0]) if len(bad) else twice)
            if int(evals[s]) >= jac.max_iter:
                m = e - s
            verified = 0 < twice <= m
            run.chunks.append(ChunkLog(s, m, int(evals[s]), float(prefix_delta[m - 1])))
            kv.idx += m
            s += m
            if progress is not None:
                progress(s)
        return s

    def _reencode(self, graph, work, s, ctx, kv, cos, sin, text_len) -> None:
        """Long-video context re-encoding (spec §10.4): cache ← [text ; sos ; last ctx−1 tokens]."""
        if text_len:
            self._prefill_text()
        else:
            kv.idx = 0
        inp = torch.cat([work[:, :1], work[:, s + 1 - ctx : s]], dim=1)
        self._step(graph, kv, inp, cos, sin, 0.0)
        kv.idx += ctx

    # ------------------------------------------------------ shallow blocks
    def _shallow_upto(self, frames_done: int) -> None:
        """Invert every shallow block on deep-final frames [frames_shallow, frames_done)."""
        g = self.geo
        lo, hi = self.frames_shallow, frames_done
        if hi <= lo or (not g.frame_local and hi < self.frames):
            return
        t0 = time.perf_counter()
        skip = max(0, self.n_ctx - lo) if g.frame_local else 0
        h = self.deep_out[:, lo:hi]
        todo = h[:, skip:]
        for k in reversed(range(g.num_blocks - 1)):
            if k in g.identity_blocks or todo.shape[1] == 0:
                continue
            todo = self._invert_shallow(k, todo)
        out = self.shallow_out[:, lo:hi]
        out[:, skip:] = todo
        if skip:
            out[:, :skip] = self.ctx_inputs[0][:, lo : lo + skip]
        self.frames_shallow = hi
        self.seconds["shallow"] += time.perf_counter() - t0

    def _invert_shallow(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Block k's inverse on frames h [B, g, h, w, c] (frame-local: frames folded into the batch)."""
        g = self.geo
        blk = g.blocks[k]
        local = g.frame_local
        hin = h.reshape(-1, 1, *h.shape[2:]) if local else h
        seq = permute_tokens(hin, blk.permutation).contiguous()
        bs, n = seq.shape[:2]
        hd = g.head_dim
        kv = KVCache(self.ws.view("shallow_kv", (blk.layers, 2, n, bs, blk.heads, hd)))
        work = torch.empty(bs, n + 1, self.c, device=self.device)
        work[:, 0] = self.pipe._sos(k)
        work[:, 1:] = seq
        cos, sin = self.pipe._rope(1 if local else hin.shape[1], 0)
        run = _BlockRun(f"shallow_step_{k}")
        self.runs.append(run)
        self._invert(f"shallow_step_{k}", run, work, seq, kv, 0.0, frames=1 if local else hin.shape[1],
                     text_len=0, cos=cos, sin=sin)
        out = unpermute_tokens(work[:, 1:], blk.permutation, hin.shape)
        return out.reshape(h.shape)

    # ------------------------------------------------------------ denoiser
    def _denoise_plan(self) -> None:
        """Chunks (start, end, write_from) of the sample-time denoising (spec §12.4)."""
        T = self.frames
        steps = self.window or self.geo.local_attn_window or T
        chunks, s, overlap = [], 0, 0
        while s < T:
            chunks.append((s, min(s + steps, T), s + overlap))
            if s + steps >= T:
                break
            overlap = self.geo.denoiser_window if self.geo.denoiser_window is not None else steps - 1
            if steps - overlap <= 0:
                raise InputError(f"denoising chunks of {steps} frames with overlap {overlap} cannot advance")
            s += steps - overlap
        self.den_chunks = chunks
        self.den_chunk = 0
        A = self.geo.temporal_causal
        # receptive field of one output frame: A − 1 future frames per layer (full attention if A == 0)
        self.den_lookahead = DENOISER_LAYERS * (A - 1) if A > 0 else T

    def _denoise_upto(self, available: int) -> None:
        """Emit every frame whose denoised value is final given shallow-final frames [0, available).

        A chunk's output frame t depends on frames up to t + lookahead of the chunk, so it is
        computed on the chunk's prefix as soon as that is in (identical to the full-chunk value).
        """
        if not self.denoise:
            self._emit(available, self.shallow_out)
            return
        while self.den_chunk < len(self.den_chunks):
            s, e, write_from = self.den_chunks[self.den_chunk]
            stop = min(e, available)
            ready = e if stop >= e else min(stop - self.den_lookahead, e)
            lo = max(self.frames_emitted, write_from)
            if ready <= lo:
                return
            t0 = time.perf_counter()
            # frames before `lo` hold their denoised values (earlier chunks), the rest are raw
            self.final[:, lo:stop] = self.shallow_out[:, lo:stop]
            chunk = self.final[:, s:stop].contiguous()
            clean = chunk - self._run_denoiser(chunk) * DENOISE_CONSTANT
            self.final[:, lo:ready] = clean[:, lo - s : ready - s]
            self.seconds["denoiser"] += time.perf_counter() - t0
            self._emit(ready, self.final)
            if ready < e:
                return
            self.den_chunk += 1

    def _run_denoiser(self, chunk: torch.Tensor) -> torch.Tensor:
        cos, sin = self.pipe._rope(chunk.shape[1], self.L)
        d = torch.empty_like(chunk)
        self.pipe._call("denoiser", {"x": chunk, "text": self.y, "rope_cos": cos.contiguous(),
                                     "rope_sin": sin.contiguous()}, {"d": d})
        return d

    # [serving stub] begin: minimal should_stop hook (per graph call and per frame); superseded at merge
    should_stop: Optional[Callable[[], bool]] = None

    def _check_stop(self) -> None:
        if self.should_stop is not None and self.should_stop():
            from ..errors import GenerationCancelled

            raise GenerationCancelled("generation cancelled: should_stop() returned True")
    # [serving stub] end

    def _emit(self, upto: int, source: torch.Tensor) -> None:
        if upto <= self.frames_emitted:
            return
        self._check_stop()  # [serving stub]
        if self.first_frame_s is None:
            self.first_frame_s = time.perf_counter() - self.start
        if self.on_frame is not None:
            p = self.geo.patch_size
            for t in range(self.frames_emitted, upto):
                self.on_frame(t, unpatchify(source[:, t], p).cpu().clone())
        self.frames_emitted = upto
