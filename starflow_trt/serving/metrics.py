"""Prometheus metrics of the service, through Ray's metrics export (``ray.serve.metrics``).

Ray exports them on every node's metrics port (``ray start --metrics-export-port``), prefixed
``ray_`` and tagged with the deployment, replica and application, beside Serve's own
(``ray_serve_num_http_requests_total``, ``ray_serve_deployment_queued_queries``, ...):

* ingress: ``starflow_requests_total{status}`` (ok, error, cancelled, timeout, invalid, overloaded, shutdown),
  ``starflow_request_latency_seconds``, ``starflow_time_to_first_frame_seconds``,
  ``starflow_streams_in_flight``;
* generator: ``starflow_frames_total`` (frames/s = its rate), ``starflow_frames_per_second`` (last batch),
  ``starflow_queue_length`` (requests waiting in the replica), ``starflow_batch_size``,
  ``starflow_generate_seconds``, ``starflow_cancelled_batches_total``.
"""

from __future__ import annotations

SECONDS = [0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600]
BATCH = [1, 2, 3, 4, 6, 8, 12, 16, 32, 64]


class IngressMetrics:
    def __init__(self) -> None:
        from ray.serve import metrics as m

        self.requests = m.Counter("starflow_requests", "Video requests by final status", tag_keys=("status",))
        self.latency = m.Histogram("starflow_request_latency_seconds", "Request receipt to last event",
                                   boundaries=SECONDS)
        self.ttff = m.Histogram("starflow_time_to_first_frame_seconds", "Request receipt to first frame sent",
                                boundaries=SECONDS)
        self.in_flight = m.Gauge("starflow_streams_in_flight", "Responses being streamed")

    def finished(self, status: str, seconds: float) -> None:
        self.requests.inc(1, tags={"status": status})
        self.latency.observe(seconds)


class GeneratorMetrics:
    def __init__(self) -> None:
        from ray.serve import metrics as m

        self.frames = m.Counter("starflow_frames", "Frames generated (batch rows x frames)")
        self.fps = m.Gauge("starflow_frames_per_second", "Frames per second of the last finished batch")
        self.queue = m.Gauge("starflow_queue_length", "Requests waiting in this replica for their batch")
        self.batch = m.Histogram("starflow_batch_size", "Requests per generate call", boundaries=BATCH)
        self.generate = m.Histogram("starflow_generate_seconds", "Seconds per generate call", boundaries=SECONDS)
        self.cancelled = m.Counter("starflow_cancelled_batches", "Generate calls stopped because every caller left")
