"""Upstream YAML parsing, defaults, derived geometry (spec §1)."""

from __future__ import annotations

from pathlib import Path

import pytest

from starflow_trt.config import ModelConfig, load_config, parse_config
from starflow_trt.errors import ConfigError

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
    geo = load_config(CONFIG_7B).frame_geometry(aspect)
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
