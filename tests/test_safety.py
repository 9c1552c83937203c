"""Safe by default (issue 12): one test per probe of the issue, each reproducing the finding.

Every refusal: exit code 2, ONE line ``error: …``, no traceback, nothing touched that starflow-trt
did not create, no partial output. Probe table: see the closing note (notes/probes_12.md).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from starflow_trt.cli import main
from starflow_trt.errors import StarflowError
from starflow_trt.staging import (MARKER_NAME, STAGING_NAME, OutputError, check_output_dir, staged_directory,
                                  write_json_atomic)

REPO = Path(__file__).resolve().parents[1]
GEN_FAST = ["--autoregressive", "--no-denoise", "--thread-pool", "session"]


# ------------------------------------------------------------------ helpers
def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(result, *needles: str, code: int = 2) -> str:
    """exit ``code``, exactly one line ``error: …``, no traceback; returns the line."""
    out = result.output
    assert result.exit_code == code, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    assert "Traceback" not in out
    for needle in needles:
        assert needle in out, out
    return lines[0]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under ``root`` with its size and mtime (what a run must leave untouched)."""
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def strict_json(path: Path):
    def refuse(name):
        raise AssertionError(f"{path} holds {name}: not valid JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def npys(cases, tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("inputs")
    paths = {}
    for name in ("y", "y_uncond", "noise", "x"):
        paths[name] = root / f"{name}.npy"
        np.save(paths[name], cases[name].numpy())
    return SimpleNamespace(**paths)


def gen_args(export: Path, npys, out: Path, *extra: str) -> list:
    return ["generate", export, "--text-embeddings", npys.y, "--uncond", npys.y_uncond, *GEN_FAST, "-o", out, *extra]


@pytest.fixture
def goldens_copy(goldens_dir, tmp_path) -> Path:
    """config.yaml + model.pth of the goldens in a directory of their own (tests may lose them)."""
    root = tmp_path / "work"
    root.mkdir()
    shutil.copy(goldens_dir / "config.yaml", root / "config.yaml")
    shutil.copy(goldens_dir / "model.pth", root / "model.pth")
    (root / "notes.txt").write_text("the user's file\n")
    return root


# ------------------------------------------------------------------ 1. destructive operations
def test_export_force_into_cwd_deletes_nothing(goldens_copy, monkeypatch):
    # was: `export config.yaml model.pth -o . --force` deleted the cwd (config and checkpoint too), then OSError
    monkeypatch.chdir(goldens_copy)
    before = snapshot(goldens_copy)
    assert_user_error(run("export", "config.yaml", "model.pth", "-o", ".", "--force"), "current directory")
    assert_user_error(run("export", "config.yaml", "model.pth", "-o", "..", "--force"), "ancestor")
    assert snapshot(goldens_copy) == before


def test_export_force_never_deletes_unrelated_files(goldens_copy, tmp_path):
    # was: --force deleted every file of any non-empty OUT_DIR
    user = tmp_path / "user_dir"
    user.mkdir()
    (user / "thesis.tex").write_text("years of work")
    before = snapshot(tmp_path)
    cfg, ckpt = goldens_copy / "config.yaml", goldens_copy / "model.pth"
    assert_user_error(run("export", cfg, ckpt, "-o", user, "--force"), "not written by starflow-trt")
    assert_user_error(run("export", cfg, ckpt, "-o", user), "not empty", "--force")
    # a directory holding an input of the run, even one starflow-trt owns
    assert_user_error(run("export", cfg, ckpt, "-o", goldens_copy, "--force"), "holds the input")
    assert snapshot(tmp_path) == before


def test_export_force_replaces_its_own_export(goldens_copy, tmp_path):
    cfg, ckpt = goldens_copy / "config.yaml", goldens_copy / "model.pth"
    out = tmp_path / "graphs"  # an earlier export (manifest.json of ours) with a graph the new one lacks
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "starflow-trt/graphs", "format_version": 2}))
    (out / "forward_5.onnx").write_text("old graph")
    assert_user_error(run("export", cfg, ckpt, "-o", out, "--graphs", "forward_0"), "not empty")
    result = run("export", cfg, ckpt, "-o", out, "--graphs", "forward_0", "--grid", "6x4", "--max-frames", "3",
                 "--force")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["forward_0.onnx", "manifest.json"]  # replaced, not merged
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging left behind
    assert "Attribute type is ambiguous" not in result.output and "torchvision" not in result.output  # quiet


