"""Output directories written safely: staging + atomic rename, replace only what starflow-trt wrote.

Every verb that writes a directory (export, calibrate, build, generate, score, demo) goes through
:func:`staged_directory`:

* the output is written into a unique hidden sibling ``.OUT.partial-<pid>-<random>`` and renamed
  over ``OUT`` at the end, so a reader never sees a half-written ``OUT`` and two concurrent runs
  never mix files (each has its own staging directory; the last one to finish either replaces the
  other's complete output, with ``force``, or is refused);
* an existing ``OUT`` is replaced only with ``force`` and only if starflow-trt owns it: it is empty,
  or holds a starflow-trt ``manifest.json`` (graph / engine directories), or the marker file this
  module writes into every other output (generate / score / demo directories). Never the current
  directory, one of its ancestors, or a directory holding an input of the run;
* staging directories of killed runs (their pid is gone) are removed on the next run into the same
  ``OUT``; an interrupted run (exception, Ctrl-C, SIGTERM via the CLI's handler) removes its own;
* files and directories get the usual permissions (``0666`` / ``0777`` minus the umask), not the
  ``0600`` / ``0700`` of ``mkstemp`` / ``mkdtemp``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

from .errors import StarflowError

PathLike = Union[str, os.PathLike]

#: marker written into every non-graph output directory (graph directories carry manifest.json)
MARKER_NAME = ".starflow-trt.json"
MARKER_FORMAT = "starflow-trt/output"
#: ``format`` field of a graph / engine manifest (see :mod:`starflow_trt.export.manifest`)
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "starflow-trt/graphs"
#: written into each staging directory: who owns it (stale ones are recognised by a dead pid)
STAGING_NAME = ".starflow-trt-staging.json"


class OutputError(StarflowError):
    """An output directory cannot be written or must not be replaced."""


#: this process's staging directories still being written, each with the parents its run created
_ACTIVE: dict[Path, list[Path]] = {}


def discard_active() -> bool:
    """Remove every staging directory a running :func:`staged_directory` is writing; True if there was one.

    For a signal handler that ends the process without unwinding (``os._exit``): unwinding an
    exception raised at an arbitrary bytecode can pass through native frames of the exporter or a
    runtime, which may abort the process instead of cleaning up.
    """
    held = list(_ACTIVE.items())
    for tmp, created in held:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
    _ACTIVE.clear()
    return bool(held)


# ------------------------------------------------------------------ permissions
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode(directory: bool = False) -> int:
    """The mode a plain ``open()`` / ``mkdir()`` would give: 0o666 / 0o777 minus the umask."""
    return (0o777 if directory else 0o666) & ~_umask()


def fix_mode(path: PathLike, directory: bool = False) -> None:
    """chmod a file made by ``mkstemp`` (0600) or a dir made by ``mkdtemp`` (0700) to the umask mode."""
    os.chmod(path, umask_mode(directory))


def normalise_modes(root: PathLike) -> None:
    """Give everything under ``root`` the umask modes (writers that used ``mkstemp`` leave 0600)."""
    file_mode, dir_mode = umask_mode(), umask_mode(directory=True)
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, dir_mode)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                executable = os.stat(path).st_mode & 0o100
                os.chmod(path, dir_mode if executable else file_mode)


def temp_file_beside(path: PathLike, suffix: str = "") -> str:
    """A new empty temp file in ``path``'s directory with umask permissions (for write + rename)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    fix_mode(tmp)
    return tmp


