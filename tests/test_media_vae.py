"""Wan2.2 VAE: upstream key layout, dims from tensors, latent statistics, causal streaming decode."""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("diffusers")

from starflow_trt.errors import CheckpointError, InputError  # noqa: E402
from starflow_trt.media import latents as LT, vae_graphs as VG, vae_load as VL, vae_stream as VS  # noqa: E402
from starflow_trt.media.tiny import make_vae  # noqa: E402

from . import media_oracles as oracles  # noqa: E402




@pytest.fixture(scope="module")
def vae():
    return make_vae(seed=0)


# ---- upstream layout, written independently of the loader: Wan's module tree names ----

_RES = {"norm1.gamma": "residual.0.gamma", "conv1.weight": "residual.2.weight", "conv1.bias": "residual.2.bias",
        "norm2.gamma": "residual.3.gamma", "conv2.weight": "residual.6.weight", "conv2.bias": "residual.6.bias",
        "conv_shortcut.weight": "shortcut.weight", "conv_shortcut.bias": "shortcut.bias"}


def to_upstream_key(key: str, num_res_blocks: int) -> str:
    """diffusers key → Wan's: stages nest their residual blocks and the resample in one Sequential."""
    rules = [
        (r"^quant_conv\.(.*)$", r"conv1.\1"),
        (r"^post_quant_conv\.(.*)$", r"conv2.\1"),
        (r"^(encoder|decoder)\.conv_in\.(.*)$", r"\1.conv1.\2"),
        (r"^(encoder|decoder)\.norm_out\.gamma$", r"\1.head.0.gamma"),
        (r"^(encoder|decoder)\.conv_out\.(.*)$", r"\1.head.2.\2"),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(.*)$", r"\1.middle.1.\2"),
    ]
    for pattern, repl in rules:
        if re.match(pattern, key):
            return re.sub(pattern, repl, key)
    m = re.match(r"^(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.*)$", key)
    if m:
        return f"{m[1]}.middle.{2 * int(m[2])}.{_RES[m[3]]}"
    m = re.match(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", key)
    if m:
        return f"encoder.downsamples.{m[1]}.downsamples.{m[2]}.{_RES[m[3]]}"
    m = re.match(r"^encoder\.down_blocks\.(\d+)\.downsampler\.(.*)$", key)
    if m:  # the resample follows the num_res_blocks residual blocks
        return f"encoder.downsamples.{m[1]}.downsamples.{num_res_blocks}.{m[2]}"
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)$", key)
    if m:
        return f"decoder.upsamples.{m[1]}.upsamples.{m[2]}.{_RES[m[3]]}"
    m = re.match(r"^decoder\.up_blocks\.(\d+)\.upsampler\.(.*)$", key)
    if m:  # decoder stages have num_res_blocks + 1 residual blocks
        return f"decoder.upsamples.{m[1]}.upsamples.{num_res_blocks + 1}.{m[2]}"
    raise AssertionError(f"no upstream name for {key}")


@pytest.mark.parametrize("upstream, ours", [
    ("conv1.weight", "quant_conv.weight"),
    ("conv2.bias", "post_quant_conv.bias"),
    ("encoder.conv1.weight", "encoder.conv_in.weight"),
    ("decoder.head.0.gamma", "decoder.norm_out.gamma"),
    ("decoder.head.2.bias", "decoder.conv_out.bias"),
    ("encoder.middle.0.residual.3.gamma", "encoder.mid_block.resnets.0.norm2.gamma"),
    ("decoder.middle.2.residual.6.weight", "decoder.mid_block.resnets.1.conv2.weight"),
    ("encoder.middle.1.to_qkv.weight", "encoder.mid_block.attentions.0.to_qkv.weight"),
    ("encoder.downsamples.0.downsamples.1.residual.2.bias", "encoder.down_blocks.0.resnets.1.conv1.bias"),
    ("encoder.downsamples.1.downsamples.0.shortcut.weight", "encoder.down_blocks.1.resnets.0.conv_shortcut.weight"),
    ("encoder.downsamples.1.downsamples.2.resample.1.weight", "encoder.down_blocks.1.downsampler.resample.1.weight"),
    ("encoder.downsamples.2.downsamples.2.time_conv.bias", "encoder.down_blocks.2.downsampler.time_conv.bias"),
    ("decoder.upsamples.0.upsamples.3.time_conv.weight", "decoder.up_blocks.0.upsampler.time_conv.weight"),
    ("decoder.upsamples.2.upsamples.3.resample.1.bias", "decoder.up_blocks.2.upsampler.resample.1.bias"),
    ("decoder.upsamples.3.upsamples.2.residual.0.gamma", "decoder.up_blocks.3.resnets.2.norm1.gamma"),
])
def test_rename_known_wan22_keys(upstream, ours):
    assert VL.rename_upstream_key(upstream) == ours


@pytest.mark.parametrize("bad", ["decoder.foo.weight", "model.conv1.weight", "encoder.middle.0.residual.9.weight"])
def test_rename_rejects_unknown_keys(bad):
    with pytest.raises(CheckpointError, match="unexpected key"):
        VL.rename_upstream_key(bad)


