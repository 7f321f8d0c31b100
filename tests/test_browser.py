"""A real browser opens the page, uploads a photo and reads the answer (Debian's chromium + Python playwright)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import colour_image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
API_KEY = "browser-test-key"  # the server requires it: the page must send it with every request
SCREENSHOT_DIR = Path(__file__).resolve().parents[1] / "test-artifacts"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(request, tmp_path_factory):
    """`catdog serve --model FILE` (the tiny run's exported model.onnx) with an API key; stopped even on failure."""
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (make test installs it with apt-get when run as root)")
    pytest.importorskip("playwright")
    import urllib.request

    served_run = request.getfixturevalue("served_run")  # trained only when the browser tests can run
    root = tmp_path_factory.mktemp("browser")
    port = free_port()
    log_path = root / "serve.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, "-m", "catdog.cli", "serve", "--model", str(served_run[1]), "--port",
                                    str(port)], stdout=log_file, stderr=subprocess.STDOUT,
                                   env={**os.environ, "CATDOG_API_KEY": API_KEY})
    try:
        deadline = time.time() + 120
        while True:
            if process.poll() is not None or time.time() > deadline:
                pytest.fail("server did not become ready: " + log_path.read_text(errors="replace"))
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        photo = root / "dog-photo.jpg"
        colour_image(1, 123, (320, 240)).save(photo)
        yield f"http://127.0.0.1:{port}/", photo
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)


def test_upload_a_photo_and_read_the_label(server):
    from playwright.sync_api import sync_playwright

    url, photo = server
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page()
        page.goto(f"{url}?key={API_KEY}")  # the page keeps the key and takes it out of the address bar
        assert page.url == url
        page.wait_for_function("document.getElementById('model').textContent.startsWith('Model:')")
        page.set_input_files("#file", str(photo))
        page.wait_for_function("['cat', 'dog'].includes(document.getElementById('label').textContent)", timeout=30_000)
        label = page.text_content("#label")
        bars = page.locator(".bar").count()
        SCREENSHOT_DIR.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT_DIR / "serve_page.png"), full_page=True)
        browser.close()
    assert label == "dog" and bars == 2
    assert (SCREENSHOT_DIR / "serve_page.png").stat().st_size > 5000


def test_explain_switch_shows_the_heatmap(server):
    from playwright.sync_api import sync_playwright

    url, photo = server
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page()
        page.goto(f"{url}?key={API_KEY}")
        page.wait_for_function("document.getElementById('model').textContent.startsWith('Model:')")
        page.check("#explain")
        page.set_input_files("#file", str(photo))
        page.wait_for_function("document.getElementById('result').classList.contains('explained')", timeout=60_000)
        label = page.text_content("#label")
        overlay = page.eval_on_selector("#overlay", "i => [i.src.slice(0, 22), i.complete && i.naturalWidth, i.offsetWidth]")
        page.screenshot(path=str(SCREENSHOT_DIR / "serve_page_explain.png"), full_page=True)
        browser.close()
    assert label == "dog"
    assert overlay[0] == "data:image/png;base64," and overlay[1] == 320 and overlay[2] > 0  # shown, at the photo's size
