"""``score --video``: one .npy, a directory of .npy latents, or a text file listing .npy files.

Files hold one clip [T, C, H, W] or clips [B, T, C, H, W]; they are read (``allow_pickle=False``)
only when their chunk is scored, so a data set never has to fit in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from ..errors import InputError

NPY_MAGIC = b"\x93NUMPY"


@dataclass(frozen=True)
class LatentFile:
    """One file of the stream: its path, its clips (rows) and their frames."""

    path: Path
    clips: int
    frames: int
    clip: bool          # True: a single clip [T, C, H, W]
    grid: tuple[int, int] = (0, 0)   # latent (H, W) of its clips

    @property
    def shape(self) -> tuple[int, int, int]:
        """(T, H, W) of one clip: clips of one shape share a chunk."""
        return (self.frames, *self.grid)


def _is_npy(path: Path) -> bool:
    if path.suffix.lower() == ".npy":
        return True
    with open(path, "rb") as f:
        return f.read(len(NPY_MAGIC)) == NPY_MAGIC


def video_files(path: str) -> list[Path]:
    """The .npy files ``--video`` names: itself, a directory's ``*.npy`` (sorted), or a list file's
    lines (blank lines and ``#`` comments skipped; relative paths from the list's directory)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() == ".npy" and f.is_file())
        if not files:
            raise InputError(f"--video directory {path!r} holds no .npy files; save latents with numpy.save")
        return files
    if _is_npy(p):
        return [p]
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--video {path!r} is neither a .npy array nor a UTF-8 list of .npy files") from exc
    files = [(p.parent / line.strip()) for line in lines if line.strip() and not line.strip().startswith("#")]
    if not files:
        raise InputError(f"--video list {path!r} names no files; write one .npy path per line")
    for f in files:
        if not f.is_file():
            raise InputError(f"--video list {path!r} names {str(f)!r}, which is not a file; fix the list")
    return files


def export_geometries(geo) -> tuple[tuple[int, int, int], ...]:
    """(C, H, W) latents of every token grid a :class:`~starflow_trt.geometry.Geometry` exports, default first."""
    return tuple((geo.channel_size, h * geo.patch_size, w * geo.patch_size) for h, w in geo.grids)


def inspect(path: Path, geometries: Sequence[tuple[int, int, int]], max_frames: int) -> LatentFile:
    """Read the header of one latent file and check its shape against one of ``geometries`` (C, H, W)
    (an export's grids: :func:`export_geometries`) and ``max_frames``."""
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise InputError(f"--video file {str(path)!r} is not a readable .npy array ({reason}); "
                         "save it with numpy.save") from exc
    shape = array.shape
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu":
        raise InputError(f"--video file {str(path)!r} holds {getattr(array, 'dtype', '?')} data; save float latents")
    geometries = [tuple(g) for g in geometries]
    ok = array.ndim in (4, 5) and tuple(shape[-3:]) in geometries and 0 not in shape
    if not ok:
        C, H, W = geometries[0]
        others = "".join(f", {h}x{w}" for _, h, w in geometries[1:])
        raise InputError(f"--video file {str(path)!r} has shape {shape}; expected a clip [T, {C}, {H}, {W}] "
                         f"or clips [B, T, {C}, {H}, {W}] (this export's geometry"
                         + (f"; other exported H x W: {others[2:]})" if others else ")"))
    frames = shape[-4]
    if frames > max_frames:
        raise InputError(f"--video file {str(path)!r} has {frames} frames; this export scores at most "
                         f"{max_frames}: cut the clips or re-export with --max-frames")
    return LatentFile(path, 1 if array.ndim == 4 else shape[0], frames, array.ndim == 4, (shape[-2], shape[-1]))


def load_clips(f: LatentFile) -> np.ndarray:
    """[B, T, C, H, W] float32 clips of one file; non-finite values are refused."""
    array = np.load(f.path, allow_pickle=False).astype(np.float32)
    if not np.isfinite(array).all():
        raise InputError(f"--video file {str(f.path)!r} contains NaN or Inf (or values beyond float32); fix the file")
    return array[None] if f.clip else array


def chunks(files: list[LatentFile], max_batch: int) -> Iterator[tuple[int, np.ndarray]]:
    """(first clip index, clips [b, T, C, H, W]) with b <= max_batch: consecutive clips of one shape
    (a chunk ends where the frame count or the grid changes). Each file is loaded once, when first needed."""
    pending: list[np.ndarray] = []
    start = index = 0
    for f in files:
        clips = load_clips(f)
        for row in clips:
            if pending and (len(pending) == max_batch or pending[0].shape != row.shape):
                yield start, np.stack(pending)
                pending, start = [], index
            pending.append(row)
            index += 1
    if pending:
        yield start, np.stack(pending)


def count_chunks(files: list[LatentFile], max_batch: int) -> int:
    """How many chunks :func:`chunks` yields (for the progress bar)."""
    n, size, shape = 0, 0, None
    for f in files:
        for _ in range(f.clips):
            if size == 0 or size == max_batch or f.shape != shape:
                n, size = n + 1, 0
            size, shape = size + 1, f.shape
    return n