def test_load_upstream_pth_infers_dims_and_matches(vae, tmp_path):
    state = vae.state_dict()
    upstream = {to_upstream_key(k, vae.config.num_res_blocks): v.clone() for k, v in state.items()}
    assert "encoder.conv1.weight" in upstream and len(upstream) == len(state)
    torch.save(upstream, tmp_path / "Wan2.2_VAE.pth")
    loaded = VL.load_vae(tmp_path / "Wan2.2_VAE.pth")
    for key in ("base_dim", "decoder_base_dim", "z_dim", "num_res_blocks", "temperal_downsample", "is_residual",
                "in_channels", "out_channels", "patch_size", "scale_factor_spatial", "scale_factor_temporal"):
        assert loaded.config[key] == vae.config[key], key
    ours = loaded.state_dict()
    assert ours.keys() == state.keys() and all(torch.equal(ours[k], state[k]) for k in state)


def test_infer_full_wan22_config_from_tensor_shapes():
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        full = AutoencoderKLWan(**VL.WAN22_VAE_CONFIG)
    cfg = VL.infer_vae_config(full.state_dict())
    expected = {k: v for k, v in VL.WAN22_VAE_CONFIG.items()}
    assert cfg == expected


def test_load_errors_name_the_problem(vae, tmp_path):
    bad = dict(vae.state_dict())
    bad["decoder.conv_out.weight"] = torch.zeros(12, 5, 3, 3, 3)  # wrong input width
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="does not match the inferred"):
        VL.load_vae(tmp_path / "bad.pth")
    wan21 = {k: v for k, v in vae.state_dict().items() if ".resnets." not in k or "down_blocks" not in k}
    torch.save(wan21, tmp_path / "wan21.pth")
    with pytest.raises(CheckpointError, match="Wan2.1"):
        VL.load_vae(tmp_path / "wan21.pth")
    with pytest.raises(CheckpointError, match="not a diffusers VAE directory"):
        VL.load_vae(tmp_path)


def test_load_diffusers_directory_and_pipeline_subfolder(vae, tmp_path):
    vae.save_pretrained(tmp_path / "pipe" / "vae")
    for path in (tmp_path / "pipe" / "vae", tmp_path / "pipe"):
        loaded = VL.load_vae(path)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), vae.state_dict().values()))


def test_wan22_statistics_recorded():
    assert len(VL.WAN22_LATENTS_MEAN) == len(VL.WAN22_LATENTS_STD) == 48
    assert (VL.WAN22_LATENTS_MEAN[0], VL.WAN22_LATENTS_MEAN[-1]) == (-0.2289, -0.0667)
    assert (VL.WAN22_LATENTS_STD[0], VL.WAN22_LATENTS_STD[-1]) == (0.4765, 0.7744)
    assert min(VL.WAN22_LATENTS_STD) > 0
    norm = LT.LatentNorm(temporal_scale=0.6)
    assert LT.LatentNorm.from_dict(norm.to_dict()) == norm


def test_temporal_scale_touches_frames_after_the_first_only():
    g = torch.Generator().manual_seed(1)
    norm = LT.LatentNorm(mean=(0.1, -0.2, 0.3), std=(0.5, 2.0, 1.5), temporal_scale=0.6)
    raw = torch.randn(2, 4, 3, 2, 2, generator=g)
    m = torch.tensor([0.1, -0.2, 0.3]).view(1, 1, 3, 1, 1)
    inv = 1.0 / torch.tensor([0.5, 2.0, 1.5]).view(1, 1, 3, 1, 1)
    expected = (raw - m) * inv
    z = norm.latents_from_moments(raw, torch.zeros_like(raw), sample=False)
    assert torch.equal(z[:, :1], expected[:, :1])  # frame 0 untouched
    torch.testing.assert_close(z[:, 1:], expected[:, 1:] * 0.6, rtol=0, atol=0)
    # a later chunk (start=1) has every frame scaled; inverse undoes both steps
    torch.testing.assert_close(norm.scale_time(expected[:, 1:], start=1), expected[:, 1:] * 0.6, rtol=0, atol=0)
    torch.testing.assert_close(norm.to_vae(z), raw, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(norm.to_vae(z[:, 2:], start=2), raw[:, 2:], rtol=1e-6, atol=1e-6)
    with pytest.raises(InputError, match="latents must be"):
        norm.normalize_mean(torch.zeros(1, 1, 4, 2, 2))


def test_latent_draw_uses_raw_logvar_clamped():
    norm = LT.LatentNorm(mean=(0.0, 1.0), std=(2.0, 4.0), temporal_scale=0.6)
    mean = torch.ones(1, 2, 2, 1, 1)
    logvar = torch.tensor([-1.0, 50.0]).view(1, 1, 2, 1, 1).expand(1, 2, 2, 1, 1)
    z = norm.latents_from_moments(mean, logvar, sample=True, generator=torch.Generator().manual_seed(3))
    eps = torch.randn(1, 2, 2, 1, 1, generator=torch.Generator().manual_seed(3))
    std = torch.exp(0.5 * torch.tensor([-1.0, 20.0])).view(1, 1, 2, 1, 1)  # logvar clamped to 20, not normalised
    expected = (mean - torch.tensor([0.0, 1.0]).view(1, 1, 2, 1, 1)) * (1 / torch.tensor([2.0, 4.0]).view(1, 1, 2, 1, 1))
    expected = expected + std * eps
    expected[:, 1:] *= 0.6
    torch.testing.assert_close(z, expected, rtol=1e-6, atol=0)
    noisy = LT.add_noise(z, 0.5, torch.Generator().manual_seed(4))
    eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(4))
    assert torch.equal(noisy, z + 0.5 * eps)
    # i2v context: sample eps first, then the noise, from one generator
    g = torch.Generator().manual_seed(9)
    ctx = LT.context_latents(mean, logvar, norm, 0.5, g)
    g = torch.Generator().manual_seed(9)
    z = norm.latents_from_moments(mean, logvar, sample=True, generator=g)
    assert torch.equal(ctx, z + 0.5 * torch.randn(z.shape, generator=g))


