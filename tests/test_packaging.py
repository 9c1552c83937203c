"""Packaged resources: bench configs found through importlib.resources, bench output kept under -o,
and (slow) a non-editable install in a fresh venv running ``demo`` and ``bench --quick`` elsewhere."""

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
    tokens = quick.latent_frames * quick.frame_geometry()["tokens_per_frame"]
    assert tokens // 2 + 64 <= tokens
    assert load_config(model_config_7b()).top_block_channels > full.top_block_channels
    assert "bench/configs/*.yaml" in (REPO / "pyproject.toml").read_text()
    with pytest.raises(StarflowError, match="unknown bench config"):
        bench_config("nope.yaml")


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

    def fake_bench(plan, dirs, result, peak, bw, log):
        result["end_to_end"]["bench quick"] = [{"backend": "ORT", "precision": "fp32", "schedule": "sliding",
                                                "s_median": 1.0, "s_min": 1.0, "s_max": 1.0}]
        from starflow_trt.bench.projection import ScheduleWork

        return [ScheduleWork("sliding", 2.0, 16.0)]

    monkeypatch.setattr(bench_run, "_prepare", fake_prepare)
    monkeypatch.setattr(bench_run, "_bench_workloads", fake_bench)
    monkeypatch.setattr(bench_run, "peak_gemm_flops", lambda: 1e11)
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


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_wheel_install_runs_demo_and_quick_bench_elsewhere(tmp_path):
    """pip install . (non-editable) into a fresh venv; demo and bench --quick from another directory."""
    pytest.importorskip("onnxruntime")
    t0 = time.perf_counter()
    src = tmp_path / "src"   # a copy: setuptools builds in-tree (build/, *.egg-info) and must not touch the repo
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "starflow_trt", src / "starflow_trt",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    venv = tmp_path / "venv"
    # no pip of its own: ensurepip's old setuptools cannot build with the installed wheel; the base
    # interpreter's pip, setuptools, torch and onnxruntime are visible and pip installs into the venv
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    py, cli = venv / "bin" / "python", venv / "bin" / "starflow-trt"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", "./src"],
                   check=True, env=env, cwd=tmp_path)
    t_install = time.perf_counter() - t0
    work = tmp_path / "work"
    work.mkdir()
    where = subprocess.run([str(py), "-c", "import starflow_trt; print(starflow_trt.__file__)"], check=True,
                           env=env, cwd=work, capture_output=True, text=True).stdout.strip()
    installed = Path(where).parent
    assert installed.is_relative_to(venv) and "site-packages" in installed.parts, where
    assert (installed / "bench" / "configs" / "bench_quick.yaml").is_file()
    before = _tree(installed)
    timings = {}
    for verb, args in (("demo", ["demo", "-o", "D1"]), ("bench --quick", ["bench", "--quick", "-o", "D2"])):
        t = time.perf_counter()
        proc = subprocess.run([str(cli), *args], env=env, cwd=work, capture_output=True, text=True, timeout=900)
        timings[verb] = time.perf_counter() - t
        assert proc.returncode == 0, f"{verb} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert sorted(p.name for p in work.iterdir()) == ["D1", "D2"]
    assert {"demo.mp4", "report.json", "report.md"} <= {p.name for p in (work / "D1").iterdir()}
    d2 = {p.name for p in (work / "D2").iterdir()}
    assert {"latest.json", "latest.md", ".cache"} <= d2 and any(n.endswith(".png") for n in d2)
    assert json.loads((work / "D2" / "latest.json").read_text())["plan"]["quick"] is True
    assert _tree(installed) == before, "demo/bench wrote into the installed package"
    print(f"\ninstall {t_install:.0f} s, demo {timings['demo']:.0f} s, bench --quick {timings['bench --quick']:.0f} s, "
          f"total {time.perf_counter() - t0:.0f} s")
