"""Checkpoint loading: formats, wrapper prefixes, and one clear error per kind of bad input."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from starflow_trt.checkpoint import (load_checkpoint, load_state_dict, save_state_dict, strip_wrapper_prefixes,
                                     validate_state_dict)
from starflow_trt.errors import CheckpointError, InputError
from starflow_trt.reference import load_reference


@pytest.fixture(scope="module")
def golden_sd(goldens_dir):
    return load_state_dict(goldens_dir / "model.pth")


def expected_shapes(golden_sd):
    return {k: tuple(v.shape) for k, v in golden_sd.items()}


def test_loads_goldens(golden_sd):
    assert len(golden_sd) == 234
    assert golden_sd["blocks.5.proj_txt.weight"].shape == (64, 16)


def test_safetensors_round_trip(golden_sd, tmp_path):
    path = save_state_dict(golden_sd, tmp_path / "m.safetensors")
    again = load_state_dict(path)
    assert set(again) == set(golden_sd)
    assert all(torch.equal(again[k], golden_sd[k]) for k in golden_sd)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefix_is_stripped(golden_sd, goldens_dir, tmp_path, prefix):
    wrapped = {prefix + k: v for k, v in golden_sd.items()}
    path = save_state_dict(wrapped, tmp_path / "wrapped.pth")
    state, notes = strip_wrapper_prefixes(load_state_dict(path))
    assert set(state) == set(golden_sd) and notes and "stripped prefix" in notes[0]
    model = load_reference(goldens_dir / "config.yaml", path)  # loads through the same path
    assert torch.equal(model.top.proj_txt.weight, golden_sd["blocks.5.proj_txt.weight"])


def test_deprecated_buffers_optional(golden_sd, goldens_dir, tmp_path):
    lean = {k: v for k, v in golden_sd.items()
            if not (k == "var" or k.endswith("attn_mask") or k.startswith("feat_rope"))}
    assert len(lean) < len(golden_sd)
    path = save_state_dict(lean, tmp_path / "lean.pth")
    model = load_reference(goldens_dir / "config.yaml", path)
    assert model.blocks[0].attn_mask.shape == (20, 20)


def test_truncated_file(goldens_dir, tmp_path):
    data = (goldens_dir / "model.pth").read_bytes()
    path = tmp_path / "half.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_state_dict(path)


@pytest.mark.parametrize("seed", range(8))
def test_random_bytes(tmp_path, seed):
    import random

    path = tmp_path / "noise.pth"
    path.write_bytes(random.Random(seed).randbytes(4096))
    with pytest.raises(CheckpointError, match="not a torch|truncated|refused"):
        load_state_dict(path)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_state_dict(empty)
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "missing.pth")
    bad_st = tmp_path / "x.safetensors"
    bad_st.write_bytes(os.urandom(64))
    with pytest.raises(CheckpointError, match="safetensors"):
        load_state_dict(bad_st)


class _Exploit:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.target}",))


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_malicious_pickle_is_refused(tmp_path, writer):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pth"
    payload = {"weight": torch.zeros(2), "x": _Exploit(target)}
    if writer == "torch":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError, match="refused|not a torch state_dict"):
        load_state_dict(path)
    assert not target.exists()


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="state_dict"):
        load_state_dict(path)
    nested = tmp_path / "nested.pth"
    torch.save({"model": {"a": torch.zeros(1)}}, nested)
    assert set(load_state_dict(nested)) == {"a"}


def test_all_mismatches_in_one_error(golden_sd):
    bad = dict(golden_sd)
    del bad["blocks.3.proj_in.weight"]
    bad["blocks.9.extra"] = torch.zeros(1)
    bad["blocks.5.proj_out.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointError) as err:
        validate_state_dict(bad, expected_shapes(golden_sd))
    msg = str(err.value)
    assert "blocks.3.proj_in.weight" in msg and "blocks.9.extra" in msg and "blocks.5.proj_out.bias" in msg
    assert "1 missing" in msg and "1 unexpected" in msg and "1 shape-mismatched" in msg
    assert "\n" not in msg


def test_config_checkpoint_mismatch(goldens_dir, tmp_path):
    cfg = (goldens_dir / "config.yaml").read_text().replace("top_block_channels: 64", "top_block_channels: 96")
    (tmp_path / "c.yaml").write_text(cfg)
    with pytest.raises(CheckpointError, match="shape-mismatched.*blocks.5"):
        load_reference(tmp_path / "c.yaml", goldens_dir / "model.pth")


def test_load_checkpoint_strips_then_validates(golden_sd, tmp_path):
    path = save_state_dict({"module." + k: v for k, v in golden_sd.items()}, tmp_path / "wrapped.pth")
    seen = []   # shapes may depend on the loaded state (txt_dim): the callable sees it prefix-stripped
    state, notes = load_checkpoint(path, lambda s: seen.append(set(s)) or expected_shapes(golden_sd))
    assert seen == [set(golden_sd)] and set(state) == set(golden_sd) and "stripped prefix" in notes[0]
    assert all(state[k].dtype == golden_sd[k].dtype for k in golden_sd)   # stored dtypes kept
    with pytest.raises(CheckpointError, match="1 shape-mismatched"):
        load_checkpoint(path, {**expected_shapes(golden_sd), "blocks.5.proj_out.bias": (7,)})


def test_wrong_model_inputs_named(ref32, cases):
    with pytest.raises(InputError, match="x must be"):
        ref32.encode(cases["x"][:, 0], cases["y"])
    with pytest.raises(InputError, match="y must be"):
        ref32.encode(cases["x"], cases["y"][:1])
