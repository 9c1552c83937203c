"""Fuzzing the CLI (issue 12): random option values and random / corrupted input files.

Properties, for ``export``, ``generate``, ``score`` and ``calibrate``:

* never a traceback: exit 0, or exit 2 with ``error: …`` as the last line (exit 1 is a bug);
* never exit 0 with NaN / Inf in an output (latents, stats.json, scores);
* never a file outside the output directory touched (the whole tmp tree and the shared export are
  snapshotted around every example; staging directories must be gone too).

Bounded: few examples, no deadline, one session-scoped export (``goldens_export``) reused.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from starflow_trt.cli import main

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytest.importorskip("onnxruntime")

FUZZ = settings(deadline=None, database=None, derandomize=True, print_blob=True,
                phases=(Phase.explicit, Phase.generate),  # no shrinking: a failure reports its draws, quickly
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])

#: option values: plausible, edge and garbage (all as the strings a shell would pass)
NUMBER = st.one_of(st.integers(-3, 40).map(str),
                   st.sampled_from(["nan", "inf", "-inf", "1e400", "abc", "", "0.5", "-0.0", "1e-9", "2.5"]),
                   st.floats(-1e3, 1e3, allow_nan=False).map(lambda v: f"{v:g}"))
#: option → plausible values; each option is drawn from these 3 times in 4, from NUMBER otherwise
PLAUSIBLE = {"--frames": st.integers(1, 4), "--guidance": st.floats(0, 5), "--jacobi-block": st.integers(1, 40),
             "--jacobi-iters": st.integers(1, 40), "--jacobi-threshold": st.floats(0, 1), "--seed": st.integers(0, 999),
             "--samples": st.integers(1, 4), "--max-batch": st.integers(1, 5), "--max-frames": st.integers(1, 4),
             "--opset": st.integers(17, 20)}


def value(option: str):
    plausible = PLAUSIBLE[option].map(lambda v: f"{v:g}" if isinstance(v, float) else str(v))
    return st.integers(0, 3).flatmap(lambda i: NUMBER if i == 3 else plausible)


ARRAY_KINDS = ["valid", "valid", "valid", "valid", "random_bytes", "truncated", "empty", "wrong_shape", "nan", "int", "huge", "object",
               "text", "scalar"]


def snapshot(root: Path) -> dict[str, tuple]:
    return {str(p.relative_to(root)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def write_array(path: Path, kind: str, valid: np.ndarray, rng: np.random.Generator) -> Path:
    """``valid`` or a corrupted variant of it, as a file at ``path``."""
    if kind == "valid":
        np.save(path, valid)
    elif kind == "random_bytes":
        path.write_bytes(rng.bytes(int(rng.integers(1, 600))))
    elif kind == "truncated":
        np.save(path, valid)
        data = path.read_bytes()
        path.write_bytes(data[: int(rng.integers(1, len(data)))])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "wrong_shape":
        np.save(path, valid.reshape(-1)[: max(1, valid.size // 2)].reshape(1, 1, -1))
    elif kind == "nan":
        bad = valid.copy()
        bad.flat[int(rng.integers(0, bad.size))] = np.nan
        np.save(path, bad)
    elif kind == "int":
        np.save(path, (valid * 3).astype(np.int64))
    elif kind == "huge":
        np.save(path, valid * np.float32(1e30))
    elif kind == "object":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif kind == "text":
        path.write_text("1 2 3\n")
    elif kind == "scalar":
        np.save(path, np.float32(1.0))
    return path


def check(result, out: Path, root: Path, before: dict, export_dir: Path, export_before: dict) -> None:
    """The three properties of the module docstring."""
    text = result.output
    hypothesis.event(f"exit {result.exit_code}: {text.strip().splitlines()[-1][:60] if text.strip() else ''}")
    assert "Traceback" not in text, text
    assert result.exit_code in (0, 2), f"exit {result.exit_code}: {text[-2000:]} {result.exception!r}"
    assert isinstance(result.exception, (SystemExit, type(None))), repr(result.exception)
    if result.exit_code == 2:
        assert text.strip().splitlines()[-1].startswith("error: "), text
    else:
        for npy in out.rglob("*.npy") if out.exists() else []:
            assert np.isfinite(np.load(npy)).all(), npy
        for js in out.rglob("*.json") if out.exists() else []:
            json.loads(js.read_text(), parse_constant=lambda c: pytest.fail(f"{js} holds {c}"))
    # the output and the parents made for it may change, when they did not exist before the run
    top = out.relative_to(root).parts[0] if out != root else ""
    mine = (lambda k: k == top or k.startswith(top + "/")) if top and top not in before else (lambda k: False)
    after = {k: v for k, v in snapshot(root).items() if not mine(k)}
    assert after == before, f"files outside the output changed: {set(after) ^ set(before)}"
    assert snapshot(export_dir) == export_before


class _Arrays(dict):
    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return f"arrays({', '.join(f'{k}{list(v.shape)}' for k, v in self.items())})"


@pytest.fixture(scope="module")
def arrays(cases) -> dict[str, np.ndarray]:
    return _Arrays({k: cases[k].numpy() for k in ("y", "y_uncond", "noise", "x")})


@pytest.fixture(scope="module")
def broken_exports(goldens_export, tmp_path_factory) -> dict[str, Path]:
    """The shared export, and corrupted copies of it (manifest and graph damage)."""
    root = tmp_path_factory.mktemp("broken")
    out = {"valid": goldens_export}
    for kind in ("manifest_truncated", "manifest_garbage", "graph_corrupted", "graph_missing", "empty"):
        d = root / kind
        if kind == "empty":
            d.mkdir()
        else:
            shutil.copytree(goldens_export, d)
        if kind == "manifest_truncated":
            text = (d / "manifest.json").read_text()
            (d / "manifest.json").write_text(text[: len(text) // 3])
        elif kind == "manifest_garbage":
            (d / "manifest.json").write_bytes(np.random.default_rng(1).bytes(300))
        elif kind == "graph_corrupted":
            g = d / "deep_step.onnx"
            data = bytearray(g.read_bytes())
            data[len(data) // 2] ^= 0xFF
            g.write_bytes(bytes(data))
        elif kind == "graph_missing":
            (d / "forward_0.onnx").unlink()
        out[kind] = d
    return out


def _invoke(args: list) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


#: what one example breaks: nothing (random valid options, the sampling paths), or one input / value / path
FAULTS = ["none"] * 8 + ["array", "array", "option", "option", "export", "output", "several", "several"]
FAULT = st.integers(0, len(FAULTS) - 1).map(FAULTS.__getitem__)
GOOD_ARRAYS = ["valid", "valid", "valid", "int", "huge"]  # readable; "huge" (1e30) must not give NaN outputs
BAD_ARRAYS = ["random_bytes", "truncated", "empty", "wrong_shape", "nan", "object", "text", "scalar"]


def draw_array(data, fault: str, hit: bool) -> str:
    bad = fault == "several" or (fault == "array" and hit)
    return data.draw(st.sampled_from(BAD_ARRAYS if bad else GOOD_ARRAYS))


#: values every numeric option refuses
BAD_NUMBER = st.one_of(st.sampled_from(["nan", "inf", "-inf", "1e400", "abc", "", "-1", "-3", "-2.5", "1,5", "0x"]),
                       st.floats(-1e3, -1e-3).map(lambda v: f"{v:g}"))


def draw_option(data, option: str, fault: str, hit: bool) -> str:
    if fault == "option" and hit:
        return data.draw(BAD_NUMBER)
    if fault == "several" and data.draw(st.booleans()):
        return data.draw(NUMBER)
    return data.draw(PLAUSIBLE[option].map(lambda v: f"{v:g}" if isinstance(v, float) else str(v)))


@settings(FUZZ, max_examples=20)
@given(data=st.data())
def test_fuzz_generate(data, arrays, broken_exports):
    fault = data.draw(FAULT)
    broken = sorted(set(broken_exports) - {"valid"})
    directory = broken_exports[data.draw(st.sampled_from(broken)) if fault in ("export", "several") else "valid"]
    export_before = snapshot(directory)
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16)))
    options = ("--frames", "--guidance", "--jacobi-block", "--jacobi-iters", "--jacobi-threshold", "--seed")
    arrays_hit = data.draw(st.sampled_from(["--text-embeddings", "--uncond", "--noise"]))
    option_hit = data.draw(st.sampled_from(options))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        args = ["generate", directory, "--thread-pool", "session"]
        for name, key in (("--text-embeddings", "y"), ("--uncond", "y_uncond"), ("--noise", "noise")):
            if name == "--text-embeddings" or name == arrays_hit or data.draw(st.booleans()):
                kind = draw_array(data, fault, name == arrays_hit)
                args += [name, write_array(root / f"{key}.npy", kind, arrays[key], rng)]
        for option in options:
            if option == option_hit or data.draw(st.booleans()):
                args += [option, draw_option(data, option, fault, option == option_hit)]
        args += data.draw(st.lists(st.sampled_from(["--autoregressive", "--no-denoise", "--force"]), unique=True))
        if data.draw(st.booleans()):
            args += ["--schedule", data.draw(st.sampled_from(["sliding", "upstream"]))]
        out = root / data.draw(st.sampled_from(["y.npy", "userdir", "."] if fault == "output" else ["gen", "sub/gen"]))
        (root / "userdir").mkdir()
        (root / "userdir" / "photo.jpg").write_text("the user's")
        before = snapshot(root)
        result = _invoke([*args, "-o", out])
        if fault != "none":
            assert result.exit_code == 2, result.output
        check(result, out, root, before, directory, export_before)


@settings(FUZZ, max_examples=10)
@given(data=st.data())
def test_fuzz_score(data, arrays, broken_exports):
    fault = data.draw(FAULT)
    broken = sorted(set(broken_exports) - {"valid"})
    directory = broken_exports[data.draw(st.sampled_from(broken)) if fault in ("export", "several") else "valid"]
    export_before = snapshot(directory)
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16)))
    hit = data.draw(st.sampled_from(["x", "y"]))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        x = write_array(root / "x.npy", draw_array(data, fault, hit == "x"), arrays["x"], rng)
        y = write_array(root / "y.npy", draw_array(data, fault, hit == "y"), arrays["y"], rng)
        out = root / ("x.npy" if fault == "output" else "scores")
        args = ["score", directory, "--video", x, "--text-embeddings", y]
        if fault == "output" or data.draw(st.booleans()):
            args += ["-o", out]
        before = snapshot(root)
        result = _invoke(args)
        if fault not in ("none", "option"):
            assert result.exit_code == 2, result.output
        check(result, out, root, before, directory, export_before)
        if result.exit_code == 0:
            scores = json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"score printed {c}"))
            assert all(math.isfinite(v) for v in scores["nll"] + scores["bits_per_dim"])


CONFIG_EDITS = [("channels: 32", "channels: {}"), ("head_dim: 32", "head_dim: {}"), ("patch_size: 1", "patch_size: {}"),
                ("img_size: 4", "img_size: {}"), ("txt_size: 4", "txt_size: {}"), ("vid_size: '9:16'", "vid_size: '{}'"),
                ("layers_per_block: 1 1 1 1 1 2", "layers_per_block: {}"), ("seq_order: L2R", "seq_order: {}"),
                ("soft_clip: 4", "soft_clip: {}"), ("- rope: 1\n", ""), ("arguments:", "{}")]


@settings(FUZZ, max_examples=8)
@given(data=st.data())
def test_fuzz_export(data, goldens_dir, broken_exports):
    fault = data.draw(FAULT)
    export_before = snapshot(broken_exports["valid"])
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16)))
    hit = data.draw(st.sampled_from(["config", "checkpoint"]))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = root / "config.yaml"
        text = (goldens_dir / "config.yaml").read_text()
        config_kind = "valid"
        if (fault == "array" and hit == "config") or fault == "several":
            config_kind = data.draw(st.sampled_from(["edit", "edit", "random_bytes", "empty"]))
        if config_kind == "edit":
            old, new = data.draw(st.sampled_from(CONFIG_EDITS))
            text = text.replace(old, new.format(data.draw(NUMBER)))
        if config_kind in ("valid", "edit"):
            config.write_text(text)
        else:
            config.write_bytes(rng.bytes(200) if config_kind == "random_bytes" else b"")
        checkpoint = root / "model.pth"
        ckpt_kind = "valid"
        if (fault == "array" and hit == "checkpoint") or fault == "several":
            ckpt_kind = data.draw(st.sampled_from(["truncated", "random_bytes", "empty"]))
        data_bytes = (goldens_dir / "model.pth").read_bytes()
        checkpoint.write_bytes({"valid": data_bytes, "truncated": data_bytes[: len(data_bytes) // 2],
                                "random_bytes": rng.bytes(1000), "empty": b""}[ckpt_kind])
        args = ["export", config, checkpoint, "--graphs", "nope" if fault == "export" else "forward_0"]
        option_hit = data.draw(st.sampled_from(["--max-batch", "--max-frames", "--opset"]))
        for option in ("--max-batch", "--max-frames", "--opset"):
            if option == option_hit or data.draw(st.booleans()):
                args += [option, draw_option(data, option, fault, option == option_hit)]
        bad_grid = fault == "several" and data.draw(st.booleans())
        if bad_grid or data.draw(st.booleans()):
            args += ["--grid", data.draw(st.sampled_from(["0x4", "3x", "x", "-1x2"] if bad_grid else ["6x4", "2x2"]))]
        if data.draw(st.booleans()):
            args += ["--aspect", data.draw(st.sampled_from(["0:1", "a:b", "1", "inf:1"] if fault == "several"
                                                           else ["16:9", "4:3"]))]
        out = root / (data.draw(st.sampled_from(["userdir", "."])) if fault == "output" else "new")
        if data.draw(st.booleans()):
            args.append("--force")
        (root / "userdir").mkdir()
        (root / "userdir" / "user.txt").write_text("not starflow-trt's")  # --force must refuse it
        before = snapshot(root)
        result = _invoke([*args, "-o", out])
        if fault in ("option", "export", "output", "several") or (fault == "array" and hit == "checkpoint"):
            assert result.exit_code == 2, result.output  # (a config edit may still be a valid config)
        check(result, root / "new", root, before, broken_exports["valid"], export_before)


@settings(FUZZ, max_examples=8)
@given(data=st.data())
def test_fuzz_calibrate(data, arrays, broken_exports):
    """Random options and inputs; every example has at least one bad input or value (a valid calibration
    takes a minute: tests/test_calibration.py covers it)."""
    export_kind = data.draw(st.sampled_from(["valid", "valid", *sorted(broken_exports)]))
    export_before = snapshot(broken_exports[export_kind])
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16)))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # always refused (corrupt, wrong rank, NaN, not numbers): keeps every example fast
        y_kind = data.draw(st.sampled_from(["random_bytes", "truncated", "empty", "wrong_shape", "nan", "object",
                                            "text", "scalar"]))
        args = ["calibrate", broken_exports[export_kind], "--precision", data.draw(st.sampled_from(["int8", "fp16"])),
                "--text-embeddings", write_array(root / "y.npy", y_kind, arrays["y"], rng)]
        u_kind = data.draw(st.sampled_from(["absent", *ARRAY_KINDS]))
        if u_kind != "absent":
            args += ["--uncond", write_array(root / "u.npy", u_kind, arrays["y_uncond"], rng)]
        for option in ("--samples", "--guidance"):
            if data.draw(st.booleans()):
                args += [option, data.draw(value(option))]
        if data.draw(st.booleans()):
            args += ["--exclude", data.draw(st.sampled_from(["proj_out", "(", "[a-", ".*"]))]
        args += data.draw(st.lists(st.sampled_from(["--force", "--ignore-gate"]), unique=True))
        out = root / "cal"
        if data.draw(st.booleans()):
            args += ["--capture-dir", root / "cap"]
        before = snapshot(root)
        result = _invoke([*args, "-o", out])
        assert result.exit_code == 2, result.output  # one bad input in every example
        check(result, out, root, before, broken_exports[export_kind], export_before)
