"""Where ``bench`` reads and writes: packaged configs in, results and cache under one output directory.

Configs ship inside the package (``starflow_trt/bench/configs``, ``starflow_trt/configs``) and are
found with :mod:`importlib.resources`, so an installed wheel works from any directory. Everything
``bench`` writes goes under its output directory (default ``./bench_out``): the results at its top,
random checkpoints, exports and calibrations in ``<out>/.cache`` unless another cache is named.
Nothing is ever written into the installed package.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional, Union

from ..errors import StarflowError

#: default output directory, relative to the current directory
DEFAULT_OUT = Path("bench_out")
#: bench configs shipped in ``starflow_trt/bench/configs``
BENCH_CONFIGS = ("bench.yaml", "bench_quick.yaml")
#: the real model's config, for the GPU projections
CONFIG_7B = "starflow_v_7b.yaml"


def _packaged(package: str, *parts: str) -> Path:
    path = Path(str(resources.files(package).joinpath(*parts)))
    if not path.is_file():
        raise StarflowError(f"packaged file {'/'.join(parts)} missing from {package} ({path}); "
                            "reinstall starflow-trt (pip install .)")
    return path


def bench_config(name: str = "bench.yaml") -> Path:
    """Path of a bench config shipped with the package (``bench.yaml`` or ``bench_quick.yaml``)."""
    if name not in BENCH_CONFIGS:
        raise StarflowError(f"unknown bench config {name!r}; choose one of {', '.join(BENCH_CONFIGS)}")
    return _packaged("starflow_trt.bench", "configs", name)


def model_config_7b() -> Path:
    """Path of the packaged STARFlow-V 7B config (used for the GPU projections)."""
    return _packaged("starflow_trt", "configs", CONFIG_7B)


@dataclass(frozen=True)
class BenchPaths:
    """Output layout of one ``bench`` run: ``out/latest.{json,md}``, ``out/*.png``, ``cache/…``."""

    out: Path
    cache: Path

    @classmethod
    def under(cls, out: Union[str, Path, None] = None, cache: Union[str, Path, None] = None) -> "BenchPaths":
        """Resolve ``out`` (default ``./bench_out``) and ``cache`` (default ``out/.cache``) to absolute paths."""
        root = Path(out) if out is not None else DEFAULT_OUT
        root = root.expanduser().resolve()
        return cls(root, Path(cache).expanduser().resolve() if cache is not None else root / ".cache")

    @property
    def results(self) -> tuple[Path, Path]:
        """The two result files every run writes (charts come next to them)."""
        return self.out / "latest.json", self.out / "latest.md"


def writable_dir(path: Path) -> Optional[str]:
    """None if ``path`` is (or can be created as) a writable directory, else why not (one line)."""
    import os

    path = Path(path).expanduser().resolve()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        return f"{probe} is a file, not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    return None
