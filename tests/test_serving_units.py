"""Serving pieces that need no Ray: request validation and limits (one validator with the CLI), batch planning,
noise per seed, events, the clean stop (drain, stop requests, the supervisor's session cleanup)."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from starflow_trt.serving.batching import Ticket, batch_key, plan_groups
from starflow_trt.serving.frames import format_event, frame_event, png_bytes
from starflow_trt.serving.limits import RequestError, RequestLimits, decode_npy, encode_npy, parse_request
from starflow_trt.serving.summary import ModelSummary

MODEL = ModelSummary(directory="/x", precision="fp32", channels=3, height=16, width=16, max_frames=6, max_batch=8,
                     text_length=6, text_width=16, pixel_space=True, has_denoiser=True, window=None,
                     default_guidance=3.0, noise_std=0.15, prompt_encoder="toy", config_hash="h",
                     checkpoint_sha256="s", graphs=("deep_step",))
LATENT = ModelSummary(**{**MODEL.__dict__, "channels": 16, "pixel_space": False, "prompt_encoder": None})
#: a latent export with T5 and VAE graphs and three aspects (latent sizes; frames 16x larger)
MEDIA = ModelSummary(**{**LATENT.__dict__, "height": 3, "width": 5, "prompt_encoder": "text_encoder", "vae": True,
                        "vae_encoder": True, "pixel_scale": 16,
                        "aspects": (("16:9", 3, 5), ("9:16", 5, 3), ("1:1", 4, 4))})
LIMITS = RequestLimits(max_timeout_s=60)


def parse(body, model=MODEL, limits=LIMITS):
    return parse_request(json.dumps(body).encode() if not isinstance(body, bytes) else body, model, limits)


def bad(body, field, model=MODEL, limits=LIMITS) -> str:
    with pytest.raises(RequestError) as info:
        parse(body, model, limits)
    assert info.value.field == field, str(info.value)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"{field}: ")
    return msg


def test_contract_request_defaults():
    req = parse({"prompt": "a red square moving right", "seed": 0, "guidance": 3.0})
    assert (req.seed, req.guidance, req.frames, req.sampler, req.output, req.stream) == (0, 3.0, 6, "jacobi", "png",
                                                                                         "ndjson")
    assert req.jacobi.threshold == 1e-3 and not req.exact_batching
    assert req.timeout_s == 60 and req.generation.y is None and req.generation.fps == 16
    assert parse({"prompt": "a"}).guidance == 3.0                   # the checkpoint's cfg with a prompt
    assert parse({"prompt": "a", "sampler": "autoregressive"}).exact_batching
    assert parse({"prompt": "a", "jacobi": {"threshold": 0}}).exact_batching
    seeds = {parse({"prompt": "a"}).seed for _ in range(4)}
    assert len(seeds) > 1                                           # no seed: a fresh one each time


def test_embeddings_round_trip_without_pickle():
    y = np.random.default_rng(0).standard_normal((6, 16)).astype(np.float32)
    req = parse({"text_embeddings": encode_npy(y), "guidance": 0})
    np.testing.assert_array_equal(req.generation.y, y[None])
    req = parse({"text_embeddings": encode_npy(y[None].astype(np.float16)),
                 "negative_embeddings": encode_npy(np.zeros((6, 16))), "guidance": 2.0})
    g = req.generation
    assert g.y.shape == (1, 6, 16) and g.y.dtype == np.float32 and g.y_uncond.shape == (1, 6, 16)
    np.testing.assert_array_equal(decode_npy(encode_npy(y)), y)
    # an object array is a pickle inside .npy: refused, never unpickled
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    msg = bad({"text_embeddings": base64.b64encode(buf.getvalue()).decode(), "guidance": 0}, "text_embeddings")
    assert "not a .npy array" in msg


@pytest.mark.parametrize("body, field", [
    ({"prompt": "a", "frames": 7, "sampler": "autoregressive"}, "sampler"),   # beyond max_frames: Jacobi window
    ({"prompt": "a", "frames": 1 << 17}, "frames"),
    ({"prompt": "a", "frames": 0}, "frames"),
    ({"prompt": "a", "frames": 2.5}, "frames"),
    ({"prompt": "a", "seed": -1}, "seed"),
    ({"prompt": "a", "seed": True}, "seed"),
    ({"prompt": "a", "guidance": -1}, "guidance"),
    ({"prompt": "a", "guidance": 1e9}, "guidance"),
    ({"prompt": "a", "colour": "red"}, "colour"),
    ({"prompt": "a", "aspect": "16:9"}, "aspect"),
    ({"prompt": "a", "sampler": "ddim"}, "sampler"),
    ({"prompt": "a", "jacobi": {"block_size": 0}}, "jacobi.block_size"),
    ({"prompt": "a", "jacobi": {"threshold": 2}}, "jacobi.threshold"),
    ({"prompt": "a", "jacobi": {"colour": 3}}, "jacobi.colour"),
    ({"prompt": "a", "jacobi": {"window": 3, "context_length": 3}}, "jacobi.context_length"),
    ({"prompt": "a", "negative_prompt": 2}, "negative_prompt"),
    ({"prompt": "a", "aspect": 3}, "aspect"),
    ({"prompt": "a", "sampler": "autoregressive", "jacobi": {}}, "jacobi"),
    ({"prompt": "a", "output": "gif"}, "output"),
    ({"prompt": "a", "timeout_s": 0}, "timeout_s"),
    ({"prompt": "a", "timeout_s": 61}, "timeout_s"),
    ({"prompt": "a", "stream": "ws"}, "stream"),
    ({"prompt": 3}, "prompt"),
    ({"prompt": "a" * 2001}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "a", "text_embeddings": "AAAA"}, "prompt"),
    ({"text_embeddings": "not base64!"}, "text_embeddings"),
    ({"text_embeddings": base64.b64encode(b"hello").decode()}, "text_embeddings"),
    ({"prompt": "a", "image": base64.b64encode(b"GIF89a....").decode()}, "image"),
    ({"prompt": "a", "mp4": "yes"}, "mp4"),
])
def test_bad_fields_are_named(body, field):
    bad(body, field)


def test_shapes_sizes_and_model_capabilities():
    assert "[B, 6, 16]" in bad({"text_embeddings": encode_npy(np.zeros((5, 16)))}, "text_embeddings")
    assert "NaN" in bad({"text_embeddings": encode_npy(np.full((6, 16), np.nan)), "guidance": 0}, "text_embeddings")
    bad({"text_embeddings": encode_npy(np.zeros((6, 16))), "guidance": 1.0}, "negative_embeddings")
    bad(b"[1, 2]", "body")
    bad(b"{not json", "body")
    assert "exceed" in bad({"prompt": "a"}, "body", limits=RequestLimits(max_body_bytes=10))
    # a latent-space export without a text encoder: embeddings only, latents only
    bad({"prompt": "a"}, "prompt", model=LATENT)
    bad({"text_embeddings": encode_npy(np.zeros((6, 16))), "guidance": 0, "output": "png"}, "output", model=LATENT)
    bad({"text_embeddings": encode_npy(np.zeros((6, 16))), "guidance": 0, "mp4": True}, "mp4", model=LATENT)
    ok = parse({"text_embeddings": encode_npy(np.zeros((6, 16))), "guidance": 0}, model=LATENT)
    assert ok.output == "latents"
    ctx = encode_npy(np.zeros((6, 3, 16, 16)))
    bad({"prompt": "a", "context_latents": ctx}, "frames")          # 6 context frames leave none to generate
    assert parse({"prompt": "a", "context_latents": encode_npy(np.zeros((2, 3, 16, 16)))}).context_frames == 2


def test_image_is_decoded_and_bounded():
    from starflow_trt.media.io import encode_png

    img = np.zeros((20, 40, 3), np.uint8)
    img[:, :, 0] = 255                                     # pure red (RGB)
    png = encode_png(img)
    req = parse({"prompt": "a", "image": base64.b64encode(png).decode()})
    np.testing.assert_array_equal(req.generation.image, img)  # fitted by media.io when the Pipeline runs it
    assert req.context_frames == 1
    big = bytearray(png)
    big[16:24] = (100000).to_bytes(4, "big") * 2           # header claims 100000 x 100000 pixels
    assert "pixels" in bad({"prompt": "a", "image": base64.b64encode(bytes(big)).decode()}, "image")
    assert "VAE encoder" in bad({"text_embeddings": encode_npy(np.zeros((6, 16))), "image": base64.b64encode(png).decode()},
                                "image", model=LATENT)


def test_exported_aspects_by_name_and_pixel_frames():
    req = parse({"prompt": "a", "aspect": "9:16", "seed": 3}, model=MEDIA)
    assert (req.aspect, req.seed, req.generation.seed, req.output) == ("9:16", 3, (3,), "png")
    assert MEDIA.aspect == "16:9" and MEDIA.frame_size("9:16") == (80, 48) and MEDIA.latent_size("1:1") == (4, 4)
    assert parse({"prompt": "a"}, model=MEDIA).aspect == "16:9"
    msg = bad({"prompt": "a", "aspect": "4:3"}, "aspect", model=MEDIA)
    assert "16:9 (80x48), 9:16 (48x80), 1:1 (64x64)" in msg and "--aspects 4:3" in msg
    assert parse({"prompt": "a", "mp4": True}, model=MEDIA).mp4   # VAE graphs: mp4 and PNG frames
    # context latents pick their aspect by size; a size no aspect has is refused
    ctx = parse({"text_embeddings": encode_npy(np.zeros((6, 16))), "context_latents": encode_npy(np.zeros((1, 16, 5, 3)))},
                model=MEDIA)
    assert ctx.aspect == "9:16" and ctx.output == "png"
    bad({"text_embeddings": encode_npy(np.zeros((6, 16))), "aspect": "1:1",
         "context_latents": encode_npy(np.zeros((1, 16, 5, 3)))}, "context_latents", model=MEDIA)
    # the toy's single grid is named by its ratio
    assert MODEL.aspect_names == ("1:1",) and parse({"prompt": "a", "aspect": "1:1"}).aspect == "1:1"
    back = ModelSummary.from_dict(json.loads(json.dumps(MEDIA.to_dict())))
    assert back == MEDIA and MEDIA.to_dict()["aspect"] == "16:9"


def _ticket(body: dict) -> Ticket:
    return Ticket(parse({"prompt": "a", **body}))


def test_groups_match_options_and_respect_max_batch():
    ar = [_ticket({"sampler": "autoregressive", "frames": 2}) for _ in range(5)]
    other = _ticket({"sampler": "autoregressive", "frames": 3})
    jac = [_ticket({"frames": 2}) for _ in range(2)]         # thresholded Jacobi: alone
    exact = [_ticket({"frames": 2, "jacobi": {"threshold": 0}}) for _ in range(2)]
    gone = _ticket({"sampler": "autoregressive", "frames": 2})
    gone.gone = True
    tickets = [ar[0], other, ar[1], jac[0], jac[1], gone, ar[2], exact[0], ar[3], exact[1], ar[4]]
    groups = plan_groups(tickets, max_batch=3)
    assert groups == [[ar[0], ar[1], ar[2]], [other], [jac[0]], [jac[1]], [exact[0], exact[1]], [ar[3], ar[4]]]
    assert plan_groups(jac, max_batch=8, approximate=True) == [jac]
    assert batch_key(ar[0].request) == batch_key(ar[1].request) != batch_key(other.request)
    g15 = _ticket({"sampler": "autoregressive", "frames": 2, "guidance": 1.5})
    assert batch_key(g15.request) != batch_key(ar[0].request)


def test_per_row_seeds_draw_what_a_one_row_call_draws():
    from starflow_trt.runtime.pipeline import draw

    shape = (4, 3, 16, 16)
    rows = draw((1234, 7), 2, shape)
    for row, seed in zip(rows, (1234, 7)):
        assert torch.equal(row[None], draw(seed, 1, shape))
    assert torch.equal(draw(5, 2, shape), torch.randn(2, *shape, generator=torch.Generator().manual_seed(5)))


def test_events_and_lines():
    frame = torch.linspace(-1, 1, 3 * 4 * 4).reshape(3, 4, 4)
    ev = frame_event(2, frame, "latents")
    assert ev["type"] == "frame" and ev["index"] == 2
    np.testing.assert_array_equal(decode_npy(ev["latents"]), frame.numpy())
    from starflow_trt.media.io import decode_image

    png = decode_image(png_bytes(frame))
    want = ((frame.clamp(-1, 1) + 1) / 2 * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()   # rounded, as generate
    np.testing.assert_array_equal(png, want)
    line = format_event({"type": "done", "stats": {"a": 1}})
    assert line.endswith(b"\n") and line.count(b"\n") == 1 and json.loads(line) == {"type": "done", "stats": {"a": 1}}
    assert format_event({"type": "x"}, "sse") == b'data: {"type":"x"}\n\n'


def test_serve_config_round_trip_and_checks():
    from starflow_trt.errors import InputError
    from starflow_trt.serving.app import ServeConfig

    cfg = ServeConfig(replicas=2, max_replicas=4, gpus_per_replica=1, timeout_s=30, limits=RequestLimits(max_fps=30))
    back = ServeConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.request_limits().max_timeout_s == 30
    for bad_cfg in ({"replicas": 0}, {"replicas": 3, "max_replicas": 2}, {"timeout_s": 0}, {"max_batch": 0}):
        with pytest.raises(InputError):
            ServeConfig(**bad_cfg)


def test_client_rejects_non_http_urls():
    from starflow_trt.errors import StarflowError
    from starflow_trt.serving.client import VideoClient

    with pytest.raises(StarflowError):
        VideoClient("https://example.org")
    c = VideoClient("http://127.0.0.1:9/prefix/")
    assert (c.host, c.port, c.prefix) == ("127.0.0.1", 9, "/prefix")


def test_serve_command_refuses_a_directory_without_manifest(tmp_path):
    from click.testing import CliRunner

    from starflow_trt.cli import main

    result = CliRunner().invoke(main, ["serve", str(tmp_path)])
    assert result.exit_code == 2
    assert "error:" in result.output and "manifest.json" in result.output


def test_app_builder_names_unknown_args():
    from starflow_trt.errors import InputError
    from starflow_trt.serving.app import app_builder

    with pytest.raises(InputError, match="directory"):
        app_builder({"replicas": 2})
    with pytest.raises(InputError, match="replica_count"):
        app_builder({"directory": "/x", "replica_count": 2})


# ---------------------------------------------------------------------------------------------- clean stop
async def _request(drain, events: int, every_s: float) -> str:
    """A request as the ingress runs it: counted by the drain, waiting for its events through it."""
    from starflow_trt.serving.drain import Cutoff

    drain.enter()
    try:
        for _ in range(events):
            await drain.next(asyncio.sleep(every_s), timeout_s=60)
        return "done"
    except Cutoff as exc:
        return str(exc)
    finally:
        drain.leave()


def test_drain_lets_running_requests_finish_and_ends_the_rest_at_the_timeout():
    from starflow_trt.serving.drain import Drain

    async def scenario():
        drain = Drain()
        short, long = (asyncio.create_task(_request(drain, n, 0.05)) for n in (4, 1000))
        await asyncio.sleep(0.01)
        t0 = time.monotonic()
        counts = await drain.run(0.5)
        return counts, time.monotonic() - t0, await short, await long, drain.refusing

    counts, took, short, long, refusing = asyncio.run(scenario())
    assert counts == {"running": 2, "ended": 1, "left": 0} and refusing
    assert short == "done" and "drain timeout of 0.5 s" in long and "\n" not in long
    assert 0.5 <= took < 2


def test_a_second_drain_ends_running_requests_at_once():
    from starflow_trt.serving.drain import Drain

    async def scenario():
        drain = Drain()
        request = asyncio.create_task(_request(drain, 1000, 0.05))
        await asyncio.sleep(0.01)
        first = asyncio.create_task(drain.run(60))
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        await drain.run(0)
        return await first, time.monotonic() - t0, await request

    counts, took, request = asyncio.run(scenario())
    assert counts["ended"] == 1 and counts["left"] == 0 and took < 1 and "second stop request" in request


def test_drain_next_passes_results_timeouts_and_the_end_of_a_stream():
    from starflow_trt.serving.drain import Drain

    async def events():
        yield 1

    async def scenario():
        drain, stream = Drain(), events()
        got = await drain.next(stream.__anext__(), 1)
        with pytest.raises(StopAsyncIteration):
            await drain.next(stream.__anext__(), 1)
        with pytest.raises(asyncio.TimeoutError):
            await drain.next(asyncio.sleep(10), 0.05)
        return got, await drain.run(0)

    assert asyncio.run(scenario()) == (1, {"running": 0, "ended": 0, "left": 0})


def test_stop_requests_record_signals_and_put_the_old_handlers_back():
    from starflow_trt.serving.stops import StopRequests

    before = signal.getsignal(signal.SIGTERM)
    stops = StopRequests()
    stops.catch_signals()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        stops.wait(1)
        assert stops.reasons == ["SIGTERM", "SIGINT"]
    finally:
        stops.release_signals()
    assert signal.getsignal(signal.SIGTERM) is before


def test_end_session_leaves_no_process_of_the_session(monkeypatch):
    psutil = pytest.importorskip("psutil")
    from starflow_trt.serving import supervisor

    monkeypatch.setattr(supervisor, "KILL_GRACE_S", 0.5)
    code = "import subprocess, time; subprocess.Popen(['sleep', '60']); time.sleep(60)"   # a child and a grandchild
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    try:
        end = time.monotonic() + 30
        while len(supervisor.session_processes(proc.pid)) < 2 and time.monotonic() < end:
            time.sleep(0.05)
        members = {p.pid for p in supervisor.session_processes(proc.pid)}
        assert len(members) == 2 and proc.pid in members
        assert set(supervisor.end_session(proc)) == members
        assert not supervisor.session_processes(proc.pid) and proc.poll() is not None
    finally:
        for p in supervisor.session_processes(proc.pid):
            with contextlib.suppress(psutil.Error):
                p.kill()
        proc.wait(10)


def test_serve_help_documents_the_stop_and_a_bad_drain_timeout_is_one_line_exit_2(tmp_path):
    from click.testing import CliRunner

    from starflow_trt.cli import main

    text = " ".join(CliRunner().invoke(main, ["serve", "--help"]).output.split())
    assert "--drain-timeout" in text and "SIGTERM or SIGINT" in text and "[default: 30" in text
    result = CliRunner().invoke(main, ["serve", str(tmp_path), "--drain-timeout", "-1"])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and "--drain-timeout" in result.output
