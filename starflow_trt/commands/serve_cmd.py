"""``starflow-trt serve DIR``: the Ray Serve application on a local or existing Ray cluster."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Optional

import click

from . import options


def _names(values: tuple[str, ...]) -> tuple[str, ...]:
    """Repeated and comma-separated option values → one tuple."""
    return tuple(v.strip() for value in values for v in value.split(",") if v.strip())


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@click.command("serve")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--replicas", default=1, show_default=True, type=int, help="generation replicas (one Pipeline each)")
@click.option("--max-replicas", type=int, default=None, help="autoscale between --replicas and this on ongoing requests")
@click.option("--gpus-per-replica", type=float, default=None,
              help="GPUs reserved per replica  [default: 1 with --backend trt, --providers auto or --device cuda, else 0]")
@click.option("--cpus-per-replica", type=float, default=1.0, show_default=True, help="logical CPUs per replica")
@click.option("--accelerator-type", default=None,
              help="pin replicas to one GPU model (Ray accelerator type, e.g. H100): engines run only on the GPU "
                   "architecture they were built for")
@click.option("--host", default="127.0.0.1", show_default=True, help="HTTP bind address")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--address", default=None,
              help="join a running Ray cluster ('auto': the one started on this node with `ray start`); "
                   "default: start a local, loopback-only one")
@click.option("--max-queued", default=32, show_default=True, type=int,
              help="requests queued beyond what the replicas hold; more get 503 (a stream) or 429 with "
                   "Retry-After (a video job create)")
@click.option("--max-frames", type=click.IntRange(1, 1 << 16), default=None,
              help="latent frames a request may ask for; more get 400  [default: the export's max_frames; above it, "
                   "videos run through the Jacobi attention window]")
@click.option("--memory-budget", "memory_budget_mb", type=click.FloatRange(min=0, min_open=True), default=None,
              help="megabytes one generate call may use, by the cost model's estimate for a full batch; requests "
                   "over it get 400  [default: CPU replicas: half this machine's memory over --max-replicas or "
                   "--replicas; GPU replicas: unchecked]")
@click.option("--timeout", "timeout_s", default=600.0, show_default=True, type=float,
              help="request deadline in seconds (not started by then: 408; streaming: ends with an error event)")
@options.backend_option()
@options.cuda_graphs_option()
@options.torch_device_options
@click.option("--checkpoint", type=click.Path(exists=True, dir_okay=False),
              help="for --backend torch  [default: the checkpoint the export's manifest records]")
@click.option("--providers", type=click.Choice(["cpu", "auto"]), default="cpu", show_default=True,
              help="ORT execution providers: CPU, or the best available (CUDA / TensorRT EPs)")
@click.option("--threads", type=int, default=None, help="ORT intra-op threads per replica")
@options.thread_pool_option()
@click.option("--max-batch", type=int, default=None, help="requests per generate call (default: the export's)")
@click.option("--batch-wait-ms", type=float, default=20.0, show_default=True,
              help="how long a batch waits for more requests")
@click.option("--batch-approximate", is_flag=True,
              help="also batch thresholded-Jacobi requests (their frames then depend on their batch)")
@click.option("--no-warmup", is_flag=True, help="skip the warm-up generate when a replica starts")
@click.option("--api-key", envvar="STARFLOW_API_KEY", default=None, show_envvar=True,
              help="require 'Authorization: Bearer KEY' on every endpoint but /healthz and the page; prefer the "
                   "environment variable (an option shows in `ps`)")
@click.option("--allowed-origins", multiple=True, metavar="ORIGIN",
              help="web origins (https://app.example) whose pages may create and delete videos; repeat or "
                   "separate with commas  [default: none: only the page served here]")
@click.option("--allowed-hosts", multiple=True, metavar="NAME",
              help="Host names requests may be sent to besides the bound address (a DNS name in front of the "
                   "server; '*': any); repeat or separate with commas")
@click.option("--videos-dir", type=click.Path(file_okay=False), default=None,
              help="where OpenAI video jobs keep their files  [default: ~/.cache/starflow-trt/videos/starflow]")
@click.option("--videos-max-count", default=100, show_default=True, type=click.IntRange(min=1),
              help="failed video jobs kept (the oldest go first); they never evict completed videos")
@click.option("--videos-max-mb", default=2048.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="megabytes the completed videos may hold; beyond it the oldest downloaded ones go first, "
                   "then the oldest")
@click.option("--videos-max-age", default=24.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="hours a finished video is kept (a completed one at least that long while --videos-max-mb "
                   "allows)")
@click.option("--drain-timeout", "drain_timeout_s", default=30.0, show_default=True, type=click.FloatRange(min=0),
              help="on SIGTERM / SIGINT: seconds running requests get to finish (new ones get 503); the rest "
                   "end with an error event")
def serve_command(directory, replicas, max_replicas, gpus_per_replica, cpus_per_replica, accelerator_type, host, port,
                  address, max_queued, max_frames, memory_budget_mb, timeout_s, backend, cuda_graphs, device,
                  torch_dtype, checkpoint, providers,
                  threads, thread_pool, max_batch, batch_wait_ms, batch_approximate, no_warmup, api_key,
                  allowed_origins, allowed_hosts, videos_dir,
                  videos_max_count, videos_max_mb, videos_max_age, drain_timeout_s) -> None:
    """Serve DIRECTORY over HTTP: the streaming API (POST /v1/videos/stream, NDJSON), OpenAI's videos API
    (POST /v1/videos, GET /v1/videos[/ID[/content]], DELETE /v1/videos/ID), GET /v1/models, GET /healthz
    and a page at /.

    SIGTERM or SIGINT (Ctrl-C) stops it cleanly, to the process alone or to its process group: new
    requests get 503, running ones get --drain-timeout seconds to finish, the rest end with an error
    event; then Serve and Ray stop, no Ray process is left, and the exit status is 0. A second signal
    ends the running requests at once."""
    from ..errors import StarflowError
    from ..serving.config import ServeConfig
    from ..serving.summary import ModelSummary

    model = ModelSummary.from_dir(directory)          # a bad directory fails here, before Ray starts
    try:
        import psutil  # noqa: F401
        import ray.serve  # noqa: F401
    except ImportError as exc:
        raise StarflowError(f"serving needs Ray Serve and psutil ({exc}); pip install 'starflow-trt[serve]'") from exc
    gpu = backend == "trt" or providers == "auto" or str(device or "cpu").startswith("cuda")
    cfg = ServeConfig(backend=backend, cuda_graphs=cuda_graphs, device=device, dtype=torch_dtype,
                      checkpoint=str(Path(checkpoint).resolve()) if checkpoint else None,
                      providers="auto" if providers == "auto" else None,
                      threads=threads, thread_pool=thread_pool, replicas=replicas, max_replicas=max_replicas,
                      gpus_per_replica=(1.0 if gpu else 0.0) if gpus_per_replica is None else gpus_per_replica,
                      cpus_per_replica=cpus_per_replica, accelerator_type=accelerator_type, max_batch=max_batch,
                      batch_wait_s=batch_wait_ms / 1000, batch_approximate=batch_approximate, max_queued=max_queued,
                      max_frames=max_frames, memory_budget_mb=memory_budget_mb, timeout_s=timeout_s,
                      warmup=not no_warmup, api_key=api_key or None, videos_dir=videos_dir,
                      videos_max_count=videos_max_count, videos_max_bytes=int(videos_max_mb * (1 << 20)),
                      videos_max_age_s=videos_max_age * 3600, http_host=host,
                      allowed_origins=_names(allowed_origins), allowed_hosts=_names(allowed_hosts))
    ctx = click.get_current_context()
    if api_key and ctx.get_parameter_source("api_key") == click.core.ParameterSource.COMMANDLINE:
        click.echo("warning: --api-key shows in `ps` to every user of this machine; set STARFLOW_API_KEY "
                   "instead", err=True)
    if not _is_loopback(host):
        click.echo(f"warning: binding {host}: the service is reachable from other machines "
                   + ("with an API key but no TLS; put a TLS proxy in front" if api_key else
                      "and has no authentication; set --api-key and put a TLS proxy in front"), err=True)
    if model.engines and not accelerator_type:
        click.echo(f"warning: {directory} holds TensorRT engines built on {model.engines.get('gpu')} "
                   f"(compute capability {model.engines.get('compute_capability')}); pin replicas with "
                   "--accelerator-type on a cluster with other GPU models", err=True)
    code = _run(directory, cfg, host, port, address, drain_timeout_s)
    if code:
        click.get_current_context().exit(code)


def _run(directory, cfg, host: str, port: int, address: Optional[str], drain_timeout_s: float) -> int:
    """Serve until stopped: the Ray driver in a session of its own, under the supervisor; the exit status."""
    from ..serving.server import ServerSpec
    from ..serving.supervisor import supervise

    return supervise(ServerSpec(directory=str(directory), config=cfg.to_dict(), host=host, port=port, address=address,
                                drain_timeout_s=drain_timeout_s))
