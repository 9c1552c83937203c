"""``starflow-trt serve`` stops cleanly on SIGTERM: running streams end with ``done`` or a final error event,
new requests get 503, the exit status is 0 (or 143) and no process of the server is left.

Each test runs the CLI on the bundled toy export (ORT, CPU, HTTP on 127.0.0.1) in a session of its own,
so a signal to its process group reaches neither pytest nor the other workers. Every process below the
CLI is remembered (PID and start time) while it serves, and checked gone once the CLI has exited.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install 'starflow-trt[serve]'")
psutil = pytest.importorskip("psutil", reason="psutil is not installed: pip install 'starflow-trt[serve]'")

pytestmark = pytest.mark.slow   # a Ray cluster per test: about a minute each on 2 shared cores

REPO = Path(__file__).resolve().parents[1]
#: seconds on the toy (token by token, frames streamed one by one): finishes within a long drain
SHORT = {"prompt": "a green disc moving up", "guidance": 3.0, "sampler": "autoregressive", "denoise": False,
         "frames": 6, "output": "latents"}
#: minutes on the toy (400 frames through a 6-frame Jacobi window, every sweep): only the drain timeout ends it
LONG = {"prompt": "a red square moving right", "frames": 400, "jacobi": {"window": 6, "threshold": 0},
        "denoise": False, "output": "latents"}
STARTUP_S = 300      # Ray, Serve and the replica on a busy machine
EVENTS_S = 120       # a stream's end after the signal
STREAM_HEADERS = {"Content-Type": "application/json", "Accept": "application/x-ndjson"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Stream:
    """One streaming request read on a thread: its events and when the last one came."""

    conn: http.client.HTTPConnection
    events: list = field(default_factory=list)
    ended_at: Optional[float] = None
    error: Optional[BaseException] = None

    def read(self, resp: http.client.HTTPResponse) -> None:
        try:
            for line in resp:
                if line.strip():
                    self.events.append(json.loads(line))
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.conn.close()


class Server:
    """``starflow-trt serve`` on loopback in its own session, and every process it started."""

    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log
        self.seen: dict[int, tuple[float, str]] = {}

    def snapshot(self) -> None:
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                self.seen.setdefault(p.pid, (p.create_time(), p.name()))

    def left(self) -> list[str]:
        out = []
        for pid, (created, name) in self.seen.items():
            with contextlib.suppress(psutil.NoSuchProcess):
                p = psutil.Process(pid)
                if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(f"{pid} {name}")
        return out

    def request(self, method: str, path: str, body: Optional[dict] = None,
                headers: Optional[dict] = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request(method, path, body=None if body is None else json.dumps(body), headers=headers or {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def streams(self, bodies: list[dict]) -> list[Stream]:
        """Send streaming requests together (one batch) and return once each has its first frame: running."""
        conns = [http.client.HTTPConnection("127.0.0.1", self.port, timeout=EVENTS_S) for _ in bodies]
        for conn, body in zip(conns, bodies):
            conn.request("POST", "/v1/videos/stream", body=json.dumps(body), headers=STREAM_HEADERS)
        streams = []
        for conn in conns:
            resp = conn.getresponse()
            assert resp.status == 200, resp.read()
            stream = Stream(conn, [json.loads(resp.readline())])
            assert stream.events[0]["type"] == "frame", stream.events
            threading.Thread(target=stream.read, args=(resp,), daemon=True).start()
            streams.append(stream)
        return streams

    def wait_draining(self, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            status, body = self.request("GET", "/healthz")
            if status == 503 and json.loads(body)["status"] == "draining":
                return
            time.sleep(0.1)
        pytest.fail(f"the server did not report draining within {timeout} s")

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def serve_cli(export: Path, tmp_path: Path, drain_timeout_s: float) -> Iterator[Server]:
    port = _free_port()
    log = tmp_path / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "starflow_trt.cli", "serve", str(export), "--port", str(port), "--timeout", "600",
             "--max-frames", str(LONG["frames"]), "--drain-timeout", f"{drain_timeout_s:g}", "--batch-wait-ms", "300",
             "--videos-dir", str(tmp_path / "videos")],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server(proc, port, log)
    try:
        end = time.monotonic() + STARTUP_S
        while time.monotonic() < end and proc.poll() is None:
            with contextlib.suppress(OSError):
                if server.request("GET", "/healthz")[0] == 200:
                    break
            time.sleep(0.5)
        else:
            pytest.fail(f"serve did not become healthy in {STARTUP_S} s (exit {proc.poll()}):\n{server.output()}")
        server.snapshot()
        yield server
    finally:
        if proc.poll() is None:       # a failed test: stop it, and kill what is left
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for entry in server.left():
            with contextlib.suppress(psutil.Error):
                psutil.Process(int(entry.split()[0])).kill()


def _assert_refused(server: Server) -> None:
    """New requests while draining: 503 with a one-line JSON error, on the streaming and the job API."""
    status, body = server.request("POST", "/v1/videos/stream", {**SHORT, "seed": 1}, STREAM_HEADERS)
    assert status == 503 and body.count(b"\n") == 0, (status, body)
    assert "shutting down" in json.loads(body)["error"]
    status, body = server.request("POST", "/v1/videos", {"prompt": SHORT["prompt"], "seconds": "1"},
                                  {"Content-Type": "application/json", "Accept": "application/json"})
    assert status == 503 and body.count(b"\n") == 0, (status, body)
    assert "shutting down" in json.loads(body)["error"]["message"]


def _assert_stopped(server: Server, signalled: float, bound_s: float) -> float:
    """The CLI exits 0 or 143 within ``bound_s`` and leaves no process; returns its exit time after the signal."""
    try:
        code = server.proc.wait(bound_s)
    except subprocess.TimeoutExpired:
        pytest.fail(f"serve did not exit within {bound_s} s of the signal:\n{server.output()}")
    took = time.monotonic() - signalled
    assert code in (0, 143), f"exit {code}:\n{server.output()}"
    names = " ".join(name for _, name in server.seen.values())
    assert "raylet" in names and "gcs_server" in names, f"Ray's processes were not seen: {names}"
    assert not server.left(), f"processes of the server still running: {server.left()}"
    assert "Traceback" not in server.output() and "SIGABRT" not in server.output(), server.output()
    return took


def test_sigterm_lets_running_streams_finish_refuses_new_ones_and_stops_ray(toy_export, tmp_path):
    with serve_cli(toy_export, tmp_path, drain_timeout_s=60) as server:
        streams = server.streams([{**SHORT, "seed": seed} for seed in (11, 12)])
        server.snapshot()
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)          # the serve process alone
        server.wait_draining()
        _assert_refused(server)
        took = _assert_stopped(server, signalled, bound_s=60 + 90)
        for s in streams:
            assert s.error is None and s.ended_at is not None, s.error
            assert [e["type"] for e in s.events] == ["frame"] * 6 + ["done"], s.events[-1]
            assert s.events[-1]["stats"]["batch_size"] == 2       # both were running when the signal came
        drained = max(s.ended_at for s in streams) - signalled
        print(f"\nSIGTERM to the process: streams done {drained:.1f} s after the signal, exit after {took:.1f} s")


def test_sigterm_to_the_process_group_ends_long_streams_with_an_error_event(toy_export, tmp_path):
    drain_s = 5.0
    with serve_cli(toy_export, tmp_path, drain_timeout_s=drain_s) as server:
        streams = server.streams([{**LONG, "seed": seed} for seed in (21, 22)])
        server.snapshot()
        signalled = time.monotonic()
        os.killpg(server.proc.pid, signal.SIGTERM)       # the whole process group, as a service manager does
        server.wait_draining()
        _assert_refused(server)
        took = _assert_stopped(server, signalled, bound_s=drain_s + 90)
        for s in streams:
            assert s.error is None and s.ended_at is not None, s.error
            *frames, last = s.events
            assert last["type"] == "error" and "drain timeout" in last["message"], last
            assert 1 <= len(frames) < LONG["frames"] and all(e["type"] == "frame" for e in frames)
            assert "2 running, 2 ended unfinished" in server.output()
            assert s.ended_at - signalled >= drain_s - 0.5
        ended = max(s.ended_at for s in streams) - signalled
        print(f"\nSIGTERM to the group: streams ended {ended:.1f} s after the signal (drain timeout {drain_s:g} s), "
              f"exit after {took:.1f} s")
