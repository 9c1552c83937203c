"""Calibration from prompt text (issue 29): ``calibrate --prompts FILE``, the default prompt set, bad input.

Quick: the prompt file reader, the default set, which set an export gets, the encoding (spied, no capture) and
the CLI's refusals. Slow: calibrations end to end on the media export (tiny T5 + VAE) and the toy.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from starflow_trt.calibration.prompts import PromptSet, default_prompt_set, read_prompt_file
from starflow_trt.cli import main
from starflow_trt.errors import InputError

pytest.importorskip("onnxruntime")


def _cli(*args) -> tuple[int, str]:
    res = CliRunner().invoke(main, [str(a) for a in args])
    return res.exit_code, res.output


# ------------------------------------------------------------------------------------- prompt files
def test_prompt_file_one_a_line_blank_lines_skipped(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("\ufeffa cat on a sofa\n\n   \n  rain over a city at night  \r\nfireworks".encode())
    found = read_prompt_file(path)
    assert found.prompts == ("a cat on a sofa", "rain over a city at night", "fireworks")
    assert found.source == "file" and found.path == str(path.resolve())
    assert found.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert found.record() == {"source": "file", "count": 3, "path": str(path.resolve()), "sha256": found.sha256}
    assert found.first(2).prompts == found.prompts[:2] and found.first(None) is found


@pytest.mark.parametrize("content, match", [
    (b"", "holds no prompt"),
    (b"\n  \n\t\n", "holds no prompt"),
    (b"fine\n" + b"x" * 2001 + b"\n", "line 2 has 2001 characters, over the limit of 2000"),
    (b"\xff\xfe a cat", "is not UTF-8 text"),
])
def test_prompt_file_refusals_are_one_line(tmp_path, content, match):
    path = tmp_path / "p.txt"
    path.write_bytes(content)
    with pytest.raises(InputError, match=match) as err:
        read_prompt_file(path)
    assert "\n" not in str(err.value) and "--prompts" in str(err.value)


def test_prompt_file_missing_and_limit(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_prompt_file(tmp_path / "absent.txt")
    (tmp_path / "p.txt").write_text("short\nlonger than ten\n")
    with pytest.raises(InputError, match="line 2 has 15 characters, over the limit of 10"):
        read_prompt_file(tmp_path / "p.txt", max_chars=10)


def test_samples_beyond_the_set_is_refused():
    prompts = PromptSet(("a", "b"), "file", path="/x/p.txt")
    with pytest.raises(InputError, match=r"--samples 3 but --prompts /x/p.txt has 2 prompt\(s\)"):
        prompts.first(3)


def test_default_set_is_shipped_and_varied():
    found = default_prompt_set()
    assert found.source == "default" and found.path is None and len(found.prompts) >= 64
    assert len(set(found.prompts)) == len(found.prompts)
    assert all(0 < len(p) <= 2000 and p == p.strip() for p in found.prompts)
    words = {w.strip(",.").lower() for p in found.prompts for w in p.split()}
    assert len(words) > 400   # varied subjects, motion, camera, style and lighting, not one template
    for kind in ("slow motion", "aerial", "timelapse", "close-up", "night", "sunset", "anime", "watercolor"):
        assert any(kind in p.lower() for p in found.prompts), kind
    assert found.record() == {"source": "default", "count": len(found.prompts), "sha256": found.sha256}


# ------------------------------------------------------------------------------ which set, encoding
@pytest.mark.slow   # media_export: built once for the slow tier's media tests
def test_default_set_of_a_t5_export(media_export):
    """T5: the package's set."""
    from starflow_trt.commands.calibrate_cmd import default_prompt_set_for
    from starflow_trt.export.manifest import load_manifest

    assert default_prompt_set_for(load_manifest(media_export), None) == default_prompt_set()


def test_default_set_per_export(toy_prompt_export, toy_export, goldens_export):
    """A word vocabulary (a toy's graph, or the bundled toy's words): the toy's prompts; no text encoder: none
    (a T5 export: the package's set, :func:`test_default_set_of_a_t5_export`)."""
    from starflow_trt.commands.calibrate_cmd import TOY_SAMPLES, default_prompt_set_for
    from starflow_trt.export.manifest import load_manifest
    from starflow_trt.toy.calibration import toy_prompts

    toy = default_prompt_set_for(load_manifest(toy_prompt_export), None)
    assert toy.source == "toy" and list(toy.prompts) == toy_prompts(TOY_SAMPLES)
    assert len(default_prompt_set_for(load_manifest(toy_prompt_export), 5).prompts) == 5
    assert default_prompt_set_for(load_manifest(goldens_export), None) is None
    assert default_prompt_set_for(load_manifest(toy_export), None).source == "toy"   # no graph: the bundled words


