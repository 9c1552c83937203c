"""One memoised export factory for the whole suite.

A test asks for the export it needs by its arguments (:class:`ExportSpec`: model, media graphs,
aspects or grid, frames, batch, dtype, ``--trt-variants``); equal requests share one build, in one
process and across pytest-xdist workers. A test that checks only what a larger export also holds asks
for that larger export by name (the ``*_export`` fixtures in ``conftest.py``); a test whose subject is
the export itself keeps exporting in its body.

Builds live in an on-disk cache, by default under this session's pytest temporary root (shared by the
xdist workers, gone with pytest's temporary directories). ``STARFLOW_TEST_EXPORTS=DIR`` keeps them across
sessions in ``DIR`` (the quick loop's reruns). An entry's key hashes everything a build depends on: the
spec, the package's sources (the exporter and the models), this file, the input files, and the versions of
the libraries that trace, write and optimise the graphs. A changed input is a new key, never a stale hit.

A session checks at its end that no test wrote into a shared export (:meth:`ExportFactory.check_untouched`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
GOLDENS = REPO / "tests" / "data" / "goldens" / "tiny_t2v"
CACHE_ENV = "STARFLOW_TEST_EXPORTS"
#: libraries whose version changes what an export writes (tracing, ONNX, optimisers, media models)
LIBRARIES = ("torch", "onnx", "onnxscript", "onnxruntime", "onnxslim", "onnxconverter-common", "numpy",
             "transformers", "diffusers", "sentencepiece", "tokenizers", "safetensors")


def _tiny_t5(directory: Path) -> None:
    from starflow_trt.media.tiny import make_t5_dir

    make_t5_dir(directory, d_model=16, d_kv=8, num_heads=2, d_ff=32)


def _tiny_vae(directory: Path) -> None:
    from starflow_trt.media.tiny import make_vae

    # one residual block a stage (Wan2.2 has two): the same graph structure, a fifth less export time
    make_vae(seed=2, z_dim=4, num_res_blocks=1).save_pretrained(directory)


#: the goldens model at its own grid (6x4 tokens) and frame count, what the golden tensors were made at
GOLDENS_FLOW = dict(model="goldens", grid=(6, 4), max_frames=3, max_batch=4)
#: media sources by name: a directory made once and shared (the exports record their paths)
MEDIA: dict[str, Callable[[Path], None]] = {"tiny_t5": _tiny_t5, "tiny_vae": _tiny_vae}


@dataclass(frozen=True)
class ExportSpec:
    """What ``export_graphs`` is asked for, in words a test can write.

    ``model``: ``"goldens"`` (tests/data/goldens) or ``"toy"`` (the bundled toy). ``text_encoder``:
    ``"tiny_t5"`` or, for the toy, ``"toy"`` (its word encoder). ``vae``: ``"tiny_vae"``.
    ``graphs``: names (None: every graph). ``grid``: (height, width) tokens, or ``aspects``.
    """

    model: str = "goldens"
    text_encoder: Optional[str] = None
    vae: Optional[str] = None
    graphs: Optional[tuple[str, ...]] = None
    grid: Optional[tuple[int, int]] = None
    aspects: tuple[str, ...] = ()
    max_frames: Optional[int] = None
    max_batch: int = 4
    dtype: str = "fp32"
    trt_variants: bool = False

    def __post_init__(self) -> None:
        if self.model not in ("goldens", "toy"):
            raise ValueError(f"unknown test model {self.model!r}")
        for name in (self.text_encoder, self.vae):
            if name is not None and name not in MEDIA and name != "toy":
                raise ValueError(f"unknown media source {name!r}: one of {sorted(MEDIA)}")
        if self.text_encoder == "toy" and self.model != "toy":
            raise ValueError("text_encoder='toy' (the toy's word encoder) goes with model='toy'")
        if self.graphs is not None:
            object.__setattr__(self, "graphs", tuple(sorted(self.graphs)))

    def media_names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.text_encoder, self.vae) if n in MEDIA)


# ----------------------------------------------------------------------------- cache keys
_DIGESTS: dict[str, str] = {}


def tree_digest(root: Path, patterns: tuple[str, ...] = ("*",)) -> str:
    """sha256 over the relative paths and bytes of the files under ``root`` (caches skipped)."""
    h = hashlib.sha256()
    files = sorted({p for pat in patterns for p in root.rglob(pat) if p.is_file() and "__pycache__" not in p.parts
                    and p.suffix != ".pyc"})
    for path in files:
        h.update(str(path.relative_to(root)).encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def library_versions() -> dict[str, Optional[str]]:
    out: dict[str, Optional[str]] = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def dependencies() -> dict:
    """Everything a build depends on besides its spec (computed once a process)."""
    if not _DIGESTS:
        import starflow_trt

        _DIGESTS["package"] = tree_digest(Path(starflow_trt.__file__).resolve().parent)
        _DIGESTS["factory"] = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()
        _DIGESTS["goldens"] = tree_digest(GOLDENS)
        _DIGESTS["libraries"] = hashlib.sha256(json.dumps(library_versions(), sort_keys=True).encode()).hexdigest()
    return dict(_DIGESTS)


def cache_key(kind: str, what: dict, deps: Optional[dict] = None) -> str:
    """The entry name of ``what`` (a spec or a media name) under ``deps`` (default: this checkout's)."""
    body = json.dumps({"kind": kind, "what": what, "deps": deps if deps is not None else dependencies()},
                      sort_keys=True)
    return f"{kind}-{hashlib.sha256(body.encode()).hexdigest()[:20]}"


# ----------------------------------------------------------------------------- the factory
class ExportFactory:
    """``factory(ExportSpec(...))`` or ``factory(model=..., ...)`` → the export directory (built at most once)."""

    def __init__(self, root: Path, log: Callable[[str], None] = lambda _: None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.log = log
        self._made: dict[str, Path] = {}
        self._snapshots: dict[Path, dict] = {}
        self.builds = 0   # builds this process made (not cache hits)

    def __call__(self, spec: Optional[ExportSpec] = None, **fields) -> Path:
        spec = spec if spec is not None else ExportSpec(**fields)
        key = cache_key("export", dataclasses.asdict(spec))
        if key not in self._made:
            self._made[key] = self._entry(key, lambda tmp: self._export(spec, tmp / "graphs")) / "graphs"
        return self._made[key]

    def media(self, name: str) -> Path:
        """The directory of media source ``name`` (``tiny_t5``: a T5 directory; ``tiny_vae``: a diffusers VAE)."""
        if name not in MEDIA:
            raise ValueError(f"unknown media source {name!r}: one of {sorted(MEDIA)}")
        key = cache_key("media", {"name": name})
        if key not in self._made:
            self._made[key] = self._entry(key, lambda tmp: MEDIA[name](tmp / name)) / name
        return self._made[key]

    def vae(self):
        """The ``tiny_vae`` model, loaded from the directory the exports were made from."""
        from diffusers import AutoencoderKLWan

        return AutoencoderKLWan.from_pretrained(self.media("tiny_vae")).float().eval().requires_grad_(False)

    def _entry(self, key: str, build: Callable[[Path], None]) -> Path:
        """``root/key``, built by ``build(tmp)`` under a lock if absent, then moved in place whole."""
        from filelock import FileLock

        final = self.root / key
        with FileLock(str(self.root / f"{key}.lock")):
            if not final.is_dir():
                tmp = self.root / f"{key}.partial-{os.getpid()}"
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir()
                self.log(f"building {key}")
                build(tmp)
                tmp.rename(final)
                self.builds += 1
        self._snapshots.setdefault(final, _snapshot(final))
        return final

    def _export(self, spec: ExportSpec, out: Path) -> None:
        # media sources first, at their final paths: an export records where its media came from
        media = {name: self.media(name) for name in spec.media_names()}
        from starflow_trt.export.onnx_export import ExportLimits, export_graphs

        if spec.model == "goldens":
            config, checkpoint, toy = GOLDENS / "config.yaml", GOLDENS / "model.pth", None
        else:
            from starflow_trt.toy import load_bundled

            toy = load_bundled()
            config, checkpoint = toy.config_path, toy.checkpoint_path
        text = (toy.text_encoder_path if spec.text_encoder == "toy" else media.get(spec.text_encoder))
        height, width = spec.grid or (None, None)
        limits = ExportLimits(height=height, width=width, aspects=spec.aspects, max_frames=spec.max_frames,
                              max_batch=spec.max_batch, dtype=spec.dtype)
        export_graphs(config, checkpoint, out, graphs=list(spec.graphs) if spec.graphs else None, limits=limits,
                      text_encoder=text, vae=media.get(spec.vae), trt_variants=spec.trt_variants)

    def check_untouched(self) -> list[str]:
        """Entries this process used whose files changed since it first saw them (a test wrote into a shared export)."""
        return [str(path) for path, snap in self._snapshots.items() if _snapshot(path) != snap]


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}