def test_demo_refuses_a_directory_it_did_not_write(tmp_path):
    # was: `demo -o DIR` deleted files it did not write in DIR/graphs/
    (tmp_path / "mine" / "graphs").mkdir(parents=True)
    (tmp_path / "mine" / "graphs" / "keep.onnx").write_text("the user's graph")
    before = snapshot(tmp_path)
    assert_user_error(run("demo", "-o", tmp_path / "mine"), "not written by starflow-trt")
    assert snapshot(tmp_path) == before


def test_check_output_dir_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / MARKER_NAME).write_text(json.dumps({"format": "starflow-trt/output", "kind": "generate"}))
    (ours / "latents.npy").write_text("x")
    assert check_output_dir(ours, force=True) == ours
    with pytest.raises(OutputError, match="not empty"):
        check_output_dir(ours)
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "manifest.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(OutputError, match="not written by starflow-trt"):
        check_output_dir(fake, force=True)
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty") == tmp_path / "empty"
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        check_output_dir(tmp_path / "file", force=True)
    with pytest.raises(OutputError, match="is a file"):
        check_output_dir(tmp_path / "file" / "sub")
    with pytest.raises(OutputError, match="holds the input"):
        check_output_dir(ours, force=True, inputs=[ours / "latents.npy"])


# ------------------------------------------------------------------ 2. tracebacks → one line
def test_negative_channels_is_one_line_everywhere(goldens_copy, tmp_path):
    # was: export → RuntimeError "Trying to create tensor with negative dimension"; inspect printed negative widths
    bad = tmp_path / "neg.yaml"
    bad.write_text((goldens_copy / "config.yaml").read_text().replace("channels: 32", "channels: -32"))
    line = assert_user_error(run("inspect", bad), "channels", "-32")
    assert "width" not in line
    assert_user_error(run("export", bad, goldens_copy / "model.pth", "-o", tmp_path / "out"), "channels")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("edit,field", [
    ("head_dim: 32", "head_dim: 24"), ("patch_size: 1", "patch_size: 0"), ("img_size: 4", "img_size: -4"),
    ("seq_order: L2R", "seq_order: UP"), ("layers_per_block: 1 1 1 1 1 2", "layers_per_block: 1 1 1 1 1 -2"),
    ("soft_clip: 4", "soft_clip: .nan"), ("vid_size: '9:16'", "vid_size: 'x:16'"), ("txt_size: 4", "txt_size: -1"),
    ("temporal_causal: 2", "temporal_causal: -1"),
])
def test_invalid_config_fields_are_named(goldens_dir, edit, field):
    from starflow_trt.config import parse_config
    from starflow_trt.errors import ConfigError

    text = (goldens_dir / "config.yaml").read_text()
    assert edit in text
    name = field.split(":")[0]
    with pytest.raises(ConfigError, match=name):
        parse_config(text.replace(edit, field))


def test_config_missing_keys_are_named(tmp_path):
    # absent keys take upstream's defaults (issue 21); the ones not supported here say so, naming the field
    cfg = tmp_path / "partial.yaml"
    cfg.write_text("arguments:\n- channels: 32\n- channel_size: 4\n")
    line = assert_user_error(run("inspect", cfg), "head_dim is absent from the YAML: upstream's default 64 applies",
                             "rope is absent from the YAML: upstream's default 0", "add '- sos: 1'")
    assert "not supported here" in line


def test_output_under_a_file_or_read_only(goldens_copy, goldens_export, npys, tmp_path, monkeypatch):
    # was: NotADirectoryError / OSError tracebacks (export and generate)
    (tmp_path / "afile").write_text("x")
    cfg, ckpt = goldens_copy / "config.yaml", goldens_copy / "model.pth"
    assert_user_error(run("export", cfg, ckpt, "-o", tmp_path / "afile" / "out"), "is a file")
    assert_user_error(run(*gen_args(goldens_export, npys, tmp_path / "afile" / "out")), "is a file")
    # a read-only location: the staging directory cannot be created
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p) == str(tmp_path / "ro") else
                        real_access(p, mode, **kw))
    (tmp_path / "ro").mkdir()
    assert_user_error(run(*gen_args(goldens_export, npys, tmp_path / "ro" / "out")), "not writable")
    assert_user_error(run("export", cfg, ckpt, "-o", tmp_path / "ro" / "out"), "not writable")

    def erofs(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr("starflow_trt.staging.tempfile.mkdtemp", erofs)
    assert_user_error(run(*gen_args(goldens_export, npys, tmp_path / "ok")), "Read-only file system")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "ro", "work"]


