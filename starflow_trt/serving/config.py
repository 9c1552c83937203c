"""How the service runs: :class:`ServeConfig`, the one value the CLI, the application graph and every replica share.

It travels to the replicas as :meth:`ServeConfig.to_dict` (Ray passes plain data), so it holds no
Ray types and imports no Ray.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional

from ..defaults import DEFAULT_THREAD_POOL
from ..errors import InputError
from ..request import MAX_VIDEO_FRAMES
from .browser import BrowserPolicy
from .jobs import Retention
from .limits import RequestLimits

#: the API key's environment variable (``serve --api-key`` sets the same)
API_KEY_ENV = "STARFLOW_API_KEY"


@dataclass(frozen=True)
class ServeConfig:
    """How the service runs; everything a replica needs travels in :meth:`to_dict`."""

    backend: str = "ort"
    precision: Optional[str] = None
    providers: Optional[str] = None          # ORT: None (CPU) or "auto" (best available EP)
    threads: Optional[int] = None
    thread_pool: str = DEFAULT_THREAD_POOL  # ORT: "session" | "shared" (one pool for all sessions of a replica)
    cuda_graphs: bool = False                # trt / torch on CUDA: CUDA-graph replay of repeated calls
    device: Optional[str] = None             # torch: "cpu" (default) | "cuda[:N]"
    dtype: Optional[str] = None              # torch: "fp32" | "fp16" | "bf16" (None: the export's)
    checkpoint: Optional[str] = None         # torch: None: the one the export's manifest records
    replicas: int = 1
    max_replicas: Optional[int] = None       # > replicas: autoscale on ongoing requests
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    accelerator_type: Optional[str] = None
    max_batch: Optional[int] = None          # None: the export's max_batch
    batch_wait_s: float = 0.02
    batch_approximate: bool = False          # also batch thresholded-Jacobi requests (frames then depend on the batch)
    max_ongoing: Optional[int] = None        # per generator replica; None: 2 x max_batch
    max_queued: int = 32                     # per ingress replica, beyond what replicas hold: 503
    max_frames: Optional[int] = None         # latent frames a request may ask for; None: the export's max_frames
    memory_budget_mb: Optional[float] = None  # a generate call's estimated working memory; None: memory_budget()
    timeout_s: float = 600.0
    limits: RequestLimits = field(default_factory=RequestLimits)
    warmup: bool = True
    app_name: str = "starflow"
    route_prefix: str = "/"
    api_key: Optional[str] = None            # every endpoint but /healthz and the page needs it; None: STARFLOW_API_KEY
    videos_dir: Optional[str] = None         # finished OpenAI video jobs; None: ~/.cache/starflow-trt/videos/APP
    videos_max_count: int = 100
    videos_max_bytes: int = 2 << 30
    videos_max_age_s: float = 24 * 3600.0
    http_host: str = "127.0.0.1"             # the address the HTTP proxy is bound to (``app.start`` sets it)
    allowed_hosts: tuple[str, ...] = ()      # Host names beyond the bound address ("*": any); see ``browser``
    allowed_origins: tuple[str, ...] = ()    # web origins whose pages may create and delete videos

    def __post_init__(self) -> None:
        if self.replicas < 1 or (self.max_replicas is not None and self.max_replicas < self.replicas):
            raise InputError(f"need 1 <= replicas <= max_replicas, got {self.replicas} and {self.max_replicas}")
        if self.gpus_per_replica < 0 or self.cpus_per_replica < 0:
            raise InputError("gpus_per_replica and cpus_per_replica must be >= 0")
        if self.max_queued < 0 and self.max_queued != -1:
            raise InputError(f"max_queued must be >= 0 (or -1: unbounded), got {self.max_queued}")
        if self.timeout_s <= 0:
            raise InputError(f"timeout must be > 0 seconds, got {self.timeout_s}")
        if self.cuda_graphs and self.backend not in ("trt", "torch"):
            raise InputError(f"--cuda-graphs replays TensorRT engines or torch modules on CUDA: use it with --backend "
                             f"trt or torch, not {self.backend!r}")
        if self.backend != "torch" and (self.device, self.dtype, self.checkpoint) != (None, None, None):
            raise InputError(f"--device, --dtype and --checkpoint are options of --backend torch, not {self.backend!r}")
        if self.max_batch is not None and self.max_batch < 1:
            raise InputError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_frames is not None and not 1 <= self.max_frames <= MAX_VIDEO_FRAMES:
            raise InputError(f"max_frames must be in [1, {MAX_VIDEO_FRAMES}], got {self.max_frames}")
        if self.memory_budget_mb is not None and not self.memory_budget_mb > 0:
            raise InputError(f"memory budget must be > 0 MB, got {self.memory_budget_mb}")
        self.retention()    # raises for bad video retention limits

    def videos_root(self) -> Path:
        if self.videos_dir:
            return Path(self.videos_dir)
        cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(cache, "starflow-trt", "videos", self.app_name)

    def request_limits(self) -> RequestLimits:
        """The limits requests are built with: this server's deadline, frames, batch and memory budget."""
        return replace(self.limits, max_timeout_s=self.timeout_s, max_frames=self.max_frames, max_batch=self.max_batch,
                       max_memory_mb=self.memory_budget())

    def memory_budget(self) -> Optional[float]:
        """MB one generate call may use: ``memory_budget_mb``, else on CPU replicas half this machine's memory
        shared by the replicas it may run (the ingress and the replicas share a node in a local cluster); None
        (unchecked) on GPU replicas without one: the estimate counts the attention scores ORT's CPU kernels
        materialise, which TensorRT's fused attention never holds."""
        if self.memory_budget_mb is not None:
            return self.memory_budget_mb
        if self.gpus_per_replica > 0:
            return None
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / (1 << 20)
        return total / 2 / (self.max_replicas or self.replicas)

    def browser_policy(self) -> BrowserPolicy:
        return BrowserPolicy(self.http_host, tuple(self.allowed_hosts), tuple(self.allowed_origins))

    def job_capacity(self, model_max_batch: int) -> Optional[int]:
        """How many requests the generator replicas take at once, queue included (None: unbounded), the
        most video jobs the ingress admits at once (more get 429): what Serve's ``max_ongoing_requests`` and
        ``max_queued_requests`` allow."""
        if self.max_queued < 0:
            return None
        max_batch = min(self.max_batch or model_max_batch, model_max_batch)
        return (self.max_replicas or self.replicas) * (self.max_ongoing or 2 * max_batch) + self.max_queued

    def retention(self) -> Retention:
        return Retention(self.videos_max_count, self.videos_max_bytes, self.videos_max_age_s)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ServeConfig":
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if isinstance(d.get("limits"), dict):
            d["limits"] = RequestLimits(**d["limits"])
        for name in ("allowed_hosts", "allowed_origins"):   # lists after a trip through JSON or Ray
            if name in d:
                d[name] = tuple(d[name])
        return cls(**d)
