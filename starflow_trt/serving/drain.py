"""The ingress's part of a clean stop: refuse new requests, let running ones finish, end the rest.

``starflow-trt serve`` calls the ingress's ``drain(timeout_s)`` on SIGTERM / SIGINT. From then on new
generation requests get 503; requests already taken (streams, jobs, requests still waiting for their
batch) run on until ``timeout_s`` passes. Then the cutoff ends every one still running: a stream with
a final ``{"type": "error", ...}`` event, a request not yet started with 503, a job as failed. No Ray
here: the ingress counts its work through :meth:`Drain.enter` / :meth:`Drain.leave` and waits for
events through :meth:`Drain.next`, which raises :class:`Cutoff` when the drain ends the request.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

T = TypeVar("T")

#: after the cutoff, how long the requests it ended get to send their last event
END_GRACE_S = 10.0
#: the one-line error of a request refused while draining
REFUSED = "server shutting down: not taking new requests; retry on another instance"


class Cutoff(Exception):
    """The drain ended with this request still running: end it (the message is the client's)."""


class Drain:
    """Counts the ingress's running requests and, once :meth:`run` starts, refuses new ones and ends the
    rest at the cutoff. Lives on one event loop (the replica's)."""

    def __init__(self) -> None:
        self.refusing = False
        self.running = 0
        self.ended = 0
        self.cut_reason = ""
        self._idle = asyncio.Event()
        self._idle.set()
        self._cut = asyncio.Event()

    def enter(self) -> None:
        """A request (stream or job) starts: :meth:`run` waits for it."""
        self.running += 1
        self._idle.clear()

    def leave(self) -> None:
        self.running -= 1
        if self.running <= 0:
            self._idle.set()

    async def next(self, awaitable: Awaitable[T], timeout_s: float) -> T:
        """``awaitable``'s result; ``asyncio.TimeoutError`` after ``timeout_s``; :class:`Cutoff` if the drain
        ends the request first (the awaitable is cancelled in both cases)."""
        work = asyncio.ensure_future(awaitable)
        cut = asyncio.ensure_future(self._cut.wait())
        try:
            done, _ = await asyncio.wait((work, cut), timeout=max(timeout_s, 0.0),
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, cut):
                task.cancel()
            await asyncio.gather(work, cut, return_exceptions=True)
        if cut in done:   # first: a request that still gets events past the cutoff ends all the same
            self.ended += 1
            raise Cutoff(f"server shutting down: {self.cut_reason}; retry the request on another instance")
        if work in done:
            return work.result()
        raise asyncio.TimeoutError

    async def run(self, timeout_s: float, end_grace_s: float = END_GRACE_S) -> dict:
        """Refuse new requests, give the running ones ``timeout_s`` seconds, end the rest; returns counts.

        A second call shortens the first's wait (``run(0)``: end them now); both return once the
        requests are gone (or ``end_grace_s`` after the cutoff).
        """
        first = not self.refusing
        self.refusing = True
        running = self.running
        if not await self._wait_idle(timeout_s):
            if not self._cut.is_set():
                self.cut_reason = (f"the request did not finish within the drain timeout of {timeout_s:g} s" if first
                                   else "the request was ended before the drain timeout, by a second stop request")
                self._cut.set()
            await self._wait_idle(end_grace_s)
        return {"running": running, "ended": self.ended, "left": self.running}

    async def _wait_idle(self, timeout_s: float) -> bool:
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), max(timeout_s, 0.0))
        except asyncio.TimeoutError:
            return self._idle.is_set()
        return True
