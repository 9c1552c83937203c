"""Packaged resources: bench configs found through importlib.resources, bench output kept under -o,
and (slow) a non-editable install in a fresh venv running ``demo`` (the README's main job, checked end to
end here) and ``bench --quick`` elsewhere."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import pytest
from click.testing import CliRunner

from starflow_trt.bench import run as bench_run
from starflow_trt.bench.paths import BenchPaths, bench_config, model_config_7b
from starflow_trt.cli import main
from starflow_trt.config import load_config
from starflow_trt.errors import StarflowError
from starflow_trt.geometry import frame_geometry

REPO = Path(__file__).resolve().parents[1]


def test_bench_configs_are_package_data():
    pkg = resources.files("starflow_trt.bench") / "configs"
    for name in ("bench.yaml", "bench_quick.yaml"):
        assert pkg.joinpath(name).is_file()
    assert bench_config("bench.yaml") == Path(str(pkg / "bench.yaml"))
    full, quick = load_config(bench_config("bench.yaml")), load_config(bench_config("bench_quick.yaml"))
    assert full.layers == (2, 2, 2, 2, 2, 6) and full.top_block_channels == 512 and full.latent_frames == 6
    assert sum(quick.layers) < sum(full.layers) and quick.num_blocks == 2
    # per_graph times deep_step at S = 64 after L + N/2 positions: the quick export's context must hold it
    tokens = quick.latent_frames * frame_geometry(quick)["tokens_per_frame"]
    assert tokens // 2 + 64 <= tokens
    assert load_config(model_config_7b()).top_block_channels > full.top_block_channels
    assert "bench/configs/*.yaml" in (REPO / "pyproject.toml").read_text()
    with pytest.raises(StarflowError, match="unknown bench config"):
        bench_config("nope.yaml")


def test_default_calibration_prompts_are_package_data():
    from starflow_trt.calibration.prompts import DEFAULT_PROMPTS_FILE, default_prompt_set

    assert (resources.files("starflow_trt.calibration") / DEFAULT_PROMPTS_FILE).is_file()
    assert f"calibration/{DEFAULT_PROMPTS_FILE}" in (REPO / "pyproject.toml").read_text()
    assert len(default_prompt_set().prompts) >= 64


def test_bench_paths_resolve_under_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    default = BenchPaths.under()
    assert default.out == tmp_path / "bench_out" and default.cache == tmp_path / "bench_out" / ".cache"
    p = BenchPaths.under("res")
    assert p.out == tmp_path / "res" and p.cache.parent == p.out and all(f.parent == p.out for f in p.results)
    assert BenchPaths.under("res", "elsewhere").cache == tmp_path / "elsewhere"


def test_bench_plan_quick_and_full():
    assert bench_run.bench_plan() == bench_run.FULL and bench_run.FULL.int8 and bench_run.FULL.runs == 5
    q = bench_run.bench_plan(quick=True)
    assert (q.runs, q.int8, q.toy, q.config) == (1, False, False, "bench_quick.yaml")
    assert bench_run.bench_plan(quick=True, int8=True, runs=2).int8 is True
    with pytest.raises(StarflowError, match="--runs must be at least 1"):
        bench_run.bench_plan(runs=0)


def test_bench_cli_writes_only_under_out(tmp_path, monkeypatch):
    """The CLI wiring with the measurements stubbed: results and cache land in -o, nothing else in cwd."""
    seen = {}

    def fake_prepare(plan, paths, log):
        seen["cache"], seen["plan"] = paths.cache, plan
        (paths.cache / "marker").write_text("x")
        return {}

    def fake_bench(plan, dirs, result, peak, bw, peaks, log):
        result["end_to_end"]["bench quick"] = [{"backend": "ORT", "precision": "fp32", "schedule": "sliding",
                                                "s_median": 1.0, "s_min": 1.0, "s_max": 1.0}]
        from starflow_trt.bench.projection import ScheduleWork

        return [ScheduleWork("sliding", 2.0, 16.0)]

    monkeypatch.setattr(bench_run, "_prepare", fake_prepare)
    monkeypatch.setattr(bench_run, "_bench_workloads", fake_bench)
    monkeypatch.setattr(bench_run, "peak_rates", lambda n_max: {"fp32": 1e11, "bf16": 4e11, "int8": 8e11})
    monkeypatch.setattr(bench_run, "memory_bandwidth", lambda: 1e10)
    monkeypatch.chdir(tmp_path)
    out = CliRunner().invoke(main, ["bench", "--quick", "-o", "D2"])
    assert out.exit_code == 0, out.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["D2"]
    assert seen["cache"] == tmp_path / "D2" / ".cache" and seen["plan"].quick and not seen["plan"].int8
    result = json.loads((tmp_path / "D2" / "latest.json").read_text())
    assert result["plan"]["quick"] is True and result["projection_schedules"] == [
        {"name": "sliding", "sweeps": 2.0, "tokens_per_call": 16.0}]
    assert "Quick run" in (tmp_path / "D2" / "latest.md").read_text()
    assert result["roofline"]["peak_gops"] == {"fp32": 100.0, "bf16": 400.0, "int8": 800.0}


def test_bench_cli_bad_output_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    out = CliRunner().invoke(main, ["bench", "--quick", "-o", "afile/sub"])
    assert out.exit_code == 2 and out.output.startswith("error: bench cannot run")
    assert "is a file" in out.output and len(out.output.strip().splitlines()) == 1
    out = CliRunner().invoke(main, ["bench", "--runs", "0"])
    assert out.exit_code == 2 and "--runs must be at least 1" in out.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


class Wheel:
    """starflow-trt installed non-editable into a fresh venv (the base interpreter's packages visible)."""

    def __init__(self, root: Path) -> None:
        t0 = time.perf_counter()
        src = root / "src"   # a copy: setuptools builds in-tree (build/, *.egg-info) and must not touch the repo
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, src / name)
        shutil.copytree(REPO / "starflow_trt", src / "starflow_trt",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        venv = root / "venv"
        # no pip of its own: ensurepip's old setuptools cannot build with the installed wheel; the base
        # interpreter's pip, setuptools, torch and onnxruntime are visible and pip installs into the venv
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
        self.py, self.cli = venv / "bin" / "python", venv / "bin" / "starflow-trt"
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        subprocess.run([str(self.py), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                        "./src"], check=True, env=self.env, cwd=root)
        self.install_s = time.perf_counter() - t0
        self.work = root / "work"   # "elsewhere": not the repository, not the venv
        self.work.mkdir()
        where = subprocess.run([str(self.py), "-c", "import starflow_trt; print(starflow_trt.__file__)"], check=True,
                               env=self.env, cwd=self.work, capture_output=True, text=True).stdout.strip()
        self.package = Path(where).parent
        assert self.package.is_relative_to(venv) and "site-packages" in self.package.parts, where
        self.before = _tree(self.package)

    def run(self, *args, cwd: Path, timeout: int = 900) -> tuple[subprocess.CompletedProcess, float]:
        """The installed ``starflow-trt`` with ``args`` in ``cwd``: (the process, its seconds)."""
        t = time.perf_counter()
        proc = subprocess.run([str(self.cli), *map(str, args)], env=self.env, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
        return proc, time.perf_counter() - t


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Wheel:
    pytest.importorskip("onnxruntime")
    return Wheel(tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def demo(wheel):
    """``starflow-trt demo -o D1`` of the installed wheel, run in its work directory: (the process, seconds)."""
    return wheel.run("demo", "-o", "D1", cwd=wheel.work)


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_wheel_install_runs_demo_and_quick_bench_elsewhere(wheel, demo):
    """pip install . (non-editable) into a fresh venv; demo and bench --quick from another directory."""
    work = wheel.work
    (proc, demo_s), (bench, bench_s) = demo, wheel.run("bench", "--quick", "-o", "D2", cwd=work)
    for verb, p in (("demo", proc), ("bench --quick", bench)):
        assert p.returncode == 0, f"{verb} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    assert (wheel.package / "bench" / "configs" / "bench_quick.yaml").is_file()
    assert (wheel.package / "calibration" / "prompts.txt").is_file()   # calibrate's default prompt set
    assert (wheel.package / "engine" / "trt_onnx_support.json").is_file()   # the TensorRT parser's table
    assert sorted(p.name for p in work.iterdir()) == ["D1", "D2"]
    assert {"demo.mp4", "report.json", "report.md"} <= {p.name for p in (work / "D1").iterdir()}
    d2 = {p.name for p in (work / "D2").iterdir()}
    assert {"latest.json", "latest.md", ".cache"} <= d2 and any(n.endswith(".png") for n in d2)
    assert json.loads((work / "D2" / "latest.json").read_text())["plan"]["quick"] is True
    assert _tree(wheel.package) == wheel.before, "demo/bench wrote into the installed package"
    print(f"\ninstall {wheel.install_s:.0f} s, demo {demo_s:.0f} s, bench --quick {bench_s:.0f} s")


@pytest.mark.slow
def test_demo_end_to_end(wheel, demo, tmp_path):
    """The README's main job (the installed wheel's demo, above): quiet, its report, and the prompt line on it."""
    proc, _ = demo
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = wheel.work / "D1"
    # quiet by default: at most ~30 lines without --verbose, C-level output (ORT) included
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert len(lines) <= 30, "\n".join(lines[:60])
    assert not any("Attribute type is ambiguous" in ln or "Collecting tensor data" in ln for ln in lines)
    report = json.loads((out / "report.json").read_text())
    for name in ("demo.mp4", "contact_sheet.png", "report.md", "report.json"):
        assert (out / name).stat().st_size > 0, name
    assert report["parity"]["autoregressive"]["rel_max"] < 1e-3
    assert report["held_out_bits_per_dim"]["mean"] < report["held_out_bits_per_dim"]["identity_flow"]
    assert report["int8"]["bits_per_dim"]["increase"] <= 0.02 and isinstance(report["int8"]["gate_passed"], bool)
    assert not [p for p in wheel.work.iterdir() if p.name.startswith(".")]  # no staging left behind
    # the README's prompt line on the demo's output directory (it stands for its export, DEMO/graphs)
    gen, _ = wheel.run("generate", out, "--prompt", "a red square moving right", "-o", tmp_path / "out", cwd=tmp_path,
                       timeout=600)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert "using its export" in gen.stderr and (tmp_path / "out" / "video.mp4").stat().st_size > 0
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["cli"]["options"]["prompts"] == ["a red square moving right"]
    assert stats["cli"]["options"]["directory"] == str(out / "graphs")
    # a demo replaces an earlier demo's directory (it is ours), never a foreign one
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "x.txt").write_text("keep")
    again, _ = wheel.run("demo", "-o", tmp_path / "foreign", cwd=tmp_path, timeout=300)
    assert again.returncode == 2 and (tmp_path / "foreign" / "x.txt").read_text() == "keep"