def test_whole_clip_oracle_is_diffusers_decode_without_clamp(vae):
    z = torch.randn(1, 3, vae.config.z_dim, 2, 3, generator=torch.Generator().manual_seed(0)) * 3
    ours = oracles.decode_whole(vae, z)
    assert ours.shape == (1, 1 + 4 * 2, 3, 32, 48)
    assert ours.abs().max() > 1  # unclamped: the test would not see a clamp otherwise
    with torch.no_grad():
        ref = vae.decode(z.permute(0, 2, 1, 3, 4)).sample.permute(0, 2, 1, 3, 4)
    assert torch.equal(ours.clamp(-1, 1), ref)


@pytest.mark.parametrize("chunks", [None, [2, 1], [1, 2], [3]])
def test_first_plus_steps_equal_whole_clip_any_chunk_plan(vae, chunks):
    z = torch.randn(2, 4, vae.config.z_dim, 2, 3, generator=torch.Generator().manual_seed(1)) * 2
    plan = VG.probe_cache_plan(vae, "decoder")
    seen = []
    with torch.no_grad():
        out = VS.decode_streaming(VG.VaeDecodeFirst(vae, plan), VG.VaeDecodeStep(vae, plan), z, chunks,
                                 on_frames=lambda f: seen.append(f.shape[1]))
    ref = oracles.decode_whole(vae, z)
    assert out.shape == ref.shape == (2, 13, 3, 32, 48)
    assert seen == [1] + [4 * c for c in (chunks or [1, 1, 1])]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def test_cache_plan_shapes_are_steady(vae):
    plan = VG.probe_cache_plan(vae, "decoder")
    z = torch.randn(1, 3, vae.config.z_dim, 2, 3)
    with torch.no_grad():
        _, *caches = VG.VaeDecodeFirst(vae, plan)(z[:, :1])
        assert [tuple(c.shape) for c in caches] == plan.shapes(1, 2, 3)
        _, *caches = VG.VaeDecodeStep(vae, plan)(z[:, 1:], *caches)  # 2 frames at once
        assert [tuple(c.shape) for c in caches] == plan.shapes(1, 2, 3)
    assert {e.frames for e in plan.entries} == {2}
    assert sorted({e.scale for e in plan.entries}) == [1, 2, 4, 8]
    assert VG.CachePlan.from_dict(plan.to_dict()) == plan
    with pytest.raises(InputError, match="chunks"):
        VS.decode_streaming(VG.VaeDecodeFirst(vae, plan), VG.VaeDecodeStep(vae, plan), z, [1])


def test_encoder_first_step_and_image_encode_match_diffusers(vae):
    x = torch.rand(2, 9, 3, 32, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mean, logvar = oracles.encode_whole(vae, x)
    assert mean.shape == (2, 3, vae.config.z_dim, 2, 3)
    plan = VG.probe_cache_plan(vae, "encoder")
    with torch.no_grad():
        m0, lv0, *caches = VG.VaeEncodeFirst(vae, plan)(x[:, :1])
        m1, lv1, *caches = VG.VaeEncodeStep(vae, plan)(x[:, 1:5], *caches)
        m2, lv2, *_ = VG.VaeEncodeStep(vae, plan)(x[:, 5:9], *caches)
        whole = VG.VaeEncode(vae)(x)
        image = VG.VaeEncode(vae)(x[:, :1])
    tol = dict(rtol=0, atol=1e-5 * mean.abs().max().item())
    torch.testing.assert_close(torch.cat([m0, m1, m2], 1), mean, **tol)
    torch.testing.assert_close(torch.cat([lv0, lv1, lv2], 1).clamp(-30, 20), logvar, **tol)
    torch.testing.assert_close(whole[0], mean, **tol)
    torch.testing.assert_close(image[0], mean[:, :1], **tol)  # the first frame is encoded on its own
    with pytest.raises(InputError, match="1 \\+ 4n frames"):
        VG.VaeEncode(vae)(x[:, :3])
