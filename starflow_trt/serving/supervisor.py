"""The ``starflow-trt serve`` process: runs :mod:`.server` in a session of its own and stops it cleanly.

Why a second process: Ray starts its processes (GCS, raylet, Serve's proxy and replicas) from the
process that calls ``ray.init``, in that process's process group, so a SIGTERM to the group of
``starflow-trt serve`` (``kill -- -PGID``, a container or service manager stopping it, Ctrl-C in a
terminal for SIGINT) would reach them all at once and cut running requests off. The server and all
it starts live in a new session instead; this process takes SIGTERM / SIGINT and forwards each as a
stop request (a line on the server's stdin: the first drains, a second ends running requests now).
It then waits for the server to exit, at most the drain timeout plus :data:`STOP_GRACE_S` after the
first request, and makes sure no process of that session is left (SIGTERM, then SIGKILL).

Exit status: 0 after a stop by signal; the server's own status when it ends by itself (2: bad input,
1: a failure); 1 when it had to be killed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import IO

import click
import psutil

from . import server as server_module
from .drain import END_GRACE_S
from .server import STOP_LINE, ServerSpec
from .stops import StopRequests

#: after the drain (timeout + the ingress's END_GRACE_S), how long stopping Serve and Ray may take
STOP_GRACE_S = 60.0
#: how long processes left in the server's session get between SIGTERM and SIGKILL
KILL_GRACE_S = 5.0
#: how often the wait loop looks at the server when no signal wakes it
POLL_S = 0.2


def supervise(spec: ServerSpec) -> int:
    """Run the server for ``spec`` until it ends or a signal stops it; returns the exit status."""
    stops = StopRequests()
    stops.catch_signals()
    try:
        server = subprocess.Popen([sys.executable, "-m", server_module.__name__], stdin=subprocess.PIPE, text=True,
                                  start_new_session=True)
        try:
            return _wait(server, spec, stops)
        finally:
            _close(server.stdin)          # a server still running reads the end of input as a stop request
            end_session(server)
    finally:
        stops.release_signals()


def _wait(server: subprocess.Popen, spec: ServerSpec, stops: StopRequests) -> int:
    _send(server.stdin, spec.to_json())
    bound_s = spec.drain_timeout_s + END_GRACE_S + STOP_GRACE_S
    forwarded, give_up = 0, None
    while (code := server.poll()) is None:
        if len(stops) > forwarded:
            for reason in stops.reasons[forwarded:]:
                _send(server.stdin, f"{STOP_LINE} {reason}")
            forwarded = len(stops)
            if give_up is None:
                give_up = time.monotonic() + bound_s
        if give_up is not None and time.monotonic() > give_up:
            click.echo(f"error: the server did not stop within {bound_s:g} s of the stop request; "
                       "killing its processes", err=True)
            return 1
        stops.wait(POLL_S)
    return 128 - code if code < 0 else code      # killed by a signal: the shell's 128 + N


def end_session(server: subprocess.Popen) -> list[int]:
    """Make sure no process of the server's session is left; returns the pids that had to be signalled.

    After a clean stop the session is empty once Ray's processes have exited; whatever is still there
    after :data:`KILL_GRACE_S` gets SIGTERM, and SIGKILL :data:`KILL_GRACE_S` later.
    """
    signalled: list[int] = []
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        left = session_processes(server.pid)
        if sig is not None:
            for proc in left:
                _signal(proc, sig)
            signalled += [p.pid for p in left if p.pid not in signalled]
        end = time.monotonic() + KILL_GRACE_S
        while left and time.monotonic() < end:
            server.poll()                 # reaps the server itself
            time.sleep(0.1)
            left = session_processes(server.pid)
        if not left:
            break
    server.poll()
    return signalled


def session_processes(sid: int) -> list[psutil.Process]:
    """The live (not zombie) processes of session ``sid``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) == sid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, OSError):   # gone meanwhile
            pass
    return found


def _signal(proc: psutil.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except psutil.Error:
        pass


def _send(stream: IO[str], line: str) -> None:
    try:
        stream.write(line + "\n")
        stream.flush()
    except (BrokenPipeError, ValueError):   # the server has exited (or its input is closed)
        pass


def _close(stream: IO[str]) -> None:
    try:
        stream.close()
    except BrokenPipeError:
        pass
