"""The page at ``/`` in a real headless Chromium (Selenium + Debian's chromium and chromium-driver).

.ci/run installs them; the test skips, saying so, where they are missing.

The server has an API key: the page sends it from its key field. Autoregressive sampling without
the denoiser (which holds the toy's frames until the last) streams the frames one by one.
"""

from __future__ import annotations

import shutil
import time

import pytest

pytest.importorskip("ray.serve", reason="ray[serve] is not installed: pip install 'starflow-trt[serve]'")
webdriver = pytest.importorskip("selenium.webdriver",
                                reason="selenium is not installed: pip install 'starflow-trt[test]'")
psutil = pytest.importorskip("psutil", reason="psutil is not installed: pip install 'starflow-trt[serve]'")

pytestmark = pytest.mark.slow

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from tests.test_serving import local_service  # noqa: E402

KEY = "browser-key"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip("Chromium and its driver are not installed: apt-get install -y --no-install-recommends chromium "
                "chromium-driver (.ci/run does)", allow_module_level=True)


@pytest.fixture(scope="module")
def served(toy_export, tmp_path_factory):
    from starflow_trt.serving.app import ServeConfig

    cfg = ServeConfig(max_ongoing=8, max_queued=4, timeout_s=60, api_key=KEY,
                      videos_dir=str(tmp_path_factory.mktemp("videos")))
    with local_service(toy_export, cfg) as svc:
        yield svc


@pytest.fixture(scope="module")
def browser(served):
    from selenium.webdriver.chrome.service import Service as DriverService

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--autoplay-policy=no-user-gesture-required", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    service = DriverService(DRIVER)
    driver = webdriver.Chrome(options=opts, service=service)
    procs = [service.process.pid] + [p.pid for p in psutil.Process(service.process.pid).children(recursive=True)]
    try:
        yield driver
    finally:
        driver.quit()
        end = time.monotonic() + 20
        while time.monotonic() < end and any(psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
                                             for p in procs):
            time.sleep(0.2)
        alive = [p for p in procs if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
        assert not alive, f"browser processes still running: {alive}"


def _state(driver) -> dict:
    return driver.execute_script("return Object.assign({}, document.body.dataset);")


def _open(driver, served, prompt: str, seed: int) -> None:
    driver.get(served.url + "/")
    driver.find_element(By.ID, "key").send_keys(KEY)
    driver.execute_script("loadModel();")
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "status").text.startswith("ready"))
    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(prompt)
    driver.find_element(By.ID, "seed").send_keys(str(seed))
    Select(driver.find_element(By.ID, "sampler")).select_by_visible_text("autoregressive")
    driver.find_element(By.ID, "denoise").click()      # off: frames stream as the flow finishes each
    driver.find_element(By.ID, "generate").click()


def test_frames_appear_as_they_stream_and_the_video_plays(browser, served):
    _open(browser, served, "a blue disc moving up", 5)
    seen_streaming = False
    end = time.monotonic() + 60
    while time.monotonic() < end:
        s = _state(browser)
        if s.get("frames", "0") != "0" and s["state"] == "streaming":
            seen_streaming = True                      # a frame is on the page while the job still runs
        if s["state"] in ("done", "error"):
            break
        time.sleep(0.02)
    s = _state(browser)
    assert s["state"] == "done", browser.find_element(By.ID, "status").text
    assert s["frames"] == "6" and len(browser.find_elements(By.CSS_SELECTOR, "#strip img")) == 6
    assert float(s["firstFrameMs"]) < float(s["doneMs"]), s
    assert seen_streaming, s
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "const v = document.getElementById('video'); return v.readyState >= 2 && v.videoWidth === 16;"))
    WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "const v = document.getElementById('video'); if (v.paused) v.play(); return v.currentTime > 0;"))
    link = browser.find_element(By.ID, "download")
    assert link.is_displayed() and link.get_attribute("href").startswith("blob:")


def test_cancel_stops_the_job(browser, served):
    _open(browser, served, "a green disc moving up", 99)
    WebDriverWait(browser, 60, poll_frequency=0.02).until(lambda d: _state(d).get("frames", "0") != "0")
    browser.find_element(By.ID, "cancel").click()
    WebDriverWait(browser, 30).until(lambda d: _state(d)["state"] == "cancelled")
    request_id = _state(browser)["requestId"]
    rec = served.record(request_id)
    assert rec["status"] == "cancelled" and rec["frames_generated"] < 6, rec