# ------------------------------------------------------------------ file hashes
def sha256_file(path: PathLike, chunk: int = 1 << 24) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------ strict JSON
def finite_json(data: Any) -> Any:
    """``data`` with every non-finite float (NaN, ±inf) replaced by ``None`` (JSON ``null``)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [finite_json(v) for v in data]
    return data


def write_json_atomic(path: PathLike, data: Any, strict: bool = False) -> Path:
    """Write JSON to a temp file beside ``path`` and rename it into place.

    ``strict``: the file is RFC 8259 JSON (``allow_nan=False``): non-finite floats become ``null``.
    """
    path = Path(path)
    if strict:
        data = finite_json(data)
    tmp = temp_file_beside(path)
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1, sort_keys=False, allow_nan=not strict)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# ------------------------------------------------------------------ ownership checks
def _is_ours(directory: Path) -> bool:
    """Empty, or holds a starflow-trt manifest.json, or our output marker."""
    try:
        entries = list(directory.iterdir())
    except OSError:
        return False
    if not entries:
        return True
    for name, fmt in ((MANIFEST_NAME, MANIFEST_FORMAT), (MARKER_NAME, MARKER_FORMAT)):
        try:
            data = json.loads((directory / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("format") == fmt:
            return True
    return False


def _within(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def check_output_dir(out: PathLike, force: bool = False, inputs: Iterable[Optional[PathLike]] = ()) -> Path:
    """Raise :class:`OutputError` unless ``out`` may be (re)written; returns ``out`` as a Path.

    ``out`` may not exist yet (fine), be an empty directory (fine), or, with ``force`` only, a
    directory starflow-trt wrote (see the module docstring). Never the current directory or an
    ancestor of it, never a directory that holds one of ``inputs``.
    """
    out = Path(out)
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if _within(cwd, resolved):
        where = "the current directory" if resolved == cwd else "an ancestor of the current directory"
        raise OutputError(f"output directory {out} is {where}; pass -o NEW_DIR (a directory of its own)")
    for item in inputs:
        if item is None or not isinstance(item, (str, os.PathLike)):
            continue
        if _within(Path(item).resolve(), resolved):
            raise OutputError(f"output directory {out} holds the input {item}; it cannot be replaced: "
                              "pass -o NEW_DIR outside it")
    if out.is_symlink() and not out.exists():
        raise OutputError(f"output {out} is a dangling symlink; remove it or pass another -o")
    if not out.exists():
        _check_creatable(out)
        return out
    if not out.is_dir():
        raise OutputError(f"output {out} exists and is not a directory; pass another -o")
    try:
        empty = not any(out.iterdir())
    except OSError as exc:
        raise OutputError(f"cannot read output directory {out} ({exc.strerror}); pass another -o") from exc
    if empty:
        return out
    if not force:
        raise OutputError(f"{out} exists and is not empty; choose another -o or pass --force to replace it")
    if not _is_ours(resolved):
        raise OutputError(f"{out} was not written by starflow-trt (no manifest.json or {MARKER_NAME}); "
                          "refusing to replace it even with --force: remove it yourself or pass another -o")
    return out


def _check_creatable(out: Path) -> None:
    """``out`` does not exist: its nearest existing ancestor must be a writable directory."""
    missing = _missing_parents(out)
    parent = (missing[-1] if missing else out.absolute()).parent
    if not parent.is_dir():
        raise OutputError(f"cannot create output directory {out}: {parent} is a file, not a directory; "
                          "pass another -o")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create output directory {out}: {parent} is not writable (read-only file "
                          "system or permissions); pass -o a writable location")


# ------------------------------------------------------------------ staging
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(staging: Path) -> Optional[dict]:
    try:
        data = json.loads((staging / STAGING_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def clean_stale(out: PathLike) -> list[Path]:
    """Remove staging / swap directories of ``out`` left by runs that were killed (pid gone, this host)."""
    out = Path(out)
    removed = []
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return removed
    host = socket.gethostname()
    for path in siblings:
        if not (path.name.startswith(f".{out.name}.partial-") or path.name.startswith(f".{out.name}.old-")):
            continue
        if path.is_symlink() or not path.is_dir():
            continue
        owner = _owner(path)
        if owner is None or owner.get("host") != host or _pid_alive(int(owner.get("pid", -1))):
            continue  # not ours, another machine's, or still running: leave it alone
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _mark_staging(path: Path) -> None:
    (path / STAGING_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}),
                                     encoding="utf-8")


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


@contextmanager
def staged_directory(out: PathLike, force: bool = False, inputs: Iterable[Optional[PathLike]] = (),
                     kind: Optional[str] = None) -> Iterator[Path]:
    """Yield a fresh staging directory beside ``out``; on success it replaces ``out`` atomically.

    Checks ``out`` first (:func:`check_output_dir`: ``force`` replaces only a directory starflow-trt
    wrote, never one holding ``inputs``). ``kind`` (``generate``, ``score``, ``demo``, ...) writes the
    ownership marker into outputs that have no manifest.json. On any exception (also
    KeyboardInterrupt / SystemExit) the staging directory is removed and ``out`` is untouched.
    """
    inputs = list(inputs)
    out = check_output_dir(out, force, inputs)
    created = _missing_parents(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    except OSError as exc:
        _remove_empty(created)
        raise OutputError(f"cannot create output directory {out} ({exc.strerror or exc}); "
                          "pass -o a writable location") from exc
    try:
        _ACTIVE[tmp] = created
        fix_mode(tmp, directory=True)
        _mark_staging(tmp)
        yield tmp
        _ACTIVE.pop(tmp, None)  # from here on an interruption unwinds (the commit must not stop halfway)
        (tmp / STAGING_NAME).unlink()
        normalise_modes(tmp)
        if kind is not None:
            (tmp / MARKER_NAME).write_text(json.dumps({"format": MARKER_FORMAT, "kind": kind}) + "\n",
                                           encoding="utf-8")
        _commit(tmp, out, force, inputs)
    except BaseException:
        _ACTIVE.pop(tmp, None)
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)  # a failed run leaves no trace, not even the parents it made
        raise


def _missing_parents(out: Path) -> list[Path]:
    """Ancestors of ``out`` that do not exist yet, deepest first."""
    missing = []
    parent = out.absolute().parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    return missing


def _remove_empty(directories: list[Path]) -> None:
    for d in directories:  # deepest first; stops at one that is not empty (another run's)
        try:
            d.rmdir()
        except OSError:
            return


def _commit(tmp: Path, out: Path, force: bool, inputs: list) -> None:
    """Rename ``tmp`` over ``out``; re-checks ``out``, which another run may have written meanwhile."""
    try:
        check_output_dir(out, force, inputs)
    except OutputError as exc:
        raise OutputError(f"{exc} (it was written by another run while this one ran; nothing replaced)") from None
    try:
        os.rename(tmp, out)  # out absent or an empty directory: one atomic step
        return
    except OSError as exc:
        if not out.exists() and not out.is_symlink():
            raise OutputError(f"cannot move the output into {out} ({exc.strerror}); pass another -o") from exc
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    _mark_staging(old)
    os.rename(out, old / "replaced")
    try:
        os.rename(tmp, out)
    except OSError as exc:  # put the previous output back
        os.rename(old / "replaced", out)
        shutil.rmtree(old, ignore_errors=True)
        raise OutputError(f"cannot move the output into {out} ({exc.strerror}); pass another -o") from exc
    _remove(old / "replaced")
    shutil.rmtree(old, ignore_errors=True)
