"""OpenAI videos API pieces that need no Ray: translation, sizes, seconds → frames, the job store, the API key."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from dataclasses import replace

import cv2
import numpy as np
import pytest

from starflow_trt.defaults import DEFAULT_FPS
from starflow_trt.serving import openai_api as oai
from starflow_trt.serving.auth import BearerAuth, authorized, needs_key
from starflow_trt.serving.config import ServeConfig
from starflow_trt.serving.job_runner import run_job, spritesheet
from starflow_trt.serving.jobs import ASSETS, JobStore, Retention
from starflow_trt.serving.limits import RequestError, RequestLimits, parse_request
from starflow_trt.serving.summary import ModelSummary

TOY = ModelSummary(directory="/x", precision="fp32", channels=3, height=16, width=16, max_frames=6, max_batch=8,
                   text_length=6, text_width=16, pixel_space=True, has_denoiser=True, window=None,
                   default_guidance=3.0, noise_std=0.15, prompt_encoder="toy", config_hash="h",
                   checkpoint_sha256="s", graphs=("deep_step",), fps=8)
WAN = replace(TOY, channels=48, height=44, width=80, max_frames=21, pixel_space=False, vae=True, fps=16,
              aspects=(("16:9", 44, 80), ("9:16", 80, 44)), pixel_scale=16)


def _png(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))[1].tobytes()


def _bad(data, field, model=TOY, image=None) -> str:
    with pytest.raises(RequestError) as info:
        oai.to_stream_request(data, image, model, "starflow")
    assert info.value.field == field, str(info.value)
    assert "\n" not in str(info.value)
    return str(info.value)


# ---------------------------------------------------------------------------------------------- routing
@pytest.mark.parametrize("accept,body,stream", [
    ("application/json", {"prompt": "p"}, False),            # the openai client
    ("*/*", {"prompt": "p"}, False),
    ("application/x-ndjson", {"prompt": "p"}, True),          # VideoClient, the page
    ("text/event-stream", {"prompt": "p"}, True),
    ("application/json", {"prompt": "p", "stream": "ndjson"}, True),
    ("*/*", {"prompt": "p", "aspect": "9:16"}, True),          # the streaming API's vocabulary (curl)
    ("", {"prompt": "p", "output": "latents"}, True),
    ("application/json", {"prompt": "p", "aspect": "9:16"}, False),   # the openai client: a 400 pointer
])
def test_a_post_streams_only_when_the_client_asks(accept, body, stream):
    assert oai.wants_stream(accept, body) is stream


def test_streaming_only_fields_in_a_job_point_to_the_streaming_path():
    for name in ("text_embeddings", "output", "aspect", "mp4"):
        msg = _bad({"prompt": "p", name: 1}, name)
        assert oai.STREAM_PATH in msg and "Accept: application/x-ndjson" in msg
    assert "allowed" in _bad({"prompt": "p", "colour": "red"}, "colour")


# ---------------------------------------------------------------------------------------------- translation
def test_openai_form_becomes_the_streaming_request_and_passes_its_validator():
    form = oai.form_fields([("prompt", "a red square moving right"), ("seconds", "0.5"), ("size", "16x16"),
                            ("seed", "7"), ("guidance", "2.5"), ("sampler", "jacobi"), ("denoise", "false"),
                            ("jacobi[block_size]", "4"), ("jacobi[threshold]", "0")])
    img = np.zeros((32, 48, 3), np.uint8)
    img[:, :24] = (255, 0, 0)
    d = oai.to_stream_request(form, _png(img), TOY, "starflow")
    assert d["frames"] == 4 and d["seed"] == 7 and d["guidance"] == 2.5 and d["denoise"] is False
    assert d["jacobi"] == {"block_size": 4, "threshold": 0} and d["output"] == "png" and d["mp4"] and d["fps"] == 8
    assert d["aspect"] == "1:1"                               # the one exported size, by its name
    req = parse_request(json.dumps(d).encode(), TOY, RequestLimits())
    assert (req.frames, req.seed, req.guidance, req.jacobi.block_size, req.mp4) == (4, 7, 2.5, 4, True)
    assert np.array_equal(req.generation.image, img)          # the PNG as sent (the Pipeline fits it)
    assert oai.seconds_of(req.frames, TOY) == "0.5" and oai.size_of(d, TOY) == "16x16"


def test_json_create_takes_a_data_url_input_reference():
    png = _png(np.full((16, 16, 3), 9, np.uint8))
    assert oai.image_from_json({"image_url": "data:image/png;base64," + base64.b64encode(png).decode()}) == png
    with pytest.raises(RequestError, match="remote URLs"):
        oai.image_from_json({"image_url": "https://example.com/a.png"})


def test_seconds_to_frames_at_the_exports_fps():
    assert oai.frames_for_seconds(0.75, 8, vae=False) == 6          # pixel space: one frame per frame
    assert oai.frames_for_seconds(0.01, 8, vae=False) == 1
    t = oai.frames_for_seconds(5, 16, vae=True)                      # 80 pixel frames → (80 - 1) // 4 + 1
    assert t == 20 and oai.pixel_frames(t, vae=True) == 77
    assert oai.seconds_of(21, WAN) == "5.0625" and oai.export_fps(replace(TOY, fps=None)) == DEFAULT_FPS == 16
    msg = _bad({"prompt": "p", "seconds": "4"}, "seconds")            # 32 frames > the toy's 6
    assert "at most 6 frames (0.75 s)" in msg
    _bad({"prompt": "p", "seconds": "-1"}, "seconds")
    _bad({"prompt": "p", "seconds": "1", "frames": 2}, "seconds")
    _bad({"prompt": "p", "seed": "x"}, "seed")


def test_size_maps_to_an_exported_aspect_or_lists_the_sizes():
    assert oai.export_sizes(TOY) == {"16x16": "1:1"}
    assert oai.export_sizes(WAN) == {"1280x704": "16:9", "704x1280": "9:16"}
    assert oai.to_stream_request({"prompt": "p", "size": "704x1280"}, None, WAN, "starflow")["aspect"] == "9:16"
    msg = _bad({"prompt": "p", "size": "720x1280"}, "size")
    assert "16x16" in msg
    assert "1280x704, 704x1280" in _bad({"prompt": "p", "size": "1x1"}, "size", WAN)
    _bad({"prompt": "p", "model": "sora-2"}, "model")
    _bad({"seconds": "1"}, "prompt")


def test_validator_fields_map_to_openai_params_and_errors_have_both_shapes():
    assert oai.openai_param("image") == "input_reference" and oai.openai_param("jacobi.max_iter") == "jacobi.max_iter"
    body = oai.error_body("size: bad\n  size", "size")
    assert body == {"error": {"message": "size: bad size", "type": "invalid_request_error", "param": "size",
                              "code": None}, "field": "size"}


# ---------------------------------------------------------------------------------------------- job store
def _assets(n: int = 3) -> dict[str, bytes]:
    return {"video": b"\0\0\0\x18ftypisom" + b"x" * n, "thumbnail": b"png1", "spritesheet": b"png2"}


def _job(store: JobStore, **kw):
    return store.new(model="starflow", prompt="p", seconds="0.5", size="16x16", frames=4, **kw)


def test_job_files_are_staged_then_renamed_and_recovered_after_a_restart(tmp_path, monkeypatch):
    store = JobStore(tmp_path / "videos")
    done, running, queued = _job(store), _job(store), _job(store)
    renames = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append((os.path.basename(a), os.path.basename(b))),
                                                     real(a, b))[1])
    store.complete(done, _assets())
    monkeypatch.undo()
    staged = [a for a, b in renames if b in ("video.mp4", "thumbnail.png", "spritesheet.png")]
    assert len(staged) == 3 and all(a.startswith(".") for a in staged)
    assert [b for _, b in renames][-1] == "job.json"          # completed only once the assets are in place
    store.start(running, "req1")
    # a crash mid-write: a stage file beside a half-done job
    (store.root / running.id / ".video.mp4.abc").write_bytes(b"half")
    foreign = tmp_path / "videos" / "notes.txt"
    foreign.write_text("mine")
    (tmp_path / "videos" / "video_0000").mkdir()               # not a job id: never touched

    again = JobStore(tmp_path / "videos")
    assert again.get(done.id).status == "completed"
    assert again.asset_path(again.get(done.id), "video").read_bytes() == _assets()["video"]
    for j in (running, queued):
        got = again.get(j.id)
        assert got.status == "failed" and got.error["code"] == "server_restarted"
    assert not (store.root / running.id / ".video.mp4.abc").exists()
    assert foreign.read_text() == "mine" and (tmp_path / "videos" / "video_0000").is_dir()
    # a completed job that lost a file is reported failed, never served half
    (store.root / done.id / "spritesheet.png").unlink()
    third = JobStore(tmp_path / "videos")
    assert third.get(done.id).status == "failed"


def test_retention_keeps_completed_videos_their_time_to_live_and_failed_jobs_never_evict_them(tmp_path):
    store = JobStore(tmp_path, Retention(max_count=2, max_bytes=10 ** 6, max_age_s=100))
    done = [_job(store) for _ in range(3)]
    for j in done:
        store.complete(j, _assets())
    failed = [_job(store) for _ in range(4)]
    for j in failed:
        store.fail(j, "boom")
    store.prune()
    # beyond max_count only failed jobs go (the oldest); every completed video stays
    assert [j.id for j in done + failed if store.get(j.id)] == [j.id for j in done + failed[2:]]
    assert not (tmp_path / failed[0].id).exists() and (tmp_path / done[0].id / "video.mp4").is_file()
    running = _job(store)                                       # never removed while it runs
    assert store.prune(now=done[0].finished + 99.9) == []       # within its time to live
    store.prune(now=failed[-1].finished + 100)
    assert list(store.jobs) == [running.id]


def test_over_the_byte_cap_the_oldest_downloaded_video_goes_first(tmp_path):
    small = JobStore(tmp_path, Retention(max_count=10, max_bytes=50, max_age_s=100))
    a, b, c = _job(small), _job(small), _job(small)
    small.complete(a, _assets(3))
    small.complete(b, _assets(3))
    small.downloaded(b)
    assert small.get(a.id) and small.get(b.id)                  # 2 x 23 bytes: within 50
    assert JobStore(tmp_path).get(b.id).downloaded == b.downloaded > 0   # the mark is kept in job.json
    small.complete(c, _assets(3))                               # 69 > 50: b (downloaded) goes, not the older a
    assert small.get(b.id) is None and small.get(a.id) is not None and small.get(c.id) is not None
    small.complete(d := _job(small), _assets(3))               # none downloaded now: the oldest goes
    assert small.get(a.id) is None and small.get(c.id) and small.get(d.id)
    with pytest.raises(Exception, match="retention"):
        Retention(max_count=0)


def test_a_job_with_text_that_is_not_utf8_is_left_out_of_the_list_and_repaired_on_start(tmp_path, caplog):
    store = JobStore(tmp_path)
    good, bad = _job(store), store.new(model="starflow", prompt="x\ud800y", seconds="0.5", size="16x16", frames=4)
    with pytest.raises(UnicodeEncodeError):
        bad.encoded()
    assert [d["id"] for d in store.page()["data"]] == [good.id]  # the list answers without it
    assert store.get(bad.id) is None and "cannot be written" in caplog.text
    unreadable = tmp_path / ("video_" + "f" * 24)
    unreadable.mkdir()
    (unreadable / "job.json").write_text("{not json")
    again = JobStore(tmp_path)                                   # the store of an older server, restarted
    assert "cannot be read" in caplog.text and unreadable.is_dir()
    fixed = again.get(bad.id)
    assert fixed.prompt == "x?y" and json.loads(fixed.encoded())["prompt"] == "x?y"
    assert json.loads((tmp_path / bad.id / "job.json").read_text())["prompt"] == "x?y"
    assert {d["id"] for d in again.page()["data"]} == {good.id, bad.id}


def test_a_draft_is_stored_only_when_added_and_one_take_wins(tmp_path):
    store = JobStore(tmp_path)
    job = JobStore.draft(model="starflow", prompt="p", seconds="0.5", size="16x16", frames=4)
    assert store.get(job.id) is None and not (tmp_path / job.id).exists()
    store.add(job)
    assert (tmp_path / job.id / "job.json").is_file()
    assert store.take(job.id) is job and store.take(job.id) is None
    assert (tmp_path / job.id).is_dir()                          # files stay until remove_files
    store.remove_files(job.id)
    assert not (tmp_path / job.id).exists()


def test_delete_and_cursor_pages(tmp_path):
    store = JobStore(tmp_path)
    jobs = [_job(store) for _ in range(5)]
    for j in jobs:
        j.created_at = 1000                                     # the same second: creation order still holds
    first = store.page(limit=2)
    assert [d["id"] for d in first["data"]] == [jobs[4].id, jobs[3].id] and first["has_more"]
    assert first["object"] == "list" and first["last_id"] == jobs[3].id
    rest = store.page(after=first["last_id"], limit=10)
    assert [d["id"] for d in rest["data"]] == [j.id for j in jobs[2::-1]] and not rest["has_more"]
    assert [d["id"] for d in store.page(order="asc", limit=1)["data"]] == [jobs[0].id]
    assert store.delete(jobs[0].id) and not (tmp_path / jobs[0].id).exists() and store.get(jobs[0].id) is None
    assert not store.delete(jobs[0].id)
    obj = jobs[1].to_openai()
    assert obj["object"] == "video" and obj["status"] == "queued" and obj["progress"] == 0


# ---------------------------------------------------------------------------------------------- job runner
def _frame_events(n: int):
    frames = [np.full((16, 16, 3), 40 * i, np.uint8) for i in range(n)]
    events = [{"type": "frame", "index": i, "png": base64.b64encode(_png(f)).decode()} for i, f in enumerate(frames)]
    return frames, events


def test_a_job_consumes_the_stream_into_mp4_thumbnail_and_spritesheet(tmp_path):
    store = JobStore(tmp_path)
    job = _job(store)
    frames, events = _frame_events(4)
    progress = []

    async def stream():
        for e in events:
            yield e
            progress.append(job.progress)
        yield {"type": "done", "stats": {}, "mp4": base64.b64encode(b"MP4").decode()}

    asyncio.run(run_job(store, job, stream()))
    assert job.status == "completed" and job.progress == 100 and progress == [25, 50, 75, 99]
    assert store.asset_path(job, "video").read_bytes() == b"MP4"
    assert store.asset_path(job, "thumbnail").read_bytes() == base64.b64decode(events[0]["png"])
    sheet = cv2.imread(str(store.asset_path(job, "spritesheet")))[..., ::-1]
    assert sheet.shape == (32, 32, 3) and np.array_equal(sheet, spritesheet(frames))
    assert np.array_equal(sheet[16:, :16], frames[2])
    assert set(ASSETS) == {"video", "thumbnail", "spritesheet"}


def test_an_error_event_fails_the_job_with_its_message(tmp_path):
    store = JobStore(tmp_path)
    job = _job(store)

    async def stream():
        yield _frame_events(1)[1][0]
        yield {"type": "error", "message": "request timed out after 1 s"}

    asyncio.run(run_job(store, job, stream()))
    assert job.status == "failed" and job.error == {"code": "generation_failed",
                                                    "message": "request timed out after 1 s"}
    assert not store.asset_path(job, "video").exists()


# ---------------------------------------------------------------------------------------------- API key
def test_bearer_key_is_checked_in_constant_time(monkeypatch):
    import hmac

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    assert authorized("Bearer s3cret", "s3cret") and authorized("bearer s3cret", "s3cret")
    assert not authorized("Bearer wrong", "s3cret") and not authorized(None, "s3cret")
    assert not authorized("Basic s3cret", "s3cret")
    assert authorized(None, None) and len(calls) == 5   # every keyed check compares
    assert not needs_key("/healthz") and not needs_key("/") and needs_key("/v1/models")
    assert not needs_key("/sf/healthz", "/sf") and needs_key("/sf/v1/videos", "/sf/")


def _call(middleware, path: str, headers=()):
    sent, passed = [], []

    async def inner(scope, receive, send):
        passed.append(scope["path"])

    async def send(message):
        sent.append(message)

    mw = BearerAuth(inner, key=middleware)
    asyncio.run(mw({"type": "http", "path": path, "headers": list(headers)}, None, send))
    return passed, sent


def test_the_middleware_answers_401_in_openai_shape_except_on_open_paths():
    key = lambda: "k"  # noqa: E731
    passed, sent = _call(key, "/v1/videos", [(b"authorization", b"Bearer nope")])
    assert not passed and sent[0]["status"] == 401
    body = json.loads(sent[1]["body"])
    assert body["error"]["code"] == "invalid_api_key" and "Authorization: Bearer KEY" in body["error"]["message"]
    assert _call(key, "/v1/videos", [(b"authorization", b"Bearer k")])[0] == ["/v1/videos"]
    assert _call(key, "/healthz")[0] == ["/healthz"] and _call(key, "/")[0] == ["/"]
    assert _call(lambda: None, "/v1/models")[0] == ["/v1/models"]     # no key set: open


def test_serve_takes_the_key_from_the_option_or_the_environment(tmp_path, monkeypatch):
    from click.testing import CliRunner

    pytest.importorskip("ray.serve", reason="ray[serve] is not installed")
    from starflow_trt.commands import serve_cmd

    seen = []
    monkeypatch.setattr(ModelSummary, "from_dir", classmethod(lambda cls, d: TOY))
    monkeypatch.setattr(serve_cmd, "_run", lambda directory, cfg, *a: seen.append(cfg))
    runner = CliRunner()
    r = runner.invoke(serve_cmd.serve_command, [str(tmp_path), "--videos-max-mb", "1", "--videos-max-age", "2"],
                      env={"STARFLOW_API_KEY": "from-env"})
    assert r.exit_code == 0, r.output
    assert "ps" not in r.output
    r = runner.invoke(serve_cmd.serve_command, [str(tmp_path), "--api-key", "from-flag", "--allowed-origins",
                                                "https://a.example,https://b.example", "--allowed-origins",
                                                "https://c.example", "--allowed-hosts", "gpu.lan", "--host",
                                                "0.0.0.0"], env={"STARFLOW_API_KEY": ""})
    assert r.exit_code == 0, r.output
    assert "warning: --api-key shows in `ps`" in r.output and "STARFLOW_API_KEY" in r.output
    assert seen[0].api_key == "from-env" and seen[0].videos_max_bytes == 1 << 20 and seen[0].videos_max_age_s == 7200
    assert seen[0].allowed_origins == () and seen[0].http_host == "127.0.0.1"
    assert seen[1].api_key == "from-flag" and seen[1].http_host == "0.0.0.0" and seen[1].allowed_hosts == ("gpu.lan",)
    assert seen[1].allowed_origins == ("https://a.example", "https://b.example", "https://c.example")
    assert ServeConfig.from_dict(json.loads(json.dumps(seen[1].to_dict()))) == seen[1]   # lists back to tuples
