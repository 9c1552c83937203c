"""Shared fixtures: the goldens (tests/data/goldens, copied from the upstream-produced tensors) and a loaded reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="session")
def goldens_export(goldens_dir: Path, tmp_path_factory) -> Path:
    """The goldens checkpoint exported once per session (grid 6×4 like the goldens, 3 frames)."""
    from starflow_trt.export.onnx_export import ExportLimits, export_graphs

    out = tmp_path_factory.mktemp("export") / "tiny_t2v"
    export_graphs(goldens_dir / "config.yaml", goldens_dir / "model.pth", out,
                  limits=ExportLimits(height=6, width=4, max_frames=3, max_batch=4))
    return out


@pytest.fixture(scope="session")
def toy_export(tmp_path_factory) -> Path:
    """The bundled toy model exported once per session (batch up to 8)."""
    from starflow_trt.export.onnx_export import ExportLimits, export_graphs
    from starflow_trt.toy import load_bundled

    toy = load_bundled()
    out = tmp_path_factory.mktemp("toy") / "graphs"
    export_graphs(toy.config_path, toy.checkpoint_path, out, limits=ExportLimits(max_batch=8))
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op torch thread for a module (spinning pool threads cost 40x on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


#: the media export's aspects and their token grids (goldens img_size 4, patch 1: 16 tokens a frame)
MEDIA_ASPECTS = ("16:9", "9:16", "1:1")


@pytest.fixture(scope="session")
def media_export(goldens_dir, tmp_path_factory) -> Path:
    """The goldens checkpoint with a tiny T5 text_encoder graph, tiny Wan VAE graphs and three aspects (FP32)."""
    pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    pytest.importorskip("diffusers")
    from starflow_trt.export.onnx_export import ExportLimits, export_graphs
    from starflow_trt.media.tiny import make_t5_dir, make_vae

    root = tmp_path_factory.mktemp("media")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        t5 = make_t5_dir(root / "t5", d_model=16, d_kv=8, num_heads=2, d_ff=32)
        make_vae(seed=2, z_dim=4).save_pretrained(root / "vae")
        export_graphs(goldens_dir / "config.yaml", goldens_dir / "model.pth", root / "graphs", text_encoder=t5,
                      vae=root / "vae", limits=ExportLimits(max_frames=3, max_batch=4, aspects=MEDIA_ASPECTS))
    finally:
        torch.set_num_threads(before)
    return root / "graphs"
