"""The official ``openai`` client (pinned in [test]) against ``starflow-trt serve`` on the toy export, with a key."""

from __future__ import annotations

import base64
import http.client
import io
import json
import warnings

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install 'starflow-trt[serve]'")
openai = pytest.importorskip("openai", reason="the openai client is not installed: pip install 'starflow-trt[test]'")

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning")]

from starflow_trt.serving.client import VideoClient  # noqa: E402
from starflow_trt.serving.job_runner import spritesheet  # noqa: E402
from tests.test_serving import local_service  # noqa: E402

KEY = "test-key-0123"
PROMPT = "a red square moving right"


@pytest.fixture(scope="module")
def served(toy_export, tmp_path_factory):
    from starflow_trt.serving.app import ServeConfig

    videos = tmp_path_factory.mktemp("videos")
    cfg = ServeConfig(max_ongoing=8, max_queued=4, timeout_s=60, batch_wait_s=0.02, api_key=KEY,
                      videos_dir=str(videos))
    with local_service(toy_export, cfg) as svc:
        svc.videos = videos
        yield svc


@pytest.fixture(scope="module")
def client(served):
    warnings.simplefilter("ignore", DeprecationWarning)      # the client marks the videos API deprecated (Sora)
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _png(rgb: np.ndarray) -> bytes:
    import cv2

    return cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))[1].tobytes()


def _decode_png(data: bytes) -> np.ndarray:
    import cv2

    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]


