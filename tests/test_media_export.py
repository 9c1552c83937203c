"""Media graphs through the graph registry: export with --text-encoder / --vae, manifest fields, ORT vs PyTorch."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("sentencepiece")
pytest.importorskip("onnxruntime")

from starflow_trt.errors import ConfigError  # noqa: E402
from starflow_trt.export.manifest import load_manifest  # noqa: E402
from starflow_trt.export.onnx_export import ExportLimits, export_graphs  # noqa: E402
from starflow_trt.media import text as T  # noqa: E402
from starflow_trt.media.export import ort_callable, ort_session, rel_error  # noqa: E402
from starflow_trt.media.tiny import make_t5_dir  # noqa: E402

LIMITS = ExportLimits(height=6, width=4, max_frames=3, max_batch=4)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return make_t5_dir(tmp_path_factory.mktemp("t5"), d_model=16, d_kv=8, num_heads=2, d_ff=32)


@pytest.fixture(scope="module")
def text_export(goldens_dir, t5_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("media") / "graphs"
    export_graphs(goldens_dir / "config.yaml", goldens_dir / "model.pth", out, graphs=["text_encoder"],
                  limits=LIMITS, text_encoder=t5_dir)
    return out


def test_text_encoder_graph_manifest_and_parity(text_export, t5_dir, goldens_dir):
    from starflow_trt.config import load_config

    m = load_manifest(text_export)
    spec = m.graphs["text_encoder"]
    assert spec.kind == "text_encoder" and [t.name for t in spec.inputs] == ["input_ids", "attention_mask"]
    assert spec.dims["tokens"].max == 4 and spec.dims["batch"].max == 8
    cfg = load_config(goldens_dir / "config.yaml")
    assert spec.extra["template"] == T.TextTemplate.from_config(cfg).to_dict()
    assert spec.extra["d_model"] == 16
    hashes = spec.extra["tokenizer_files"]
    assert hashes and hashes == T.tokenizer_files(text_export / spec.extra["tokenizer_dir"]) == T.tokenizer_files(t5_dir)
    # ORT vs PyTorch on real tokens, at a batch the graph was not traced with
    enc = T.T5TextEncoder.from_pretrained(t5_dir, T.TextTemplate(txt_size=4))
    ids, mask = enc.tokenize(["a cat", "", "a red square moving right"])
    ort = ort_callable(ort_session(spec.path))(ids, mask)[0]
    ref = enc.encode_texts(["a cat", "", "a red square moving right"])
    assert rel_error(ort, ref) <= 1e-5
    assert (ort[mask == 0] == 0).all()


def test_text_encoder_width_must_match_the_flow(goldens_dir, tmp_path):
    wide = make_t5_dir(tmp_path / "t5", d_model=32)
    with pytest.raises(ConfigError, match="txt_dim 16"):
        export_graphs(goldens_dir / "config.yaml", goldens_dir / "model.pth", tmp_path / "out",
                      graphs=["text_encoder"], limits=LIMITS, text_encoder=wide)
    assert not (tmp_path / "out").exists()


def test_no_media_sources_no_media_graphs(goldens_export):
    kinds = {s.kind for s in load_manifest(goldens_export).graphs.values()}
    assert not kinds & {"text_encoder", "vae_decode_first", "vae_decode_step", "vae_encode"}


@pytest.mark.slow
def test_vae_graphs_chained_ort_equals_whole_clip(goldens_dir, tmp_path):
    pytest.importorskip("diffusers")
    from starflow_trt.media import vae as V
    from starflow_trt.media.tiny import make_vae

    vae = make_vae(seed=1, z_dim=4)
    vae.save_pretrained(tmp_path / "vae")
    out = tmp_path / "graphs"
    export_graphs(goldens_dir / "config.yaml", goldens_dir / "model.pth", out, limits=LIMITS, vae=tmp_path / "vae",
                  graphs=["vae_decode_first", "vae_decode_step", "vae_encode"])
    m = load_manifest(out)
    first, step = (m.graphs[k] for k in ("vae_decode_first", "vae_decode_step"))
    assert first.dims["h"].max == 6 and first.dims["w"].max == 4 and step.dims["h_x8"].max == 48
    norm = V.LatentNorm.from_dict(step.extra["norm"])
    assert norm == V.LatentNorm.from_vae(vae, None)
    z = torch.randn(1, 3, 4, 3, 2, generator=torch.Generator().manual_seed(5)) * 2
    got = V.decode_streaming(ort_callable(ort_session(first.path)), ort_callable(ort_session(step.path)), z)
    err = rel_error(got, V.decode_whole(vae, z))
    assert err <= 1e-5, err
    img = torch.rand(2, 1, 3, 32, 48) * 2 - 1
    mean, logvar = ort_callable(ort_session(m.graphs["vae_encode"].path))(img)
    ref_mean, ref_logvar = V.encode_whole(vae, img)
    assert rel_error(mean, ref_mean) <= 1e-5 and rel_error(logvar, ref_logvar) <= 1e-5


def test_cli_media_sources_validated_before_any_work(goldens_dir, t5_dir, tmp_path):
    from click.testing import CliRunner

    from starflow_trt.cli import main

    base = ["export", str(goldens_dir / "config.yaml"), str(goldens_dir / "model.pth"), "-o", str(tmp_path / "o")]
    no_tok = tmp_path / "no_tok"
    no_tok.mkdir()
    (no_tok / "config.json").write_text("{}")
    bad_vae = tmp_path / "vae.bin"
    bad_vae.write_bytes(b"x")
    cases = [(["--text-encoder", str(tmp_path / "missing")], "is not a directory"),
             (["--text-encoder", str(tmp_path)], "has no config.json"),
             (["--text-encoder", str(no_tok)], "has no tokenizer"),
             (["--vae", str(tmp_path / "missing.pth")], "does not exist"),
             (["--vae", str(bad_vae)], "is not a .pth or .safetensors"),
             (["--vae", str(no_tok.parent / "t5dir_without_config")], "does not exist")]
    for extra, message in cases:
        out = CliRunner().invoke(main, base + extra)
        assert out.exit_code == 2, out.output
        lines = out.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], out.output
    assert not (tmp_path / "o").exists()


def test_cli_exports_text_encoder(goldens_dir, t5_dir, tmp_path):
    from click.testing import CliRunner

    from starflow_trt.cli import main

    out = CliRunner().invoke(main, ["export", str(goldens_dir / "config.yaml"), str(goldens_dir / "model.pth"),
                                    "-o", str(tmp_path / "o"), "--graphs", "text_encoder", "--grid", "6x4",
                                    "--text-encoder", str(t5_dir)])
    assert out.exit_code == 0, out.output
    assert set(load_manifest(tmp_path / "o").graphs) == {"text_encoder"}
    assert T.tokenizer_files(tmp_path / "o" / "tokenizer") == T.tokenizer_files(t5_dir) != {}