@pytest.mark.parametrize("which", [pytest.param("media", marks=pytest.mark.slow), "toy"])   # slow: media_export
def test_prompts_are_encoded_by_the_pipeline_with_the_exports_template(which, request, tmp_path, monkeypatch):
    """What capture sees: ``Pipeline.encode_text`` at the export's fps and default aspect; uncond = template("")."""
    from starflow_trt.calibration import calibrate as C
    from starflow_trt.runtime import Pipeline

    export = request.getfixturevalue("media_export" if which == "media" else "toy_prompt_export")   # only the one asked
    prompts = (PromptSet(("a cat", "rain over a city", "a dog"), "file", path="p.txt") if which == "media"
               else PromptSet(("a red square moving left", "a blue disc moving up"), "toy"))
    seen = {}

    class Stop(Exception):
        pass

    def spy(pipe, text, uncond, *args, **kwargs):
        seen["text"], seen["uncond"] = text, uncond
        raise Stop

    monkeypatch.setattr(C, "capture_activations", spy)
    with pytest.raises(Stop):
        C.calibrate_directory(export, tmp_path / "out", "int8", prompts=prompts, samples=2, log=lambda m: None)
    with Pipeline.from_dir(export) as pipe:
        s = pipe.summary
        y, u = pipe.encode_text(list(prompts.prompts[:2]), fps=s.default_fps, aspect=s.aspect)
        empty, _ = pipe.encode_text([""], fps=s.default_fps, aspect=s.aspect)
    assert torch.equal(seen["text"], y) and torch.equal(seen["uncond"], u)
    assert torch.equal(seen["uncond"][1], empty[0])
    assert not (tmp_path / "out").exists()


def test_prompts_and_embeddings_together_are_refused(goldens_export, cases, tmp_path):
    from starflow_trt.calibration import calibrate_directory
    from starflow_trt.errors import StarflowError

    with pytest.raises(StarflowError, match="not both"):
        calibrate_directory(goldens_export, tmp_path / "x", "int8", text=cases["y"], uncond=cases["y_uncond"],
                            prompts=PromptSet(("a cat",), "file"), log=lambda m: None)


# ------------------------------------------------------------------------------------- CLI refusals
def _refused(args, out: Path, *match: str) -> None:
    code, output = _cli("calibrate", *args, "-o", out)
    assert code == 2, output
    assert output.count("\n") == 1 and output.startswith("error: "), output
    assert "Traceback" not in output and all(m in output for m in match), output
    assert not out.exists()


def test_cli_bad_prompt_files_exit_2_one_line_nothing_written(toy_prompt_export, tmp_path):
    out = tmp_path / "q"
    _refused([toy_prompt_export, "--precision", "int8", "--prompts", tmp_path / "absent.txt"], out,
             "--prompts", "does not exist")
    (tmp_path / "empty.txt").write_text("")
    _refused([toy_prompt_export, "--precision", "int8", "--prompts", tmp_path / "empty.txt"], out,
             "holds no prompt")
    (tmp_path / "blank.txt").write_text("\n \n")
    _refused([toy_prompt_export, "--precision", "int8", "--prompts", tmp_path / "blank.txt"], out,
             "holds no prompt")
    (tmp_path / "long.txt").write_text("a red disc moving up\n" + "a " * 1001 + "\n")
    _refused([toy_prompt_export, "--precision", "int8", "--prompts", tmp_path / "long.txt"], out,
             "line 2 has", "over the limit of 2000")
    (tmp_path / "words.txt").write_text("a cat playing piano\n")   # not in the toy's twelve words
    _refused([toy_prompt_export, "--precision", "int8", "--prompts", tmp_path / "words.txt"], out,
             "unknown word(s)")
    assert not list(Path(toy_prompt_export).glob("*.partial*"))