def _mp4_frames(data: bytes) -> list[np.ndarray]:
    import av

    with av.open(io.BytesIO(data)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_models_list_and_the_create_poll_download_cycle(client, served):
    models = client.models.list()
    assert [m.id for m in models.data] == ["starflow"] and models.data[0].object == "model"
    video = client.videos.create_and_poll(prompt=PROMPT, seconds="0.5", size="16x16",
                                          extra_body={"seed": 3, "guidance": 3.0})
    assert video.status == "completed" and video.progress == 100 and video.error is None, video
    assert video.seconds == "0.5" and video.size == "16x16" and video.model == "starflow"
    mp4 = client.videos.download_content(video.id).read()
    frames = _mp4_frames(mp4)
    assert mp4[4:8] == b"ftyp" and len(frames) == 4 and frames[0].shape == (16, 16, 3)
    # the thumbnail is the first frame the streaming API sends for the same request
    stream = VideoClient(served.url, api_key=KEY).generate({"prompt": PROMPT, "seed": 3, "guidance": 3.0, "frames": 4})
    thumb = _decode_png(client.videos.download_content(video.id, variant="thumbnail").read())
    assert np.array_equal(thumb, stream.frames[0])
    sheet = _decode_png(client.videos.download_content(video.id, variant="spritesheet").read())
    assert np.array_equal(sheet, spritesheet(stream.frames))
    assert (served.videos / video.id / "video.mp4").read_bytes() == mp4


def test_input_reference_equals_the_streaming_api_for_the_same_seed(client, served):
    img = np.zeros((32, 32, 3), np.uint8)
    img[8:24, 8:24] = (255, 0, 0)
    png = _png(img)
    video = client.videos.create_and_poll(prompt=PROMPT, seconds="0.5", input_reference=("ref.png", png, "image/png"),
                                          extra_body={"seed": 21, "sampler": "autoregressive"})
    assert video.status == "completed", video
    sheet = _decode_png(client.videos.download_content(video.id, variant="spritesheet").read())
    want = VideoClient(served.url, api_key=KEY).generate(
        {"prompt": PROMPT, "seed": 21, "sampler": "autoregressive", "frames": 4,
         "image": base64.b64encode(png).decode()})
    assert np.array_equal(sheet, spritesheet(want.frames))
    plain = client.videos.create_and_poll(prompt=PROMPT, seconds="0.5",
                                          extra_body={"seed": 21, "sampler": "autoregressive"})
    other = _decode_png(client.videos.download_content(plain.id, variant="spritesheet").read())
    assert not np.array_equal(sheet, other)                    # the reference changed the video


def test_list_pages_delete_then_retrieve_is_not_found(client, served):
    a = client.videos.create_and_poll(prompt=PROMPT, seconds="0.25", extra_body={"seed": 1})
    b = client.videos.create_and_poll(prompt=PROMPT, seconds="0.25", extra_body={"seed": 2})
    first = client.videos.list(limit=1)
    assert [v.id for v in first.data] == [b.id] and first.has_more
    everything = [v.id for v in client.videos.list(limit=1)]   # the client follows `after` cursors
    assert everything[:2] == [b.id, a.id] and len(everything) == len(set(everything)) >= 2
    gone = client.videos.delete(a.id)
    assert gone.id == a.id and not (served.videos / a.id).exists()
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(a.id)
    assert a.id not in [v.id for v in client.videos.list(limit=100)]


def test_bad_size_and_wrong_key_raise_the_clients_error_classes(client, served):
    with pytest.raises(openai.BadRequestError) as info:
        client.videos.create(prompt=PROMPT, size="1280x720")
    assert "16x16" in str(info.value) and info.value.param == "size"
    with pytest.raises(openai.BadRequestError, match="at most 6 frames"):
        client.videos.create(prompt=PROMPT, seconds="4")
    wrong = openai.OpenAI(base_url=f"{served.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.videos.list()
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    try:
        for path in ("/healthz", "/"):                         # open without a key
            conn.request("GET", path)
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 200, (path, body)
        assert b"<video" in body and b"http://" not in body and b"https://" not in body   # the page: no CDN
    finally:
        conn.close()


def test_through_the_proxy_a_foreign_host_and_a_cross_site_post_get_nothing(client, served):
    def send(method: str, path: str, headers: dict, body=None):
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    before = [v.id for v in client.videos.list(limit=100).data]
    auth = {"Authorization": f"Bearer {KEY}"}
    status, _, body = send("GET", "/v1/videos", {**auth, "Host": f"rebind.evil.example:{served.port}"})
    assert status == 400 and b"--allowed-hosts" in body and b"video_" not in body
    status, _, _ = send("POST", "/v1/videos", {"Content-Type": "text/plain", "Origin": "http://evil.example"},
                        json.dumps({"prompt": PROMPT}))
    assert status == 403
    status, headers, _ = send("GET", "/", {})
    assert status == 200 and headers["x-content-type-options"] == "nosniff"
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert [v.id for v in client.videos.list(limit=100).data] == before


def _post(served, body: dict, accept: str) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    try:
        conn.request("POST", "/v1/videos", body=json.dumps(body),
                     headers={"Content-Type": "application/json", "Accept": accept, "Authorization": f"Bearer {KEY}"})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read()
    finally:
        conn.close()


def test_post_videos_streams_when_asked_and_creates_a_job_otherwise(client, served):
    status, kind, body = _post(served, {"prompt": PROMPT, "seed": 4, "frames": 2}, "application/x-ndjson")
    assert status == 200 and kind == "application/x-ndjson"
    assert [json.loads(line)["type"] for line in body.splitlines()] == ["frame", "frame", "done"]
    status, kind, body = _post(served, {"prompt": PROMPT, "seed": 4, "frames": 2}, "application/json")
    job = json.loads(body)
    assert status == 200 and job["object"] == "video" and job["status"] in ("queued", "in_progress", "completed")
    assert client.videos.poll(job["id"]).status == "completed"
    status, _, body = _post(served, {"prompt": PROMPT, "output": "latents"}, "application/json")
    err = json.loads(body)
    assert status == 400 and err["field"] == "output" and "/v1/videos/stream" in err["error"]["message"]


def test_after_an_ingress_restart_a_job_is_downloadable_or_failed_never_half_written(client, served):
    import time

    import psutil

    done = client.videos.create_and_poll(prompt=PROMPT, seconds="0.25", extra_body={"seed": 8})
    slow = client.videos.create(prompt=PROMPT, seconds="0.75",
                                extra_body={"seed": 9, "sampler": "autoregressive", "denoise": False})
    ingress = [p for p in psutil.Process().children(recursive=True)
               if any("VideoIngress" in part for part in p.cmdline())]
    assert len(ingress) == 1, ingress
    ingress[0].kill()
    end = time.monotonic() + 120
    while True:
        try:
            got = client.videos.retrieve(slow.id)
            break
        except (openai.APIConnectionError, openai.InternalServerError):
            assert time.monotonic() < end, "the ingress did not come back within 120 s"
            time.sleep(0.5)
    served.processes.snapshot()
    assert psutil.pid_exists(ingress[0].pid) is False or ingress[0].status() == psutil.STATUS_ZOMBIE
    if got.status == "failed":
        assert got.error.code == "server_restarted", got
    else:
        assert got.status == "completed" and len(_mp4_frames(client.videos.download_content(slow.id).read())) == 6
    assert client.videos.retrieve(done.id).status == "completed"
    assert len(_mp4_frames(client.videos.download_content(done.id).read())) == 2
    assert not [p for p in served.videos.rglob(".*") if p.is_file()]     # no stage file left behind
