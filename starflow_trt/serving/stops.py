"""Stop requests: SIGTERM / SIGINT (or a line from the supervisor) recorded, never raised.

A handler that only records lets the waiting loop run the stop in order (drain, stop Serve, stop
Ray) instead of unwinding from wherever the signal landed, possibly inside Ray's native code.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType
from typing import Any, Optional

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequests:
    """What asked this process to stop, in order (``"SIGTERM"``, ``"SIGINT"``, ``"stop"``, ``"eof"``)."""

    def __init__(self) -> None:
        self.reasons: list[str] = []
        self.first_at: Optional[float] = None     # time.monotonic() of the first request
        self._new = threading.Event()
        self._previous: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.reasons)

    def add(self, reason: str) -> None:
        if self.first_at is None:
            self.first_at = time.monotonic()
        self.reasons.append(reason)
        self._new.set()

    def wait(self, timeout_s: float) -> None:
        """Sleep until a new request arrives or ``timeout_s`` passes (callers compare ``len`` before and after)."""
        self._new.wait(timeout_s)
        self._new.clear()

    # ------------------------------------------------------------ signals
    def catch_signals(self) -> None:
        """Record SIGTERM and SIGINT from now on (main thread only); call it again after ``ray.init`` and
        ``ray.shutdown``.

        ``ray.init`` installs its own SIGTERM handler (``sys.exit(signum)``, ray/_private/worker.py) and,
        under it, abseil's failure-signal handler (src/ray/util/logging.cc), which arms a 3 s alarm that
        aborts the process (SIGABRT, exit 134) when the exit takes longer: ray-project/ray#37288 (a
        handler of one's own before ``ray.init`` aborts), #64830 (``alarm_on_failure_secs`` left at
        abseil's default). ``signal.signal`` replaces both at the C level. ``ray.shutdown`` uninstalls
        abseil's handler by resetting SIGTERM to the default action (measured with Ray 2.60: a SIGTERM
        after it kills the process), hence the second call.
        """
        for sig in SIGNALS:
            previous = signal.signal(sig, self._on_signal)
            self._previous.setdefault(sig, previous)

    def release_signals(self) -> None:
        """Put back the handlers that were there before the first :meth:`catch_signals`."""
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)   # None: set outside Python
        self._previous.clear()

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        self.add(signal.Signals(signum).name)