def test_cli_prompt_option_conflicts_and_exports_without_encoder(goldens_export, cases, tmp_path):
    import numpy as np

    out = tmp_path / "q"
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    np.save(tmp_path / "y.npy", cases["y"].numpy())
    _refused([goldens_export, "--precision", "int8", "--prompts", prompts, "--text-embeddings", tmp_path / "y.npy"],
             out, "--prompts and --text-embeddings")
    _refused([goldens_export, "--precision", "int8", "--prompts", prompts, "--uncond", tmp_path / "y.npy"],
             out, "--uncond goes with --text-embeddings")
    _refused([goldens_export, "--precision", "int8", "--prompts", prompts], out, "no text_encoder graph")
    _refused([goldens_export, "--precision", "int8"], out, "no calibration prompts", "--prompts FILE")


def test_help_documents_prompts():
    code, output = _cli("calibrate", "--help")
    assert code == 0 and "--prompts" in output and "default" in output


# ------------------------------------------------------------------------------------- end to end
def _report(name: str, manifest: dict, capsys) -> None:
    q = manifest["quality"]
    worst = {k: round(max(g["rel_l2"].values()), 4) for k, g in q["graphs"].items()}
    with capsys.disabled():
        print(f"\n[{name}] prompts {manifest['calibration']['prompt_set']}: bits/dim {q['bpd_fp32']:.4f} -> "
              f"{q['bpd']:.4f} ({q['bpd_increase']:+.4f}), latent PSNR {q['latent_psnr_db']:.1f} dB, gate "
              f"{'passed' if q['gate']['passed'] else q['gate']['failures']}; worst rel L2 per graph {worst}")


@pytest.mark.slow
def test_media_export_calibrates_on_the_default_set_then_generates_an_mp4(media_export, tmp_path, capsys):
    """(a) tiny T5 + VAE graphs, no prompt option: the default set through the T5 graph, recorded; the INT8
    directory then generates from a prompt through the CLI. The goldens flow has random weights, so its INT8
    quality is no target (its gate fails whatever the prompts: +70 to +340 bits/dim measured); the figures are
    printed, the gate's verdict is recorded, --ignore-gate writes the graphs."""
    from starflow_trt.media.io import load_video

    out = tmp_path / "q"
    code, output = _cli("calibrate", media_export, "--precision", "int8", "--samples", 16, "--ignore-gate", "-o", out)
    assert code == 0, output
    assert "calibration prompts: 16 from the default set" in output
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["calibration"]["prompt_set"]
    default = default_prompt_set()
    assert record == {"source": "default", "count": 16, "sha256": default.sha256, "fps": 16, "aspect": "16:9"}
    assert manifest["calibration"]["prompts"] == 16
    q = manifest["quality"]
    assert all(torch.isfinite(torch.tensor(v)) for v in (q["bpd_fp32"], q["bpd"], q["latent_psnr_db"]))
    assert all(max(q["graphs"][g]["rel_l2"].values()) <= 0.01 for g in ("vae_decode_first", "vae_decode_step"))
    _report("media export, int8, default set", manifest, capsys)
    code, output = _cli("generate", out, "--prompt", "a lighthouse in a storm at night",
                        "-o", tmp_path / "gen")
    assert code == 0, output
    frames = load_video(tmp_path / "gen" / "video.mp4")[0]
    assert frames.shape[0] == 9 and frames.shape[-1] == 3   # 3 latent frames


@pytest.mark.slow
def test_toy_calibrates_from_a_prompt_file_and_passes_the_gate(toy_prompt_export, tmp_path, capsys):
    """(b) the toy with its word text_encoder graph, --prompts FILE and every other option at its default: the
    file's prompts through the graph, its path and hash recorded, the INT8 gate passed."""
    from starflow_trt.toy.calibration import toy_prompts

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(toy_prompts(32)) + "\n\n")
    out = tmp_path / "q"
    code, output = _cli("calibrate", toy_prompt_export, "--precision", "int8", "--prompts", prompts, "-o", out)
    assert code == 0, output
    assert "gate passed" in output and f"calibration prompts: 32 from {prompts.resolve()}" in output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quality"]["gate"]["passed"] and not manifest["quality"]["gate"]["forced"]
    record = manifest["calibration"]["prompt_set"]
    assert record["source"] == "file" and record["count"] == 32 and record["path"] == str(prompts.resolve())
    assert record["sha256"] == hashlib.sha256(prompts.read_bytes()).hexdigest()
    _report("toy, int8, --prompts FILE", manifest, capsys)
