"""The restoration page (minirestore/demo.py): its server over plain HTTP, and the page end to end in a real
headless Chromium driven by Selenium (Debian's chromium + chromium-driver, which .ci/run installs).

The browser test skips, saying why, only when no browser can be had; on CI (CI=true) it must run."""
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1200,900"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """python -m minirestore.demo on a free port of 127.0.0.1 -> its address; stopped afterwards."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cwd = tmp_path_factory.mktemp("demo")
    proc = subprocess.Popen([sys.executable, "-m", "minirestore.demo", "--port", "0", "--max-bytes", "400000",
                             "--max-size", "512"], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url, seen = None, []
    deadline = time.time() + 120
    while url is None and time.time() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        if m := re.search(r"http://127\.0\.0\.1:\d+/", line):
            url = m.group(0)
    assert url, "the demo did not start:\n" + "".join(seen)
    yield url, proc
    proc.terminate()
    proc.wait(timeout=30)


def _post(url, body, query="degradations=noise&t0=0.4&steps=2"):
    req = urllib.request.Request(url + "api/restore?" + query, data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def _png(seed=0, size=(40, 28)):
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _wait(url, job, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        with urllib.request.urlopen(f"{url}api/job/{job}") as r:
            state = json.load(r)
        if state["state"] != "running":
            return state
        time.sleep(0.2)
    raise AssertionError("the job did not finish")


def test_server_only_listens_on_localhost(server):
    url, _ = server
    assert url.startswith("http://127.0.0.1:")


def test_bad_uploads_get_a_message_and_the_server_keeps_serving(server):
    url, proc = server
    status, reply = _post(url, b"this is not an image")
    assert status == 400 and "not a readable image" in reply["message"]
    status, reply = _post(url, b"\x89PNG\r\n\x1a\n" + b"\0" * 500_000)  # more bytes than --max-bytes
    assert status == 413 and "more than this page takes" in reply["message"]
    status, reply = _post(url, _png(size=(600, 20)))  # more pixels a side than --max-size
    assert status == 400 and "larger than this page takes" in reply["message"]
    status, reply = _post(url, _png(), "degradations=sunburn")
    assert status == 400 and "choose degradations among" in reply["message"]
    status, reply = _post(url, _png(), "degradations=noise&steps=many")
    assert status == 400 and "steps a whole number" in reply["message"]
    assert proc.poll() is None
    status, reply = _post(url, _png(1), "degradations=noise,blur&t0=auto&steps=2")  # a mix; still serving
    assert status == 200
    state = _wait(url, reply["job"])
    assert state["state"] == "done" and state["size"] == [40, 28], state
    with urllib.request.urlopen(f"{url}api/result/{reply['job']}") as r:
        out = Image.open(io.BytesIO(r.read()))
    assert out.size == (40, 28)


def _chrome():
    """A Selenium driver of headless Chromium, or the reason there is none."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        return None, "selenium is not installed (pip install -e '.[test]')"
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        return None, "no chromium / chromedriver on PATH (apt-get install chromium chromium-driver)"
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS + [f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}"]:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=driver), options=options), None


@pytest.fixture
def browser():
    driver, reason = _chrome()
    if driver is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the browser test, but {reason}")
        pytest.skip(reason)
    yield driver
    driver.quit()


def _test_picture(w, h):
    """A held-out test photograph scaled to w x h when the photo cache has it (.ci/run fetches it), else a
    procedural dead-leaves image: uint8 [h, w, 3]."""
    from minirestore import photos

    rows = [r for r in photos.read_list() if r.split == "test"]
    cache = photos.cache_dir()
    if rows and (cache / f"{rows[0].name}.npy").exists():
        return np.asarray(Image.fromarray(np.load(cache / f"{rows[0].name}.npy")).resize((w, h), Image.LANCZOS))
    from minirestore.procedural import dead_leaves

    x = dead_leaves(5, max(w, h))[0][:, :h, :w]
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def test_the_page_in_a_real_browser(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    url, proc = server
    image = tmp_path / "photo.png"
    rgb = _test_picture(128, 96)
    noisy = np.clip(rgb / 255 + 0.08 * np.random.default_rng(0).standard_normal(rgb.shape), 0, 1)
    Image.fromarray((noisy * 255).astype(np.uint8)).save(image)

    browser.get(url)
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#degradations input[value=noise]"))
    for box in browser.find_elements(By.CSS_SELECTOR, "#degradations input"):  # noise only
        if box.is_selected() != (box.get_attribute("value") == "noise"):
            box.click()
    browser.find_element(By.ID, "file").send_keys(str(image))  # what picking a file does
    wait.until(EC.element_to_be_clickable((By.ID, "go"))).click()
    wait.until(lambda d: d.find_element(By.ID, "status").text.startswith("done")
               or d.find_element(By.ID, "message").text)
    assert browser.find_element(By.ID, "message").text == ""
    wait.until(lambda d: d.execute_script("return document.getElementById('after').naturalWidth") > 0)
    size = browser.execute_script("const i = document.getElementById('after'); return [i.naturalWidth, i.naturalHeight]")
    assert size == [128, 96]
    # the result the download link points at: the input's size, and not the input
    href = browser.find_element(By.ID, "download").get_attribute("href")
    assert browser.find_element(By.ID, "download").get_attribute("download") == "photo_restored.png"
    with urllib.request.urlopen(href) as r:
        out = np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"), dtype=np.float32)
    inp = np.asarray(Image.open(image), dtype=np.float32)
    assert out.shape == inp.shape and np.abs(out - inp).mean() > 2
    browser.find_element(By.ID, "slider").send_keys("\ue012" * 10)  # arrow left: the slider moves the split
    assert "inset(0px 60%" in browser.execute_script(
        "return document.querySelector('#compare .top').style.clipPath")
    shot = os.environ.get("MINIRESTORE_DEMO_SCREENSHOT")  # the README's screenshot is taken by this test
    if shot:
        browser.set_window_size(1200, 900)
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(shot)

    text = tmp_path / "notes.txt"
    text.write_text("not an image at all")
    browser.find_element(By.ID, "file").send_keys(str(text))
    wait.until(EC.element_to_be_clickable((By.ID, "go"))).click()
    wait.until(lambda d: d.find_element(By.ID, "message").text)
    assert "not a readable image" in browser.find_element(By.ID, "message").text
    assert proc.poll() is None  # still serving
    browser.get(url)
    assert browser.find_element(By.ID, "drop").is_displayed()
