"""Serving on Ray Serve: streaming video generation over HTTP, batched, cancellable, multi-GPU.

    from starflow_trt.serving import ServeConfig, build_app, start
    start("graphs/", ServeConfig(replicas=2, gpus_per_replica=1))   # POST /v1/videos on 127.0.0.1:8000

    from starflow_trt.serving import VideoClient
    video = VideoClient("http://127.0.0.1:8000").generate({"prompt": "a red square moving right", "seed": 0})

Modules: ``limits`` (the HTTP request schema, no Ray; the generation rules are
:func:`starflow_trt.request.build_request`'s, shared with the CLI), ``summary`` (what an export
directory serves: :mod:`starflow_trt.summary`), ``batching`` (which requests may share a ``generate``
call), ``frames`` (frame and event encoding), ``config`` (:class:`ServeConfig`), ``deployment`` (the
generation replica), ``ingress`` (FastAPI routes), ``drain`` (the ingress's part of a stop),
``metrics``, ``app`` (application graph, cluster start), ``server`` (the Ray driver of ``starflow-trt
serve``: start, drain, stop), ``supervisor`` (the ``serve`` process: the server in a session of its
own, stop signals, no process left behind), ``stops`` (stop requests), ``client`` (stdlib HTTP
client). Only ``deployment``, ``ingress``, ``metrics``, ``app`` and ``server`` import Ray (the
``[serve]`` extra).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServeConfig", "build_app", "start", "VideoClient", "VideoRequest", "RequestLimits", "RequestError",
           "ModelSummary"]

_LAZY = {
    "ServeConfig": "config", "build_app": "app", "start": "app",
    "VideoClient": "client",
    "VideoRequest": "limits", "RequestLimits": "limits", "RequestError": "limits",
    "ModelSummary": "summary",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
