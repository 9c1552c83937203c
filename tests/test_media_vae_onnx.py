"""The VAE graphs on ONNX Runtime: chained first + step == PyTorch whole-clip decode, encoder graphs.

The graphs are the suite's media export's (``media_export``: the tiny Wan VAE's five graphs with dynamic
batch / h / w, exported through the graph registry), run at other sizes than their examples; only the
two-frame step graph, which no export holds, is exported here (static shapes, ~30 s on 2 cores).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("onnxruntime")

from starflow_trt.media import vae_graphs as VG, vae_stream as VS  # noqa: E402
from starflow_trt.media.graphs import vae_graphs  # noqa: E402

from . import media_oracles as oracles  # noqa: E402
from .onnx_helpers import export_graph, ort_run, rel_error  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(media_export, exports, tmp_path_factory):
    from starflow_trt.export.manifest import load_manifest

    vae = exports.vae()   # the model media_export's VAE graphs were traced from
    manifest = load_manifest(media_export)
    graphs = vae_graphs(vae, height=2, width=3, batch=2)
    paths = {name: manifest.graph(name).path for name in graphs}
    sessions = {name: ort_run(path) for name, path in paths.items()}
    step2 = vae_graphs(vae, height=2, width=3, batch=2, frames_per_step=2)["vae_decode_step"]
    step2.name = "vae_decode_step2"
    sessions["vae_decode_step2"] = ort_run(export_graph(step2, tmp_path_factory.mktemp("vae_graphs"), dynamic=False))
    return vae, graphs, sessions, paths


def test_graph_contract_names_and_symbolic_dims(setup):
    import onnx

    vae, graphs, _, paths = setup
    step = graphs["vae_decode_step"]
    plan = VG.CachePlan.from_dict(step.extra["cache_plan"])
    assert [t.name for t in step.inputs] == ["latents", *plan.input_names()]
    assert [t.name for t in step.outputs] == ["frames", *plan.output_names()]
    assert step.inputs[0].shape == ("batch", 1, vae.config.z_dim, "h", "w")
    assert step.inputs[-1].shape == ("batch", plan.entries[-1].channels, 2, "h_x8", "w_x8")
    model = onnx.load(str(paths["vae_decode_step"]), load_external_data=False)
    assert [i.name for i in model.graph.input] == [t.name for t in step.inputs]
    assert [o.name for o in model.graph.output] == [t.name for t in step.outputs]
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:3] == [1, vae.config.z_dim] and all(isinstance(d, str) for d in (dims[0], dims[3], dims[4]))


def test_chained_ort_decode_equals_pytorch_whole_clip(setup):
    vae, _, s, _ = setup
    # another batch and latent grid than the export examples: batch, h, w are dynamic
    z = torch.randn(1, 4, vae.config.z_dim, 3, 2, generator=torch.Generator().manual_seed(5)) * 2
    ref = oracles.decode_whole(vae, z)
    got = VS.decode_streaming(s["vae_decode_first"], s["vae_decode_step"], z)
    assert got.shape == ref.shape == (1, 13, 3, 48, 32)
    err = rel_error(got, ref)
    print(f"\nchained ORT first+step vs PyTorch whole clip: {err:.2e} relative")
    assert err <= 1e-5


def test_chunk_plans_with_a_two_frame_step_graph(setup):
    vae, _, s, _ = setup

    def step(latents, *caches):
        return (s["vae_decode_step"] if latents.shape[1] == 1 else s["vae_decode_step2"])(latents, *caches)

    z = torch.randn(2, 4, vae.config.z_dim, 2, 3, generator=torch.Generator().manual_seed(6))
    ref = oracles.decode_whole(vae, z)
    for chunks in ([2, 1], [1, 2], [1, 1, 1]):
        assert rel_error(VS.decode_streaming(s["vae_decode_first"], step, z, chunks), ref) <= 1e-5, chunks


def test_encoder_graphs_match_diffusers(setup):
    vae, _, s, _ = setup
    x = torch.rand(2, 9, 3, 32, 48, generator=torch.Generator().manual_seed(7)) * 2 - 1  # static: example size
    mean, logvar = oracles.encode_whole(vae, x)
    image_mean, image_logvar = s["vae_encode"](x[:, :1])
    assert rel_error(image_mean, mean[:, :1]) <= 1e-5
    assert rel_error(image_logvar.clamp(-30, 20), logvar[:, :1]) <= 1e-5
    m0, lv0, *caches = s["vae_encode_first"](x[:, :1])
    m1, lv1, *caches = s["vae_encode_step"](x[:, 1:5], *caches)
    m2, lv2, *_ = s["vae_encode_step"](x[:, 5:9], *caches)
    assert rel_error(torch.cat([m0, m1, m2], 1), mean) <= 1e-5
    assert rel_error(torch.cat([lv0, lv1, lv2], 1).clamp(-30, 20), logvar) <= 1e-5
