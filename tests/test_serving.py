"""The Ray Serve application end to end on the bundled toy export (ORT, CPU), one local cluster.

The cluster is loopback-only (node IP 127.0.0.1, HTTP on 127.0.0.1, no dashboard, usage stats
off) and every process it starts is checked gone by PID at teardown. Requests that must overlap
are sent while a slow "blocker" request (token-by-token sampling, frames streamed as they finish)
holds the replica's worker, so the tests do not depend on the machine's speed.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import signal
import socket
import threading
import time
from typing import Iterator

import numpy as np
import pytest
import torch

pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install 'starflow-trt[serve]'")
psutil = pytest.importorskip("psutil", reason="psutil is not installed: pip install 'starflow-trt[serve]'")

pytestmark = pytest.mark.slow   # ~1-2 minutes: cluster start, a replica restart

from starflow_trt.serving.client import VideoClient, decode_frame  # noqa: E402

PROMPTS = ["a red square moving right", "a blue disc moving up", "a green square moving left",
           "a yellow disc moving down", "a red disc moving left"]
#: slow enough to overlap other requests: autoregressive, guided, frames streamed one by one
BLOCKER = {"prompt": "a green disc moving up", "seed": 99, "guidance": 3.0, "sampler": "autoregressive",
           "denoise": False, "frames": 6, "output": "latents"}

#: POST /v1/videos streams when the client accepts NDJSON (without it: an OpenAI video job)
STREAM_HEADERS = {"Content-Type": "application/json", "Accept": "application/x-ndjson"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Processes:
    """Every process below this one, remembered by (pid, create time) so a reused PID is not confused."""

    def __init__(self) -> None:
        self.seen: dict[int, float] = {}

    def snapshot(self) -> None:
        for p in psutil.Process().children(recursive=True):
            try:
                self.seen.setdefault(p.pid, p.create_time())
            except psutil.NoSuchProcess:
                pass

    def alive(self) -> list[str]:
        out = []
        for pid, created in self.seen.items():
            try:
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(f"{pid} {p.name()}")
            except psutil.NoSuchProcess:
                pass
        return out


class Service:
    def __init__(self, url: str, port: int, metrics_port: int, processes: _Processes):
        self.url, self.port, self.metrics_port, self.processes = url, port, metrics_port, processes
        self.client = VideoClient(url, timeout=120)

    def generator(self):
        from ray import serve

        return serve.get_deployment_handle("VideoGenerator", app_name="starflow")

    def describe(self) -> dict:
        return self.generator().describe.remote().result(timeout_s=60)

    def record(self, request_id: str, timeout: float = 20.0) -> dict:
        """The replica's record of a finished request (polls: the replica writes it as the call unwinds)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for rec in self.generator().recent.remote().result(timeout_s=60):
                if rec["request_id"] == request_id:
                    return rec
            time.sleep(0.1)
        raise AssertionError(f"the replica has no record of request {request_id}")

    def open(self, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.request("POST", "/v1/videos", body=json.dumps(body), headers=STREAM_HEADERS)
        return conn, conn.getresponse()

    def post(self, body) -> tuple[int, dict]:
        """A request expected to fail before streaming: (status, JSON body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            raw = body if isinstance(body, bytes) else json.dumps(body).encode()
            conn.request("POST", "/v1/videos", body=raw, headers=STREAM_HEADERS)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, (json.loads(data) if resp.status != 200 else {"lines": data.splitlines()})
        finally:
            conn.close()


@contextlib.contextmanager
def local_service(export, cfg) -> Iterator[Service]:
    """A loopback-only Ray cluster serving ``export`` with ``cfg``; every process it started is checked gone after."""
    import ray
    from ray import serve

    from starflow_trt.serving.app import start

    if ray.is_initialized():
        pytest.skip("a Ray instance is already running in this process")
    old = os.environ.get("RAY_USAGE_STATS_ENABLED")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    procs = _Processes()
    port, metrics_port = _free_port(), _free_port()
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             _metrics_export_port=metrics_port)
    try:
        procs.snapshot()
        start(export, cfg, host="127.0.0.1", port=port)
        procs.snapshot()
        yield Service(f"http://127.0.0.1:{port}", port, metrics_port, procs)
    finally:
        procs.snapshot()
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if old is None:
                os.environ.pop("RAY_USAGE_STATS_ENABLED", None)
            else:
                os.environ["RAY_USAGE_STATS_ENABLED"] = old
        end = time.monotonic() + 60
        while procs.alive() and time.monotonic() < end:
            time.sleep(0.5)
        assert len(procs.seen) >= 4, f"expected Ray's processes to be tracked, saw {procs.seen}"
        assert not procs.alive(), f"processes of the test cluster still running after shutdown: {procs.alive()}"


@pytest.fixture(scope="module")
def service(toy_export, tmp_path_factory):
    from starflow_trt.serving.app import ServeConfig

    cfg = ServeConfig(max_ongoing=8, max_queued=4, timeout_s=60, batch_wait_s=0.1,
                      videos_dir=str(tmp_path_factory.mktemp("videos")))
    with local_service(toy_export, cfg) as svc:
        yield svc


@pytest.fixture(scope="module")
def direct(toy_export):
    """The same export through an in-process Pipeline, and the toy's text encoder."""
    from starflow_trt.runtime import Pipeline
    from starflow_trt.toy import load_bundled

    return Pipeline.from_dir(toy_export, backend="ort"), load_bundled()


def _direct_frames(direct, prompt: str, seed: int, guidance: float, frames: int, jacobi, denoise=True) -> torch.Tensor:
    """Frames [T, C, H, W] of the same request through ``Pipeline.generate`` in this process.

    Streams (``on_frame``) as the server does: with a thresholded Jacobi schedule, streaming runs the
    shallow blocks frame by frame, whose stopping test then sees other frames than in one batch.
    """
    pipe, toy = direct
    y, yu = toy.encode([prompt]), toy.encode([""])
    return pipe.generate(y, yu if guidance > 0 else None, seed=seed, num_frames=frames, guidance=guidance,
                         jacobi=jacobi, denoise=denoise, on_frame=lambda i, f: None).latents[0]


def _start_blocker(service: Service, body: dict = BLOCKER):
    """Open the blocker request and wait for its first frame: the replica's worker is busy from here."""
    conn, resp = service.open(body)
    assert resp.status == 200
    first = json.loads(resp.readline())
    assert first["type"] == "frame" and first["index"] == 0
    return conn, resp


def generate_concurrently(service: Service, bodies: list[dict], meanwhile=lambda: None) -> list:
    """Send ``bodies`` at once (one thread each), run ``meanwhile()``, and return their results in order."""
    results: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            results[i] = service.client.generate(bodies[i])
        except Exception as exc:  # noqa: BLE001 - reported below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    meanwhile()
    for t in threads:
        t.join(120)
    for i in range(len(bodies)):
        assert not isinstance(results.get(i), (Exception, type(None))), results.get(i)
    return [results[i] for i in range(len(bodies))]


def _finish(resp) -> list[dict]:
    return [json.loads(line) for line in resp.read().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- tests
def test_health_models_and_loopback(service):
    h = service.client.health()
    assert h["status"] == "ok" and h["generator"]["status"] == "HEALTHY"
    models = service.client.models()
    model = models["data"][0]
    assert model["prompt_encoder"] == "toy" and model["max_frames"] == 6 and model["aspect"] == "1:1"
    assert model["backend"]["backend"] == "ort" and models["batching"]["max_batch"] == 8
    assert models["limits"]["max_timeout_s"] == 60 and models["limits"]["max_queued"] == 4
    listeners = {c.laddr.ip for c in psutil.net_connections("inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == service.port}
    assert listeners == {"127.0.0.1"}


def test_contract_request_streams_frames_in_order_equal_to_direct_generate(service, direct):
    from starflow_trt.media.io import frames_to_uint8
    from starflow_trt.runtime import JacobiConfig

    body = {"prompt": PROMPTS[0], "seed": 0, "guidance": 3.0}
    conn, resp = service.open(body)
    assert resp.status == 200 and resp.getheader("Content-Type") == "application/x-ndjson"
    events = _finish(resp)
    conn.close()
    assert [e["type"] for e in events] == ["frame"] * 6 + ["done"]
    assert [e["index"] for e in events[:-1]] == list(range(6))
    stats = events[-1]["stats"]
    assert stats["seed"] == 0 and stats["frames"] == 6 and stats["batch_size"] == 1
    assert 0 < stats["time_to_first_frame"] <= stats["seconds"]["total"]
    want = _direct_frames(direct, PROMPTS[0], 0, 3.0, 6, JacobiConfig(16, 32, 1e-3))
    pngs = np.stack([decode_frame(e) for e in events[:-1]])                   # [T, H, W, 3] uint8
    png_err = int(np.abs(pngs.astype(int) - frames_to_uint8(want).astype(int)).max())   # rounded, as generate
    assert png_err <= 1, png_err
    # the same request asking for latents: equal to the direct run to float rounding
    video = service.client.generate({**body, "output": "latents"})
    got = torch.from_numpy(np.stack(video.frames))
    err = float((got - want).abs().max())
    assert got.shape == want.shape and err < 1e-4, err


def test_first_frame_arrives_before_generation_ends(service, direct):
    video = service.client.generate({**BLOCKER, "seed": 5})
    s = video.stats
    assert len(video.frames) == 6 and s["time_to_first_frame"] < 0.75 * s["seconds"]["total"]
    assert video.arrivals[0] < 0.75 * video.arrivals[-1]
    want = _direct_frames(direct, BLOCKER["prompt"], 5, 3.0, 6, None, denoise=False)
    err = float((torch.from_numpy(np.stack(video.frames)) - want).abs().max())
    assert err < 1e-4, err


def test_concurrent_requests_are_batched_and_equal_their_solo_results(service, direct):
    conn, blocker = _start_blocker(service)
    bodies = [{"prompt": PROMPTS[i], "seed": 10 + i, "guidance": 3.0, "sampler": "autoregressive", "frames": 2,
               "output": "latents"} for i in range(4)]

    def finish_blocker() -> None:
        assert [e["type"] for e in _finish(blocker)][-1] == "done"
        conn.close()

    results = generate_concurrently(service, bodies, finish_blocker)
    for body, video in zip(bodies, results):
        assert video.stats["batch_size"] > 1 and video.stats["batch_exact"]
        want = _direct_frames(direct, body["prompt"], body["seed"], 3.0, 2, None)
        err = float((torch.from_numpy(np.stack(video.frames)) - want).abs().max())
        assert err < 1e-4, err
    assert max(v.stats["batch_size"] for v in results) == 4


def test_image_conditioning_sse_and_mp4(service, direct):
    import cv2

    img = np.zeros((32, 32, 3), np.uint8)
    img[8:24, 8:24] = (255, 0, 0)                                  # a red square, RGB
    png = base64.b64encode(cv2.imencode(".png", img[..., ::-1])[1].tobytes()).decode()
    # autoregressive: the sliding Jacobi schedule with context reads (a, b) of the context positions that
    # were never computed (uninitialised memory), so its frames vary between identical calls (runtime bug)
    body = {"prompt": PROMPTS[0], "seed": 21, "guidance": 3.0, "frames": 4, "image": png, "output": "latents",
            "mp4": True, "fps": 4, "stream": "sse", "sampler": "autoregressive"}
    conn, resp = service.open(body)
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    conn.close()
    video = service.client.generate(body)
    assert len(video.frames) == 4 and video.mp4[4:8] == b"ftyp"
    # the same inputs by hand: the image fitted as generate --image does (media.io), its conditioning noise
    # from seed + 1 (the Pipeline's rule), the flow noise from the seed
    from starflow_trt.media.io import prepare_image

    pipe, toy = direct
    noise = torch.randn(1, 4, 3, 16, 16, generator=torch.Generator().manual_seed(21))
    image = prepare_image(img, 16, 16)                                          # [1, 1, 3, 16, 16]
    context = image + 0.15 * torch.randn(image.shape, generator=torch.Generator().manual_seed(22))
    want = pipe.generate(toy.encode([PROMPTS[0]]), toy.encode([""]), noise=noise, guidance=3.0, context=context,
                         jacobi=None, on_frame=lambda i, f: None).latents[0]
    err = float((torch.from_numpy(np.stack(video.frames)) - want).abs().max())
    assert err < 1e-4, err


def test_disconnect_after_frame_1_stops_production(service):
    conn, resp = service.open({**BLOCKER, "seed": 3})
    assert resp.status == 200
    request_id = resp.getheader("X-Starflow-Request")
    indices = [json.loads(resp.readline())["index"] for _ in range(2)]
    assert indices == [0, 1]
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    rec = service.record(request_id)
    assert rec["status"] == "cancelled"
    assert rec["frames_generated"] < 6, rec
    # the replica is free again: a new request is served
    assert len(service.client.generate({"prompt": PROMPTS[1], "seed": 1, "frames": 1}).frames) == 1


def test_bad_input_gets_400_naming_the_field(service):
    cases = [
        (b"{not json", "body"),
        ({"prompt": PROMPTS[0], "frames": 7, "sampler": "autoregressive"}, "sampler"),   # more frames: Jacobi window
        ({"prompt": PROMPTS[0], "colour": "red"}, "colour"),
        ({"prompt": PROMPTS[0], "guidance": -1}, "guidance"),
        ({"prompt": "a purple square"}, "prompt"),                         # the toy encoder's vocabulary
        ({"text_embeddings": base64.b64encode(b"\x93NUMPY junk").decode(), "guidance": 0}, "text_embeddings"),
        ({"prompt": "x" * 20000}, "prompt"),
    ]
    for body, field in cases:
        status, err = service.post(body)
        assert status == 400, (body, status, err)
        assert err["field"] == field and err["error"].startswith(f"{field}: ") and "\n" not in err["error"]
    status, err = service.post(b'{"prompt": "' + b"a " * (9 << 20) + b'"}')
    assert status == 400 and err["field"] == "body"
    # the request that took the machine: refused before any work, naming the limit and the flag
    status, err = service.post({"prompt": PROMPTS[0], "frames": 2000, "denoise": False})
    assert status == 400 and err["field"] == "frames" and "limit of 6" in err["error"] and "--max-frames" in err["error"]


def test_timeout_gives_408_before_start_and_an_error_event_after(service):
    conn, blocker = _start_blocker(service)
    t0 = time.monotonic()
    status, err = service.post({"prompt": PROMPTS[2], "seed": 2, "frames": 1, "timeout_s": 0.2})
    assert status == 408 and "timeout" in err["error"]
    assert time.monotonic() - t0 < 5
    took = _finish(blocker)[-1]["stats"]["seconds"]["total"]
    conn.close()
    # started, then out of time: the stream ends with an error event and the work stops
    conn, resp = service.open({**BLOCKER, "seed": 4, "timeout_s": round(took / 2, 3)})
    assert resp.status == 200
    request_id = resp.getheader("X-Starflow-Request")
    events = _finish(resp)
    conn.close()
    assert events[-1]["type"] == "error" and "timed out" in events[-1]["message"]
    assert all(e["type"] == "frame" for e in events[:-1])
    assert service.record(request_id)["frames_generated"] < 6


def test_overload_gives_503(service):
    conn, blocker = _start_blocker(service)
    statuses: list[int] = []
    complete: list[bool] = []
    refusals: list[bytes] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        c, resp = service.open({"prompt": PROMPTS[i % 5], "seed": i, "frames": 1, "output": "latents"})
        data = resp.read()
        c.close()
        with lock:
            statuses.append(resp.status)
            if resp.status == 200:
                complete.append(json.loads(data.splitlines()[-1])["type"] == "done")
            else:
                refusals.append(data)

    n = 20
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    _finish(blocker)
    conn.close()
    # the replica holds 8 (the blocker is one), the ingress queues 4: the rest are refused at once
    assert statuses.count(503) >= 1 and statuses.count(200) + statuses.count(503) == n, (statuses, refusals)
    assert all("overloaded" in json.loads(r)["error"] for r in refusals), refusals
    assert len(complete) >= 7 and all(complete)


def test_metrics_are_exported(service):
    import urllib.request

    wanted = ["ray_starflow_requests_total", "ray_starflow_time_to_first_frame_seconds_bucket",
              "ray_starflow_batch_size_bucket", "ray_starflow_frames_total", "ray_starflow_queue_length",
              "ray_starflow_streams_in_flight", "ray_serve_num_http_requests_total"]
    end, text = time.monotonic() + 60, ""
    while time.monotonic() < end:
        with urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=10) as r:
            text = r.read().decode()
        if all(w in text for w in wanted):
            break
        time.sleep(2)
    missing = [w for w in wanted if w not in text]
    assert not missing, missing
    ok = [ln for ln in text.splitlines() if ln.startswith("ray_starflow_requests_total") and 'status="ok"' in ln]
    assert ok and float(ok[0].rsplit(" ", 1)[1]) >= 3


def test_killed_replica_fails_its_request_cleanly_and_serve_restarts_it(service):
    from ray import serve

    old_pid = service.describe()["pid"]
    conn, resp = service.open({**BLOCKER, "seed": 6})
    assert resp.status == 200
    assert json.loads(resp.readline())["type"] == "frame"
    service.processes.snapshot()
    os.kill(old_pid, signal.SIGKILL)
    events = _finish(resp)
    conn.close()
    assert events and events[-1]["type"] == "error" and "died" in events[-1]["message"], events[-1:]
    end = time.monotonic() + 120
    while time.monotonic() < end:
        st = serve.status().applications["starflow"].deployments["VideoGenerator"]
        if str(getattr(st.status, "value", st.status)) == "HEALTHY":
            try:
                if service.describe()["pid"] != old_pid:
                    break
            except Exception:  # noqa: BLE001 - the old replica is still being replaced
                pass
        time.sleep(0.5)
    else:
        pytest.fail("Serve did not restart the killed replica within 120 s")
    service.processes.snapshot()
    video = service.client.generate({"prompt": PROMPTS[3], "seed": 8, "frames": 2})
    assert len(video.frames) == 2 and video.stats["replica"] != ""
