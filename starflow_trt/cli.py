"""``starflow-trt``: the command-line entry point (click).

Verbs live in :mod:`starflow_trt.commands`, one module each, imported lazily so ``--help`` and
``doctor`` start fast and never import TensorRT. Every failure ends here and prints ONE line:

* a bad argument (click usage error), a :class:`~starflow_trt.errors.StarflowError` (bad input
  file, config, directory) or an ``OSError`` (disk full, read-only, permissions): ``error: …``, exit 2;
* anything else is a bug: ``error: internal error …; rerun with --debug``, exit 1.

``--debug`` (or ``STARFLOW_TRT_DEBUG=1``) re-raises instead, with the traceback. ``--verbose`` shows
third-party log output (exporter, ORT quantization) that is hidden by default. SIGTERM exits 143:
while a staged output is being written it is removed and the process ends at once (no exception
unwinding through the exporter's native frames, which could abort); otherwise it unwinds, so
``finally`` blocks stop what the command started. ``serve`` takes SIGTERM and SIGINT itself while it
serves: a clean stop (:mod:`starflow_trt.serving.supervisor`), exit 0.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
from contextlib import ExitStack, contextmanager
from typing import Any, Iterator, Optional

import click

from . import __version__
from .errors import StarflowError

#: verb → "module:attribute" of its click command
COMMANDS = {
    "inspect": "starflow_trt.commands.inspect_cmd:inspect_command",
    "export": "starflow_trt.commands.export_cmd:export_command",
    "generate": "starflow_trt.commands.generate_cmd:generate_command",
    "score": "starflow_trt.commands.generate_cmd:score_command",
    "calibrate": "starflow_trt.commands.calibrate_cmd:calibrate_command",
    "build": "starflow_trt.commands.build_cmd:build_command",
    "verify": "starflow_trt.commands.verify_cmd:verify_command",
    "doctor": "starflow_trt.commands.build_cmd:doctor_command",
    "demo": "starflow_trt.commands.demo_cmd:demo_command",
    "bench": "starflow_trt.commands.bench_cmd:bench_command",
    "serve": "starflow_trt.commands.serve_cmd:serve_command",
}

#: exit status of a run stopped by SIGTERM (128 + signal number, like a shell)
SIGTERM_EXIT = 128 + signal.SIGTERM
SIGTERM_MESSAGE = "error: interrupted by SIGTERM; partial output removed"


class _Options:
    """Global flags of the current invocation (set by the group callback)."""

    debug = False
    verbose = False


def _debug_env() -> bool:
    return os.environ.get("STARFLOW_TRT_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _missing_dependency(exc: ImportError) -> Optional[str]:
    """The top-level name of a missing third-party module, or None when the ImportError is a bug here."""
    name = getattr(exc, "name", None)
    if not isinstance(exc, ModuleNotFoundError) or not name:
        return None  # "cannot import name X from Y": a broken install or a bug, never optional
    top = name.split(".")[0]
    return None if top == "starflow_trt" else top


class Interrupted(SystemExit):
    """SIGTERM turned into an exception (so ``finally`` / staging cleanup runs)."""


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        from . import logs
        from .staging import discard_active

        if discard_active():  # a staged output is being written: remove it and end here, no unwinding
            logs.echo(SIGTERM_MESSAGE, err=True)   # the real stderr, also inside logs.captured()
            os._exit(SIGTERM_EXIT)
        raise Interrupted(SIGTERM_EXIT)  # finally blocks stop what the command started

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use, and the one place errors are printed."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        target = COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except ImportError as exc:
            missing = _missing_dependency(exc)
            if missing is None:
                raise  # a bug in starflow-trt, not a missing optional dependency
            reason = f"needs the Python package {missing!r}, which is not installed"

            @click.command(name, help=f"(unavailable: {reason})", context_settings={"ignore_unknown_options": True})
            @click.argument("args", nargs=-1, type=click.UNPROCESSED)
            def unavailable(args: tuple) -> None:
                raise StarflowError(f"command {name!r} is not available in this installation: it {reason}; "
                                    "install the matching extra (pip install 'starflow-trt[cpu]' or '[gpu]')")
            return unavailable

    def main(self, args: Optional[list[str]] = None, prog_name: Optional[str] = None, complete_var: Optional[str] = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        _Options.debug, _Options.verbose = _debug_env(), False
        try:
            with _sigterm_as_exit():
                rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
            # non-standalone click returns ctx.exit(code) / --help / --version as the exit code
            return self._finish(rv if isinstance(rv, int) else 0, standalone_mode) if standalone_mode else rv
        except click.exceptions.Exit as exc:
            return self._finish(exc.exit_code, standalone_mode)
        except Interrupted:
            click.echo(SIGTERM_MESSAGE, err=True)
            return self._finish(SIGTERM_EXIT, standalone_mode)
        except (click.exceptions.Abort, KeyboardInterrupt):
            if _Options.debug:
                raise
            click.echo("error: interrupted; partial output removed", err=True)
            return self._finish(130, standalone_mode)
        except click.ClickException as exc:  # usage errors: bad option values, missing arguments
            if _Options.debug:
                raise
            hint = f" (see '{exc.ctx.command_path} --help')" if getattr(exc, "ctx", None) is not None else ""
            click.echo(f"error: {_one_line(exc.format_message())}{hint}", err=True)
            return self._finish(exc.exit_code, standalone_mode)
        except (StarflowError, OSError) as exc:
            if _Options.debug:
                raise
            click.echo(f"error: {_describe(exc)}", err=True)
            return self._finish(2, standalone_mode)
        except UnicodeDecodeError as exc:  # a text input (manifest, config) holding binary garbage
            if _Options.debug:
                raise
            click.echo(f"error: an input file that should be UTF-8 text (manifest.json, a config) is not "
                       f"({exc.reason} at byte {exc.start}); check the files passed, or re-export", err=True)
            return self._finish(2, standalone_mode)
        except ImportError as exc:  # a missing optional package is the user's to install; anything else a bug
            if _Options.debug:
                raise
            missing = _missing_dependency(exc)
            if missing is None:
                return self._internal(exc, standalone_mode)
            click.echo(f"error: this needs the Python package {missing!r}, which is not installed; install the "
                       "matching extra (pip install 'starflow-trt[cpu]' or '[gpu]')", err=True)
            return self._finish(2, standalone_mode)
        except Exception as exc:  # noqa: BLE001 - the last resort: one line, traceback only with --debug
            if _Options.debug:
                raise
            return self._internal(exc, standalone_mode)

    def _internal(self, exc: BaseException, standalone_mode: bool) -> int:
        click.echo(f"error: internal error ({type(exc).__name__}: {_one_line(exc)[:300]}); this is a bug in "
                   "starflow-trt: rerun with --debug for the traceback and report it", err=True)
        return self._finish(1, standalone_mode)

    @staticmethod
    def _finish(code: Optional[int], standalone_mode: bool) -> int:
        code = 0 if code is None else int(code)
        if standalone_mode:
            sys.exit(code)
        return code


def _describe(exc: BaseException) -> str:
    """One line for a user error; OSError gets its file name and a fix."""
    if isinstance(exc, OSError) and not isinstance(exc, StarflowError):
        where = f" {exc.filename}" if exc.filename else ""
        reason = exc.strerror or _one_line(exc) or type(exc).__name__
        return _one_line(f"cannot access{where}: {reason}; check the path, free space and permissions")
    return _one_line(exc)


def _set_debug(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    """Eager: set while parsing, so errors raised before the group callback (importing a verb) see it."""
    _Options.debug = _Options.debug or value
    return value


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="starflow-trt")
@click.option("--debug", is_flag=True, is_eager=True, callback=_set_debug,
              help="show the full traceback of an error (also STARFLOW_TRT_DEBUG=1)")
@click.option("-v", "--verbose", is_flag=True, help="show third-party log output (exporter, ONNX Runtime)")
@click.pass_context
def main(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """STARFlow-V deployment toolchain: export → calibrate → build → generate."""
    from . import logs

    _Options.verbose = verbose
    stack: ExitStack = ctx.with_resource(ExitStack())
    stack.enter_context(logs.policy(verbose))


if __name__ == "__main__":
    sys.exit(main())
