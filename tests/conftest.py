"""Shared fixtures and the suite's settings.

- Threads, set here once for the whole suite: one intra-op thread for torch and for every ORT session
  (``STARFLOW_TRT_THREADS``), children included (CLI subprocesses, Ray replicas), so the workers never
  oversubscribe the cores. A test that measures threading opts out by name: ``@pytest.mark.threads(n)``.
- Workers: pytest-xdist, one per core while memory allows (:func:`pytest_xdist_auto_num_workers`). A test
  module is one scheduling unit (its module fixtures are built once); modules that share a machine-wide
  resource share a unit (:data:`GROUPS`), and the modules whose exports dominate start first.
- Exports: one memoised factory (:mod:`tests.exports`); the ``*_export`` fixtures name the shared ones.
- The goldens (tests/data/goldens, copied from the upstream-produced tensors) and a loaded reference.
"""

from __future__ import annotations

import os

#: the suite's intra-op threads (torch, ORT, OpenMP), before torch starts its pools
SUITE_THREADS = 1
os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(SUITE_THREADS)
os.environ["STARFLOW_TRT_THREADS"] = str(SUITE_THREADS)

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from .exports import CACHE_ENV, GOLDENS_FLOW, ExportFactory  # noqa: E402

torch.set_num_threads(SUITE_THREADS)

#: modules that must not run beside each other share a scheduling unit: each starts its own Ray cluster
#: (or a Chromium against one), or holds several GB of RSS
GROUPS = {
    **dict.fromkeys(("test_serving", "test_serving_media", "test_openai_serving", "test_browser", "test_journey",
                     "test_serve_stop"), "ray_clusters"),
    **dict.fromkeys(("test_export_7b_fp16", "test_export_large", "test_media_large"), "large_memory"),
}
#: units started first, in an order measured to end two workers together (their exports and children
#: dominate the run); every other unit follows in file order. The quick tier's three shared exports are
#: first asked by test_verify (toy_prompt_export), test_bounded_work (toy_export) and test_media_export
#: (goldens_export), started in that order so that neither worker waits on a build the other is making.
FIRST = ("test_media_pipeline", "ray_clusters", "test_verify", "test_bounded_work", "test_media_export",
         "large_memory", "test_aspects", "test_packaging", "test_trt_variant", "test_export_dtype",
         "test_media_vae_onnx")

REPO = Path(__file__).resolve().parents[1]
GOLDENS = Path(__file__).resolve().parent / "data" / "goldens" / "tiny_t2v"
TOLERANCES = {  # goldens README: max|ours - golden| <= rtol * max|golden| + atol
    "forward": (1e-5, 1e-5),
    "denoiser.out": (1e-5, 1e-5),
    "reverse": (1e-4, 1e-4),
    "jacobi.exact": (1e-4, 1e-4),
    "denoised": (1e-4, 1e-4),
    "i2v": (1e-4, 1e-4),
    "jacobi.th": (2e-3, 1e-3),
}


def tolerance(name: str) -> tuple[float, float]:
    for prefix, tol in TOLERANCES.items():
        if name.startswith(prefix):
            return tol
    raise KeyError(f"no tolerance for golden {name!r}")


def golden_error(ours: torch.Tensor, golden: torch.Tensor, name: str) -> tuple[float, float]:
    """(max abs error, allowed bound) for a golden tensor under the README rule."""
    rtol, atol = tolerance(name)
    g = golden.to(torch.float64)
    err = (ours.detach().to(torch.float64) - g).abs().max().item()
    return err, rtol * g.abs().max().item() + atol


def assert_golden(ours: torch.Tensor, golden: torch.Tensor, name: str) -> None:
    assert tuple(ours.shape) == tuple(golden.shape), f"{name}: shape {tuple(ours.shape)} != {tuple(golden.shape)}"
    err, bound = golden_error(ours, golden, name)
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e}"


