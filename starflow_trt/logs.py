"""Quiet by default: third-party chatter is hidden unless ``--verbose``; our own lines and bars stay.

Three sources of noise, three mechanisms:

* Python logging (onnx_ir "Attribute type is ambiguous", torch.onnx "torchvision is not installed",
  ORT quantization's root-logger warnings and per-tensor info lines): :func:`policy` sets the levels
  of the third-party loggers and gives the root logger a handler (so ``logging.warning`` no longer
  installs a stderr handler by itself); ``--verbose`` shows everything from INFO up instead.
* Python warnings (torchvision, onnxscript, torch.export): ignored unless ``--verbose``.
* ``print`` and C-level writes to stdout / stderr (ORT quantization's calibrator, ORT's C++
  logger): :func:`captured` redirects them (file descriptors 1 and 2) around a noisy call, while
  :func:`echo` and :func:`progress` keep writing to the real terminal.

Everything is restored when the CLI invocation ends (tests run many invocations in one process).
"""

from __future__ import annotations

import io
import logging
import os
import sys
import tempfile
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from typing import Any, Iterator, Optional, TextIO

#: loggers (and their children) silenced unless --verbose
NOISY_LOGGERS = ("torch", "onnx_ir", "onnxscript", "onnx", "onnxruntime", "onnxslim", "onnxconverter_common",
                 "torchvision", "PIL", "matplotlib", "urllib3", "filelock")


class _State:
    verbose = False
    out: Optional[TextIO] = None  # where echo / progress write while output is captured
    err: Optional[TextIO] = None


def verbose() -> bool:
    return _State.verbose


def _noisy(name: str) -> bool:
    return any(name == n or name.startswith(n + ".") for n in NOISY_LOGGERS)


@contextmanager
def policy(verbose: bool = False) -> Iterator[None]:
    """Logging levels and warning filters for one CLI invocation (restored on exit)."""
    root = logging.getLogger()
    saved_root = (root.level, list(root.handlers))
    names = [n for n in list(logging.root.manager.loggerDict) if _noisy(n)] + list(NOISY_LOGGERS)
    saved = {n: logging.getLogger(n).level for n in dict.fromkeys(names)}
    previous = _State.verbose
    _State.verbose = verbose
    with warnings.catch_warnings():
        if verbose:
            warnings.simplefilter("default")
            handler: logging.Handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            root.setLevel(logging.INFO)
        else:
            warnings.simplefilter("ignore")
            handler = logging.NullHandler()
            root.setLevel(logging.ERROR)
            for name in saved:
                logging.getLogger(name).setLevel(logging.ERROR)
        root.addHandler(handler)
        try:
            yield
        finally:
            root.removeHandler(handler)
            root.setLevel(saved_root[0])
            for name, level in saved.items():
                logging.getLogger(name).setLevel(level)
            _State.verbose = previous


def _ui(err: bool) -> TextIO:
    stream = _State.err if err else _State.out
    if stream is not None:
        return stream
    return sys.stderr if err else sys.stdout


def echo(message: str = "", err: bool = False) -> None:
    """Print one of our own lines (reaches the terminal even inside :func:`captured`)."""
    stream = _ui(err)
    stream.write(f"{message}\n")
    stream.flush()


def progress(**kwargs: Any):
    """A tqdm bar on the real stderr (hidden when stderr is not a terminal, unless --verbose)."""
    from tqdm import tqdm

    stream = _ui(err=True)
    kwargs.setdefault("disable", None if not _State.verbose else False)  # None: off when not a tty
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(file=stream, **kwargs)


def _fd_of(stream: Any) -> Optional[int]:
    try:
        return stream.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        return None


@contextmanager
def captured() -> Iterator[None]:
    """Hide what third-party code prints around a noisy call (unless --verbose).

    Python-level ``print`` and C-level writes to file descriptors 1 / 2 go to a temp file that is
    discarded; :func:`echo` and :func:`progress` keep writing to the original streams.
    """
    if _State.verbose:
        yield
        return
    saved_out, saved_err = _State.out, _State.err
    ui_out, ui_err = _ui(False), _ui(True)
    for s in (sys.stdout, sys.stderr, ui_out, ui_err):
        try:
            s.flush()
        except (AttributeError, OSError, ValueError):
            pass
    sink = tempfile.TemporaryFile()
    dups: dict[int, int] = {}
    opened: list[TextIO] = []
    try:
        for fd in (1, 2):
            try:
                dups[fd] = os.dup(fd)
            except OSError:
                continue
        # our own output keeps going where it went: a stream on the saved descriptor when it was fd 1/2
        for which, stream in (("out", ui_out), ("err", ui_err)):
            fd = _fd_of(stream)
            if fd in dups:
                stream = os.fdopen(os.dup(dups[fd]), "w", buffering=1, encoding="utf-8", errors="replace")
                opened.append(stream)
            setattr(_State, which, stream)
        for fd in dups:
            os.dup2(sink.fileno(), fd)
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
            yield
    finally:
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except (AttributeError, OSError, ValueError):
                pass
        for fd, dup in dups.items():
            os.dup2(dup, fd)
            os.close(dup)
        for stream in opened:
            stream.close()
        sink.close()
        _State.out, _State.err = saved_out, saved_err