@pytest.mark.parametrize("option,value", [
    ("--jacobi-block", "0"), ("--jacobi-threshold", "-1"), ("--jacobi-iters", "0"), ("--frames", "0"),
    ("--frames", "-3"), ("--guidance", "nan"), ("--guidance", "inf"), ("--guidance", "-1"),
    ("--jacobi-threshold", "nan"), ("--seed", "-1"),
])
def test_generate_bad_values_are_usage_errors(goldens_export, npys, tmp_path, option, value):
    # was: --jacobi-block 0 / --jacobi-threshold -1 → ValueError traceback; --frames 0 → the default length;
    # --guidance nan → no guidance and NaN in stats.json
    args = ["generate", goldens_export, "--text-embeddings", npys.y, "-o", tmp_path / "out", option, value]
    assert_user_error(run(*args), option)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,option", [
    (["--samples", "0"], "--samples"), (["--guidance", "nan"], "--guidance"), (["--samples", "-2"], "--samples"),
])
def test_calibrate_bad_values_are_usage_errors(goldens_export, tmp_path, args, option):
    # was: calibrate --samples 0 → traceback
    result = run("calibrate", goldens_export, "--precision", "int8", "-o", tmp_path / "out", *args)
    assert_user_error(result, option)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args,option", [
    (["--max-batch", "0"], "--max-batch"), (["--max-frames", "0"], "--max-frames"), (["--grid", "0x4"], "--grid"),
    (["--grid", "abc"], "--grid"), (["--opset", "23"], "--opset"), (["--aspect", "0:9"], "--aspect"),
    (["--graphs", ","], "--graphs"),
])
def test_export_bad_values_are_usage_errors(goldens_copy, tmp_path, args, option):
    result = run("export", goldens_copy / "config.yaml", goldens_copy / "model.pth", "-o", tmp_path / "o", *args)
    assert_user_error(result, option)
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ 3. outputs
def test_generate_refuses_to_overwrite_and_replaces_only_with_force(goldens_export, npys, tmp_path):
    # was: generate into an existing directory silently overwrote the earlier results
    out = tmp_path / "gen"
    assert run(*gen_args(goldens_export, npys, out, "--seed", "1")).exit_code == 0
    first = (out / "latents.npy").read_bytes()
    (out / "leftover.txt").write_text("from an earlier run")
    assert_user_error(run(*gen_args(goldens_export, npys, out, "--seed", "2")), "not empty", "--force")
    assert (out / "latents.npy").read_bytes() == first
    result = run(*gen_args(goldens_export, npys, out, "--seed", "2", "--force"))
    assert result.exit_code == 0, result.output
    assert not (out / "leftover.txt").exists()  # one run's files only
    assert strict_json(out / "stats.json")["cli"]["options"]["seed"] == 2


def test_user_directory_is_never_a_generate_output(goldens_export, npys, tmp_path):
    user = tmp_path / "photos"
    user.mkdir()
    (user / "a.jpg").write_text("x")
    before = snapshot(tmp_path)
    assert_user_error(run(*gen_args(goldens_export, npys, user, "--force")), "not written by starflow-trt")
    assert_user_error(run(*gen_args(goldens_export, npys, goldens_export, "--force")), "holds the input")
    assert snapshot(tmp_path) == before