@pytest.fixture(scope="session")
def goldens_dir() -> Path:
    assert (GOLDENS / "cases.pt").exists(), f"goldens missing at {GOLDENS}: they ship with the repository"
    return GOLDENS


@pytest.fixture(scope="session")
def cases(goldens_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(goldens_dir / "cases.pt", weights_only=True)


@pytest.fixture(scope="session")
def ref32(goldens_dir: Path):
    from starflow_trt.reference import load_reference

    return load_reference(goldens_dir / "config.yaml", goldens_dir / "model.pth", dtype=torch.float32)


@pytest.fixture(scope="session")
def ref64(goldens_dir: Path):
    from starflow_trt.reference import load_reference

    return load_reference(goldens_dir / "config.yaml", goldens_dir / "model.pth", dtype=torch.float64)


def _shared_tmp(tmp_path_factory) -> Path:
    """This session's temporary root, the same for every xdist worker."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    """The suite's export factory (:mod:`tests.exports`); fails the session if a test wrote into an export."""
    factory = ExportFactory(Path(os.environ.get(CACHE_ENV) or _shared_tmp(tmp_path_factory) / "exports"))
    yield factory
    touched = factory.check_untouched()
    assert not touched, f"tests wrote into shared exports (copy one before editing it): {touched}"


#: the media export's aspects and their token grids (goldens img_size 4, patch 1: 16 tokens a frame)
MEDIA_ASPECTS = ("16:9", "9:16", "1:1")


@pytest.fixture(scope="session")
def goldens_export(exports) -> Path:
    """The goldens checkpoint's flow graphs (grid 6×4 like the goldens, 3 frames, batch up to 4)."""
    return exports(**GOLDENS_FLOW)


@pytest.fixture(scope="session")
def toy_export(exports) -> Path:
    """The bundled toy model's flow graphs (batch up to 8)."""
    return exports(model="toy", max_batch=8)


@pytest.fixture(scope="session")
def toy_prompt_export(exports) -> Path:
    """The bundled toy with its word encoder as a ``text_encoder`` graph (batch up to 2)."""
    return exports(model="toy", text_encoder="toy", max_batch=2)


@pytest.fixture(scope="session")
def media_export(exports) -> Path:
    """The goldens checkpoint with the tiny T5 text_encoder graph, tiny Wan VAE graphs and three aspects (FP32)."""
    pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    pytest.importorskip("diffusers")
    return exports(model="goldens", text_encoder="tiny_t5", vae="tiny_vae", max_frames=3, max_batch=4,
                   aspects=MEDIA_ASPECTS)


# ------------------------------------------------------------------------------------- the suite's settings
def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "threads(n): this test measures threading: it runs with n intra-op "
                                       "threads (torch and ORT) instead of the suite's one")


@pytest.fixture(autouse=True)
def _threads(request):
    """The suite's threads for every test; ``@pytest.mark.threads(n)`` gives a test n instead."""
    mark = request.node.get_closest_marker("threads")
    n = mark.args[0] if mark else SUITE_THREADS
    env = os.environ["STARFLOW_TRT_THREADS"]
    torch.set_num_threads(n)
    os.environ["STARFLOW_TRT_THREADS"] = str(n)
    yield
    torch.set_num_threads(SUITE_THREADS)
    os.environ["STARFLOW_TRT_THREADS"] = env


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto``: one worker per core this process may use, at most one per 8 GiB of memory."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1, min(cores, memory // (8 * 1024 ** 3)))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:
    """Each module one xdist unit (or its :data:`GROUPS` unit); the :data:`FIRST` units first."""
    def unit(item) -> str:
        mark = item.get_closest_marker("xdist_group")
        if mark:
            return mark.args[0] if mark.args else mark.kwargs["name"]
        module = Path(str(item.fspath)).stem
        return GROUPS.get(module, module)

    for item in items:
        if not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(unit(item)))
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(unit(item), len(FIRST)))   # stable: file order otherwise
