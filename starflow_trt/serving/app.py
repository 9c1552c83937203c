"""Serve configuration, the application graph (ingress → generator) and cluster start-up.

    app = build_app("graphs/", ServeConfig(replicas=2, gpus_per_replica=1))   # a ray.serve Application
    start("graphs/", ServeConfig(), host="127.0.0.1", port=8000)              # local cluster + serve.run

Replicas: ``gpus_per_replica`` > 0 reserves whole (or fractional) GPUs per replica and
``accelerator_type`` pins replicas to one GPU model (TensorRT engines only run on the GPU
architecture they were built for); on CPU each replica reserves ``cpus_per_replica`` logical CPUs.
``max_replicas`` > ``replicas`` turns on autoscaling on ongoing requests.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional, Union

from ..defaults import DEFAULT_THREAD_POOL
from ..errors import InputError
from ..staging import MANIFEST_NAME
from .limits import RequestLimits
from .summary import ModelSummary

#: Serve's own HTTP timeout sits this far behind the ingress deadline (a backstop only)
PROXY_TIMEOUT_GRACE_S = 30.0
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
        if self.max_batch is not None and self.max_batch < 1:
            raise InputError(f"max_batch must be >= 1, got {self.max_batch}")
        self.retention()    # raises for bad video retention limits

    def videos_root(self) -> Path:
        if self.videos_dir:
            return Path(self.videos_dir)
        cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(cache, "starflow-trt", "videos", self.app_name)

    def request_limits(self) -> RequestLimits:
        return replace(self.limits, max_timeout_s=self.timeout_s)

    def retention(self):
        from .jobs import Retention

        return Retention(self.videos_max_count, self.videos_max_bytes, self.videos_max_age_s)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ServeConfig":
        names = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        if isinstance(d.get("limits"), dict):
            d["limits"] = RequestLimits(**d["limits"])
        return cls(**d)


def build_app(directory: Union[str, os.PathLike], config: Optional[ServeConfig] = None):
    """The Serve application: ``VideoIngress`` (HTTP) bound to ``VideoGenerator`` replicas."""
    from .deployment import VideoGenerator
    from .ingress import VideoIngress

    cfg = config or ServeConfig()
    if cfg.api_key is None and os.environ.get(API_KEY_ENV):
        cfg = replace(cfg, api_key=os.environ[API_KEY_ENV])
    model = ModelSummary.from_dir(directory)
    max_batch = min(cfg.max_batch or model.max_batch, model.max_batch)
    actor: dict[str, Any] = {"num_cpus": cfg.cpus_per_replica}
    if cfg.gpus_per_replica:
        actor["num_gpus"] = cfg.gpus_per_replica
    if cfg.accelerator_type:
        actor["accelerator_type"] = cfg.accelerator_type
    scaling: dict[str, Any] = {"num_replicas": cfg.replicas}
    if cfg.max_replicas and cfg.max_replicas > cfg.replicas:
        scaling = {"autoscaling_config": {"min_replicas": cfg.replicas, "max_replicas": cfg.max_replicas,
                                          "target_ongoing_requests": max_batch}}
    generator = VideoGenerator.options(
        ray_actor_options=actor, max_ongoing_requests=cfg.max_ongoing or 2 * max_batch,
        max_queued_requests=cfg.max_queued, graceful_shutdown_timeout_s=5, **scaling,
    ).bind(model.directory, cfg.to_dict())
    # The ingress only relays: it takes every request (the proxy's router also counts requests in
    # flight to a replica as queued, so a small bound here would refuse bursts with idle replicas);
    # back-pressure (503) comes from the generator's queue.
    return VideoIngress.options(
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096, max_queued_requests=-1,
    ).bind(generator, model.to_dict(), cfg.to_dict())


def app_builder(args: dict):
    """Application builder for Serve config files and KubeRay (``import_path: starflow_trt.serving.app:app_builder``).

    ``args``: ``directory`` plus any :class:`ServeConfig` field (``limits`` as a mapping).
    """
    args = dict(args)
    directory = args.pop("directory", None)
    if not directory:
        raise InputError("the serve config's args need `directory`: the export or engine directory to serve")
    unknown = sorted(set(args) - {f.name for f in fields(ServeConfig)})
    if unknown:
        raise InputError(f"unknown serve arg(s) {unknown}; allowed: directory, "
                         f"{', '.join(f.name for f in fields(ServeConfig))}")
    return build_app(directory, ServeConfig.from_dict(args))


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None, num_gpus: Optional[int] = None) -> None:
    """Connect to ``address`` (``"auto"``: the cluster running on this node) or start a loopback-only one."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False)


def start(directory: Union[str, os.PathLike], config: Optional[ServeConfig] = None, host: str = "127.0.0.1",
          port: int = 8000, address: Optional[str] = None):
    """Start (or join) Ray, start Serve's HTTP proxy on ``host:port`` and deploy; returns the ingress handle."""
    from ray import serve

    cfg = config or ServeConfig()
    if not Path(directory, MANIFEST_NAME).exists():
        raise InputError(f"{directory} is not an export/engine directory (no manifest.json); "
                         "run `starflow-trt export` first")
    init_ray(address)
    serve.start(http_options={"host": host, "port": port,
                              "request_timeout_s": cfg.timeout_s + PROXY_TIMEOUT_GRACE_S})
    return serve.run(build_app(directory, cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)


def generator_status(app_name: str) -> dict:
    """Status of the generation deployment of ``app_name`` from Serve's controller."""
    from ray import serve

    try:
        status = serve.status()
        dep = status.applications[app_name].deployments["VideoGenerator"]
    except (KeyError, RuntimeError) as exc:
        return {"status": "UNKNOWN", "message": str(exc)}
    return {"status": str(getattr(dep.status, "value", dep.status)),
            "replicas": {str(getattr(k, "value", k)): v for k, v in dep.replica_states.items()}}