def test_concurrent_staging_never_mixes_files(tmp_path):
    # was: two runs into one directory interleaved files (latents of one run, contact sheet of the other)
    out = tmp_path / "gen"
    a, b = staged_directory(out, kind="generate"), staged_directory(out, kind="generate")
    ta, tb = a.__enter__(), b.__enter__()
    assert ta != tb and ta.parent == tb.parent == tmp_path
    (ta / "latents.npy").write_text("A")
    (tb / "latents.npy").write_text("B")
    (tb / "contact_sheet.png").write_text("B")
    a.__exit__(None, None, None)
    with pytest.raises(OutputError, match="another run"):
        b.__exit__(None, None, None)
    assert sorted(p.name for p in out.iterdir()) == [MARKER_NAME, "latents.npy"]
    assert (out / "latents.npy").read_text() == "A"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gen"]
    c = staged_directory(out, force=True, kind="generate")  # with force: replaced whole, never merged
    with c as tc:
        (tc / "contact_sheet.png").write_text("C")
    assert sorted(p.name for p in out.iterdir()) == [MARKER_NAME, "contact_sheet.png"]


def test_stale_staging_from_killed_runs_is_cleaned(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    owner = {"pid": dead.pid, "host": socket.gethostname()}
    stale = tmp_path / f".out.partial-{dead.pid}-abc"
    stale.mkdir()
    (stale / STAGING_NAME).write_text(json.dumps(owner))
    (stale / "half.onnx").write_text("x")
    alive = tmp_path / f".out.partial-{os.getpid()}-def"  # a running process's staging: left alone
    alive.mkdir()
    (alive / STAGING_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    foreign = tmp_path / ".out.partial-12-xyz"  # no owner file: not ours to delete
    foreign.mkdir()
    with staged_directory(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    assert not stale.exists() and alive.exists() and foreign.exists()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["f"]


def test_stats_are_strict_json_with_seed_and_options(goldens_export, npys, tmp_path):
    # was: stats.json had no seed, and NaN (invalid JSON) with --guidance nan
    out = tmp_path / "gen"
    result = run("generate", goldens_export, "--text-embeddings", npys.y, "--uncond", npys.y_uncond, "--noise",
                 npys.noise, "--guidance", "2", "--seed", "7", *GEN_FAST, "-o", out)
    assert result.exit_code == 0, result.output
    stats = strict_json(out / "stats.json")
    cli = stats["cli"]
    assert cli["verb"] == "generate" and cli["noise_source"] == "file" and cli["options"]["seed"] == 7
    assert cli["options"]["guidance"] == 2.0 and cli["options"]["backend"] == "ort"
    assert cli["options"]["thread_pool"] == "session" and cli["options"]["autoregressive"] is True
    from starflow_trt.staging import sha256_file

    assert cli["inputs"]["noise"]["sha256"] == sha256_file(npys.noise)
    assert cli["inputs"]["text_embeddings"]["sha256"] == sha256_file(npys.y)


def test_strict_json_and_non_finite_outputs_refused(tmp_path):
    path = write_json_atomic(tmp_path / "s.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": 2}, strict=True)
    assert strict_json(path) == {"a": None, "b": [1.0, None], "c": 2}
    from starflow_trt.runtime.outputs import write_outputs

    latents = torch.zeros(1, 2, 4, 3, 3)
    latents[0, 1, 2, 1, 1] = math.nan
    fake = SimpleNamespace(latents=latents, raw=latents, stats={})
    with pytest.raises(StarflowError, match="non-finite"):
        write_outputs(fake, SimpleNamespace(cfg=SimpleNamespace(vae=None)), tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_nan_inputs_are_refused(goldens_export, npys, tmp_path):
    bad = tmp_path / "noise_nan.npy"
    noise = np.load(npys.noise)
    noise[0, 0, 0, 0, 0] = np.nan
    np.save(bad, noise)
    assert_user_error(run(*gen_args(goldens_export, npys, tmp_path / "o", "--noise", bad)), "--noise", "NaN")
    assert not (tmp_path / "o").exists()


def test_outputs_get_umask_permissions(goldens_export, npys, tmp_path):
    # was: latents.npy, pngs, mp4, manifest.json and the directories were 0600 / 0700, the rest 0644
    from starflow_trt.runtime.outputs import save_npy_atomic

    old = os.umask(0o027)
    try:
        assert run(*gen_args(goldens_export, npys, tmp_path / "gen")).exit_code == 0
        with staged_directory(tmp_path / "graphs") as tmp:  # what export / calibrate / build write through
            write_json_atomic(tmp / "manifest.json", {"format": "starflow-trt/graphs"})
            save_npy_atomic(np.zeros(3), tmp / "x.npy")
    finally:
        os.umask(old)
    for out in (tmp_path / "gen", tmp_path / "graphs"):
        assert stat.S_IMODE(out.stat().st_mode) == 0o750, out
        for f in out.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o640, f


def test_sigterm_during_export_leaves_nothing(goldens_copy, tmp_path):
    # was: SIGTERM during export left a hidden .partial-* directory behind
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "starflow_trt.cli", "export", goldens_copy / "config.yaml",
                             goldens_copy / "model.pth", "-o", "out"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.partial-*")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert list(tmp_path.glob(".out.partial-*")), "the export never started staging"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "interrupted by SIGTERM" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


# ------------------------------------------------------------------ 4. messages
def test_random_checkpoint_never_advises_weights_only_false(goldens_copy, tmp_path):
    # was: ~900 characters of torch advice to retry with weights_only=False
    junk = tmp_path / "junk.pth"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    line = assert_user_error(run("inspect", goldens_copy / "config.yaml", junk), "junk.pth")
    assert "weights_only" not in line and len(line) < 300


def test_trt_backend_without_gpu_does_not_suggest_dry_run(goldens_export, npys, tmp_path):
    # was: "use --dry-run to print the build plan", an option generate does not have
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    result = run("generate", goldens_export, "--text-embeddings", npys.y, "--backend", "trt", "-o", tmp_path / "o")
    line = assert_user_error(result, "--backend ort")
    assert "--dry-run" not in line
    assert not (tmp_path / "o").exists()


def test_calibrate_force_means_replace_and_ignore_gate_is_separate(goldens_export, tmp_path):
    # was: calibrate --force meant "ignore the quality gate" while every other --force replaces the output
    help_text = run("calibrate", "--help").output
    assert "--ignore-gate" in help_text and "quality gate" in help_text
    user = tmp_path / "user"
    user.mkdir()
    (user / "keep.txt").write_text("x")
    before = snapshot(tmp_path)
    assert_user_error(run("calibrate", goldens_export, "--precision", "int8", "-o", user, "--force"),
                      "not written by starflow-trt")
    assert_user_error(run("calibrate", goldens_export, "--precision", "int8", "-o", user), "not empty")
    assert snapshot(tmp_path) == before


def test_hand_edited_manifest_is_refused(goldens_export, npys, tmp_path):
    # was: max_batch raised to 64 by hand in manifest.json went undetected
    copy = tmp_path / "edited"
    shutil.copytree(goldens_export, copy)
    data = json.loads((copy / "manifest.json").read_text())
    data["geometry"]["max_batch"] = 64
    (copy / "manifest.json").write_text(json.dumps(data, indent=1))
    assert_user_error(run("score", copy, "--video", npys.x, "--text-embeddings", npys.y), "manifest")


# ------------------------------------------------------------------ 5. error handling of the CLI itself
def test_debug_shows_the_traceback(goldens_copy, tmp_path, monkeypatch):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x80\x02garbage")
    result = run("--debug", "inspect", goldens_copy / "config.yaml", junk)
    assert result.exit_code != 0 and isinstance(result.exception, StarflowError)
    monkeypatch.setenv("STARFLOW_TRT_DEBUG", "1")
    result = run("inspect", goldens_copy / "config.yaml", junk)
    assert isinstance(result.exception, StarflowError)


def test_unexpected_errors_are_one_line_with_a_debug_hint(goldens_copy, monkeypatch):
    def boom(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("starflow_trt.commands.inspect_cmd.inspect_report", boom)
    assert_user_error(run("inspect", goldens_copy / "config.yaml"), "internal error", "--debug", code=1)


def test_os_errors_are_one_line(goldens_export, npys, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "gen" / "latents.npy"))

    monkeypatch.setattr("starflow_trt.runtime.outputs.save_npy_atomic", full)
    assert_user_error(run(*gen_args(goldens_export, npys, tmp_path / "gen")), "No space left on device")
    assert list(tmp_path.iterdir()) == []  # staging removed, no partial output


def test_missing_optional_package_at_run_time_is_a_user_error(goldens_copy, monkeypatch):
    def needs_ort(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime")

    monkeypatch.setattr("starflow_trt.commands.inspect_cmd.inspect_report", needs_ort)
    assert_user_error(run("inspect", goldens_copy / "config.yaml"), "'onnxruntime'", "pip install")
