"""Upstream YAML parsing, defaults, derived geometry (spec §1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from starflow_trt.config import ModelConfig, load_config, parse_config
from starflow_trt.errors import ConfigError
from starflow_trt.geometry import frame_geometry

CONFIG_7B = Path(__file__).resolve().parents[1] / "starflow_trt" / "configs" / "starflow_v_7b.yaml"


def test_7b_config_parses_with_spec_values():
    cfg = load_config(CONFIG_7B)
    assert cfg.num_blocks == 6 and cfg.layers == (2, 2, 2, 2, 2, 24)
    assert (cfg.channels, cfg.top_channels, cfg.head_dim) == (3072, 4096, 64)
    assert cfg.block_heads(0) == 48 and cfg.block_heads(5) == 64
    assert cfg.text_width == 2048 and cfg.text_length == 256
    assert cfg.latent_img_size == 40 and cfg.rope_seq_len == 32 and cfg.token_channels == 48
    assert cfg.latent_frames == 21 and cfg.vae_temporal_scale == 0.6
    assert [cfg.block_permutation(k) for k in range(6)] == ["flip_within_frame", "identity"] * 3
    assert dict(cfg.unknown) == {"batch_size": "1", "lr": "5e-5"}


@pytest.mark.parametrize("aspect,hw", [("1:1", (40, 40)), ("16:9", (30, 53)), ("9:16", (53, 30)),
                                       ("2:3", (49, 33)), ("3:2", (33, 49)), ("4:5", (45, 36)),
                                       ("21:9", (26, 61))])
def test_frame_geometry_table(aspect, hw):
    geo = frame_geometry(load_config(CONFIG_7B), aspect)
    assert (geo["h"], geo["w"]) == hw and geo["tokens_per_frame"] == hw[0] * hw[1]


@pytest.mark.parametrize("frames,latent", [(81, 21), (161, 41), (241, 61), (481, 121), (1, 1), (9, 3)])
def test_latent_frames(frames, latent):
    assert ModelConfig.latent_frames_for(frames) == latent


def test_defaults_for_absent_fields():
    cfg = parse_config("arguments:\n- channels: 64\n- rope: 1\n- sos: 1\n- head_dim: 32\n")
    assert cfg.patch_size == 4 and cfg.channel_size == 3 and cfg.seq_order == "R2L"
    assert cfg.layers == (8, 8, 8, 8) and cfg.top_channels == 64 and cfg.rope_seq_len == 8
    assert cfg.block_permutation(0) == "identity" and cfg.block_permutation(1) == "flip"


def test_goldens_config(goldens_dir):
    cfg = load_config(goldens_dir / "config.yaml")
    assert cfg.layers == (1, 1, 1, 1, 1, 2) and cfg.text_width == 16 and cfg.latent_frames == 3
    assert cfg.soft_clip == 4.0 and cfg.vid_size == "9:16" and cfg.unknown == ()


def test_round_trip_and_hash():
    cfg = load_config(CONFIG_7B)
    again = parse_config(cfg.to_yaml())
    assert again == cfg and again.hash() == cfg.hash()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(channels=1024).hash() != cfg.hash()


def test_guidance_values_keep_the_upstream_key():
    """The attribute says what it holds; the YAML, the stored config and its hash keep upstream's ``cfg``."""
    cfg = load_config(CONFIG_7B)
    assert cfg.guidance_values == (3.5,)
    assert cfg.to_dict()["cfg"] == [3.5] and "guidance_values" not in cfg.to_dict()
    assert "- cfg: '3.5'" in cfg.to_yaml() and "guidance_values" not in cfg.to_yaml()
    text = "arguments:\n- channels: 64\n- rope: 1\n- sos: 1\n- head_dim: 32\n- cfg: 2 4.5\n"
    assert parse_config(text).guidance_values == (2.0, 4.5)


