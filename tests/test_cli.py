"""CLI basics: version, error handling (one line, exit 2), inspect on the 7B config and the goldens."""

from __future__ import annotations

import time
from pathlib import Path

import click
from click.testing import CliRunner

from starflow_trt import __version__
from starflow_trt.cli import COMMANDS, main
from starflow_trt.errors import StarflowError

CONFIG_7B = Path(__file__).resolve().parents[1] / "starflow_trt" / "configs" / "starflow_v_7b.yaml"


def test_version_and_help():
    runner = CliRunner()
    out = runner.invoke(main, ["--version"])
    assert out.exit_code == 0 and __version__ in out.output
    out = runner.invoke(main, ["--help"])
    assert out.exit_code == 0
    for verb in ("inspect", "export", "generate", "score", "demo"):
        assert verb in out.output


def test_user_errors_are_one_line_exit_2(monkeypatch):
    @click.command("boom")
    def boom():
        raise StarflowError("the cause\nand the fix")

    monkeypatch.setitem(COMMANDS, "boom", "tests.test_cli:_boom")
    globals()["_boom"] = boom
    out = CliRunner().invoke(main, ["boom"])
    assert out.exit_code == 2
    assert out.output.strip() == "error: the cause and the fix"


def test_inspect_7b_config_fast():
    start = time.perf_counter()
    out = CliRunner().invoke(main, ["inspect", str(CONFIG_7B)])
    elapsed = time.perf_counter() - start
    assert out.exit_code == 0, out.output
    assert "6,890,096,528" in out.output and "5,977,211,744" in out.output
    assert "4,842,107,024" in out.output and "1590 tokens/frame" in out.output and "21 latent frames" in out.output
    assert elapsed < 30


def test_inspect_validates_checkpoint(goldens_dir, tmp_path):
    runner = CliRunner()
    out = runner.invoke(main, ["inspect", str(goldens_dir / "config.yaml"), str(goldens_dir / "model.pth")])
    assert out.exit_code == 0, out.output
    assert "OK" in out.output
    bad = tmp_path / "bad.yaml"
    bad.write_text((goldens_dir / "config.yaml").read_text().replace("channels: 32", "channels: 64"))
    out = runner.invoke(main, ["inspect", str(bad), str(goldens_dir / "model.pth")])
    assert out.exit_code == 2
    assert out.output.startswith("error: checkpoint does not match the config") and "shape-mismatched" in out.output


def test_unavailable_verb_is_one_line(monkeypatch, tmp_path):
    # a verb whose optional dependency is missing: one line naming it, exit 2
    (tmp_path / "sf_optional_verb.py").write_text("import no_such_optional_package\ncmd = None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(COMMANDS, "ghost", "sf_optional_verb:cmd")
    out = CliRunner().invoke(main, ["ghost", "--anything"])
    assert out.exit_code == 2 and "not available" in out.output and "no_such_optional_package" in out.output
    assert len(out.output.strip().splitlines()) == 1


def test_import_bug_in_a_verb_is_not_hidden(monkeypatch):
    # a missing starflow_trt module is a bug, not an optional dependency: reported as internal error, exit 1
    monkeypatch.setitem(COMMANDS, "ghost", "starflow_trt.no_such_module:cmd")
    out = CliRunner().invoke(main, ["ghost"])
    assert out.exit_code == 1 and "internal error" in out.output and "--debug" in out.output
    assert "not available" not in out.output and "Traceback" not in out.output
    out = CliRunner().invoke(main, ["--debug", "ghost"])
    assert isinstance(out.exception, ModuleNotFoundError)  # --debug re-raises: the traceback is shown


def test_verbs_live_in_one_package_without_cycles():
    import importlib
    import re

    root = Path(__file__).resolve().parents[1] / "starflow_trt"
    assert all(t.startswith("starflow_trt.commands.") for t in COMMANDS.values())
    for target in COMMANDS.values():
        module, attr = target.split(":")
        assert isinstance(getattr(importlib.import_module(module), attr), click.Command), target
    # only the CLI layer knows the commands; calibration never imports the demo (the old cycle)
    for path in root.rglob("*.py"):
        if path.parent.name != "commands" and path.name != "cli.py":
            assert not re.search(r"from \.+commands|starflow_trt\.commands", path.read_text()), path
    assert not (root / "calibration" / "demo.py").exists() and not (root / "calibration" / "cli.py").exists()
    from starflow_trt.toy import DEMO_PROMPTS, PROMPTS

    assert set(DEMO_PROMPTS) <= set(PROMPTS)
    assert "DEMO_PROMPTS = [" not in (root / "commands" / "demo_cmd.py").read_text()
