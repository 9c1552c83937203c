"""The application graph (ingress → generator) and cluster start-up; :class:`ServeConfig` is ``config``'s.

    app = build_app("graphs/", ServeConfig(replicas=2, gpus_per_replica=1))   # a ray.serve Application
    start("graphs/", ServeConfig(), host="127.0.0.1", port=8000)              # local cluster + serve.run

Replicas: ``gpus_per_replica`` > 0 reserves whole (or fractional) GPUs per replica and
``accelerator_type`` pins replicas to one GPU model (TensorRT engines only run on the GPU
architecture they were built for); on CPU each replica reserves ``cpus_per_replica`` logical CPUs.
``max_replicas`` > ``replicas`` turns on autoscaling on ongoing requests.
"""

from __future__ import annotations

import os
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import InputError
from ..staging import MANIFEST_NAME
from .config import API_KEY_ENV, ServeConfig
from .summary import ModelSummary

#: Serve's own HTTP timeout sits this far behind the ingress deadline (a backstop only)
PROXY_TIMEOUT_GRACE_S = 30.0


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
    else:   # "local": a new cluster even where `ray start` left one (ray.init() would join it, or its stale address)
        ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 _node_ip_address="127.0.0.1", log_to_driver=False)


def start(directory: Union[str, os.PathLike], config: Optional[ServeConfig] = None, host: str = "127.0.0.1",
          port: int = 8000, address: Optional[str] = None):
    """Start (or join) Ray, start Serve's HTTP proxy on ``host:port`` and deploy; returns the ingress handle."""
    from ray import serve

    cfg = config or ServeConfig()
    if not Path(directory, MANIFEST_NAME).exists():
        raise InputError(f"{directory} is not an export/engine directory (no manifest.json); "
                         "run `starflow-trt export` first")
    cfg = replace(cfg, http_host=host)      # the Host header a request must name (``browser``)
    init_ray(address)
    serve.start(http_options={"host": host, "port": port,
                              "request_timeout_s": cfg.timeout_s + PROXY_TIMEOUT_GRACE_S})
    return serve.run(build_app(directory, cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)