@pytest.mark.parametrize("text,needle", [
    ("channels: 3", "arguments"),
    ("arguments: 5", "list"),
    ("arguments:\n- channels: abc\n", "channels"),
    ("arguments:\n- local_attn_window: 3\n- rope: 1\n- sos: 1\n- channels: 64\n- head_dim: 32\n", "shallow_block_local"),
    ("arguments:\n- temporal_causal: 2\n- rope: 1\n- sos: 1\n- channels: 64\n- head_dim: 32\n", "L2R"),
    ("arguments: [\n", "YAML"),
])
def test_bad_configs(text, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_config(text)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


# ------------------------------------------------------------ upstream's published configs (issue 21)
UPSTREAM = Path(__file__).resolve().parent / "data" / "upstream_configs"
PUBLISHED_7B = UPSTREAM / "starflow-v_7B_t2v_caus_480p.yaml"
PUBLISHED_3B = UPSTREAM / "starflow_3B_t2i_256x256.yaml"


def _inspect(*args):
    from click.testing import CliRunner

    from starflow_trt.cli import main

    return CliRunner().invoke(main, ["inspect", *map(str, args)])


def test_published_7b_parses_like_the_bundled_one():
    """The file as published names no head_dim / txt_dim and carries training keys: upstream's defaults
    apply, the model is the same as the bundled (explicit) 7B config's."""
    text = PUBLISHED_7B.read_text()
    assert "head_dim" not in text and "txt_dim" not in text
    published, bundled = load_config(PUBLISHED_7B), load_config(CONFIG_7B)
    assert published.head_dim == 64 and published.text_width == 2048 and published.txt_dim is None
    assert {"head_dim", "txt_dim", "use_bias", "norm_type"} <= set(published.absent)
    assert "channels" not in published.absent and published.guidance_values == (2.5,)
    assert "fsdp" in published.training_keys and "lr" in published.training_keys
    assert published.unknown_keys == ()
    model_fields = ("layers", "channels", "top_channels", "head_dim", "txt_size", "text_width", "rope_seq_len",
                    "token_channels", "latent_frames", "temporal_causal", "denoiser_window", "soft_clip")
    assert {f: getattr(published, f) for f in model_fields} == {f: getattr(bundled, f) for f in model_fields}


def test_published_7b_inspect_params_and_defaults_line():
    res = _inspect(PUBLISHED_7B)
    assert res.exit_code == 0, res.output
    assert "total (with denoiser) 6,890,096,528" in res.output
    lines = [line for line in res.output.splitlines() if line.startswith("upstream defaults applied")]
    assert len(lines) == 1
    assert "head_dim 64" in lines[0] and "txt_dim 2048 (from the width of text encoder google/flan-t5-xl)" in lines[0]
    assert "channels" not in lines[0].replace("channels/token", "")   # stated in the file
    assert "ignored training-only keys: no_flip, fsdp" in res.output and "kept unknown" not in res.output


def test_absent_rope_is_upstreams_default_and_refused():
    text = PUBLISHED_7B.read_text().replace("- rope: 1\n", "")
    with pytest.raises(ConfigError, match="rope is absent from the YAML: upstream's default 0 .* not supported here"):
        parse_config(text)
    with pytest.raises(ConfigError, match=r"^invalid config: rope: 0 \(learned"):   # stated: no "absent"
        parse_config(text + "- rope: 0\n")


def test_absent_seq_order_names_the_default():
    text = PUBLISHED_7B.read_text().replace("- seq_order: L2R\n", "")
    with pytest.raises(ConfigError, match="seq_order is absent from the YAML: upstream's default R2L applies"):
        parse_config(text)


def test_published_3b_image_config_is_one_line():
    with pytest.raises(ConfigError, match="image models are not supported"):
        load_config(PUBLISHED_3B)
    res = _inspect(PUBLISHED_3B)
    assert res.exit_code == 2 and res.output.count("\n") == 1 and "image models are not supported" in res.output


def test_training_keys_do_not_change_the_model():
    base = load_config(PUBLISHED_7B)
    noisy = parse_config(PUBLISHED_7B.read_text() + "- lr: 1e-3\n- my_typo: 3\n")
    assert noisy.unknown_keys == ("my_typo",) and noisy.training_keys.count("lr") == 2
    assert noisy.replace(unknown=base.unknown) == base


def test_txt_dim_resolution_order(tmp_path):
    """--text-encoder directory's d_model, else the checkpoint's proj_txt, else the named encoder."""
    import json

    import torch

    from starflow_trt.config import applied_defaults
    from starflow_trt.reference import infer_text_width

    cfg = load_config(PUBLISHED_7B)
    assert cfg.text_width == 2048   # the named encoder (flan-t5-xl)
    state = {"blocks.5.proj_txt.weight": torch.empty(4096, 1024)}
    from_ckpt = infer_text_width(cfg, state)
    assert from_ckpt.text_width == 1024 and "proj_txt" in from_ckpt.text_width_source
    t5 = tmp_path / "t5"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"d_model": 1024}))
    from_dir = infer_text_width(cfg, state, t5)
    assert from_dir.text_width == 1024 and "--text-encoder" in from_dir.text_width_source
    assert any(d.startswith("txt_dim 1024 (from --text-encoder") for d in applied_defaults(from_dir))
    assert infer_text_width(cfg, None, t5).text_width == 1024   # directory beats the named encoder
    (t5 / "config.json").write_text(json.dumps({"d_model": 512}))
    with pytest.raises(ConfigError, match="hidden size 512 .* takes 1024-wide text"):
        infer_text_width(cfg, state, t5)
    stated = parse_config(PUBLISHED_7B.read_text() + "- txt_dim: 300\n")
    assert infer_text_width(stated, state, t5).text_width == 300   # a YAML that states it wins
    # provenance is not part of the model: same hash as the explicit value
    assert from_ckpt.hash() == cfg.replace(txt_dim=1024).hash()
