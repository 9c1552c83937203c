"""The Ray driver behind ``starflow-trt serve``: start, serve until asked to stop, drain, stop Ray.

:mod:`.supervisor` runs it as ``python -m starflow_trt.serving.server`` in a session of its own, so a
signal to the ``serve`` process group reaches neither this process nor the Ray processes it starts
(GCS, raylet, Serve's proxy and replicas). Its stdin carries the :class:`ServerSpec` (one JSON line),
then one ``stop`` line per stop request; the end of its input (the supervisor is gone) and a SIGTERM
or SIGINT sent to this process are stop requests too.

The stop, in order: the ingress's ``drain`` (new requests get 503, running ones get
``drain_timeout_s``, the rest end with an error event; a second stop request ends them at once), then
``serve.shutdown`` (on a cluster joined with ``--address``: ``serve.delete`` of this application only),
then ``ray.shutdown``, which stops the GCS, raylet and workers this process started. Exit status: 0
after a stop, 2 for bad input and 1 for any other failure (one ``error:`` line on stderr each).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import IO, Optional

import click

from ..errors import StarflowError
from .app import init_ray, start
from .config import ServeConfig
from .drain import END_GRACE_S
from .stops import StopRequests

#: beyond the ingress's own bound (drain timeout + END_GRACE_S), how long the drain call may take
DRAIN_CALL_GRACE_S = 10.0
#: the stdin line that asks the server to stop (``stop SIGTERM``: with the reason)
STOP_LINE = "stop"


@dataclass(frozen=True)
class ServerSpec:
    """What the server runs: the export, the :class:`ServeConfig` (as a dict), where it listens, the Ray
    cluster to join (None: start a loopback-only one) and the drain timeout."""

    directory: str
    config: dict
    host: str = "127.0.0.1"
    port: int = 8000
    address: Optional[str] = None
    drain_timeout_s: float = 30.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, line: str) -> "ServerSpec":
        return cls(**json.loads(line))


def main() -> int:
    stops = StopRequests()
    stops.catch_signals()
    spec = ServerSpec.from_json(sys.stdin.readline())
    threading.Thread(target=_read_stop_lines, args=(sys.stdin, stops), name="stop-lines", daemon=True).start()
    try:
        serve_until_stopped(spec, stops)
    except StarflowError as exc:
        click.echo(f"error: {_one_line(exc)}", err=True)
        return 2
    except Exception as exc:  # noqa: BLE001 - one line; Ray's own logs hold the details
        click.echo(f"error: the server failed ({type(exc).__name__}: {_one_line(exc)[:300]})", err=True)
        return 1
    return 0


def serve_until_stopped(spec: ServerSpec, stops: StopRequests) -> None:
    """Start Ray (or join ``spec.address``) and the application, wait for a stop request, drain, stop."""
    cfg = ServeConfig.from_dict(spec.config)
    try:
        ingress = _start(spec, cfg, stops)
        while not len(stops):
            stops.wait(1.0)
        click.echo(f"stopping ({stops.reasons[0]}): new requests get 503, running ones get "
                   f"{spec.drain_timeout_s:g} s; again to end them now")
        try:
            _drain(ingress, spec.drain_timeout_s, stops)
        except Exception as exc:  # noqa: BLE001 - the ingress is gone or stuck: stop all the same
            click.echo(f"warning: draining failed ({type(exc).__name__}: {_one_line(exc)[:200]}); stopping",
                       err=True)
    finally:
        _stop_ray(cfg, joined=bool(spec.address), stops=stops)
    click.echo(f"stopped {time.monotonic() - stops.first_at:.1f} s after {stops.reasons[0]}")


def _start(spec: ServerSpec, cfg: ServeConfig, stops: StopRequests):
    """Ray, Serve's proxy on ``spec.host:spec.port`` and the application; returns the ingress handle."""
    t0 = time.perf_counter()
    init_ray(spec.address)
    stops.catch_signals()
    ingress = start(spec.directory, cfg, host=spec.host, port=spec.port, address=spec.address)
    click.echo(f"serving {spec.directory} on http://{spec.host}:{spec.port} in {time.perf_counter() - t0:.1f} s "
               "(page at /, POST /v1/videos[/stream], GET /healthz, GET /v1/models); SIGTERM or Ctrl-C "
               f"stops it (running requests get {spec.drain_timeout_s:g} s)")
    return ingress


def _drain(ingress, timeout_s: float, stops: StopRequests) -> None:
    """The ingress's ``drain``, polled so that a further stop request ends the running requests at once."""
    t0 = time.monotonic()
    asked = len(stops)
    response = ingress.drain.remote(timeout_s)
    give_up = t0 + timeout_s + END_GRACE_S + DRAIN_CALL_GRACE_S
    while True:
        try:
            done = response.result(timeout_s=0.5)
            break
        except TimeoutError:
            if time.monotonic() > give_up:
                raise
        if len(stops) > asked:
            asked = len(stops)
            ingress.drain.remote(0)
    click.echo(f"drained in {time.monotonic() - t0:.1f} s: {done['running']} running, {done['ended']} ended "
               f"unfinished, {done['left']} left")


def _stop_ray(cfg: ServeConfig, joined: bool, stops: StopRequests) -> None:
    """Serve (on a joined cluster: only this application), then this driver and the Ray processes it started."""
    import ray
    from ray import serve

    try:
        if ray.is_initialized():
            if joined:
                serve.delete(cfg.app_name)
            else:
                serve.shutdown()
    finally:
        ray.shutdown()
        stops.catch_signals()


def _read_stop_lines(stream: IO[str], stops: StopRequests) -> None:
    """``stop [REASON]`` lines (the supervisor names the signal it got), then the end of input."""
    for line in stream:
        words = line.split()
        if words and words[0] == STOP_LINE:
            stops.add(" ".join(words[1:]) or STOP_LINE)
    stops.add("end of input")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


if __name__ == "__main__":
    sys.exit(main())
