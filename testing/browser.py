"""Headless Chromium (Debian's chromium + chromedriver through selenium) and a threaded WSGI server on loopback:
what the browser tests, the screenshot tools and the interactive editor test share."""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Iterator

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
# No network beyond the page under test: the machines that run this have no internet access.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
)


@contextlib.contextmanager
def headless_chromium(width: int = 1400, height: int = 1000, extra_flags: tuple[str, ...] = ()) -> Iterator["object"]:
    """A Selenium driver for Debian's chromium + chromedriver, with a fresh profile removed afterwards."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="m2fp-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, *extra_flags):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@contextlib.contextmanager
def serve(app) -> Iterator[str]:
    """Serve a WSGI app on a free port of 127.0.0.1 in a thread; yields its base URL."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()


OVERLAY_READY_JS = """
const img = document.getElementById('overlay');
return !document.getElementById('result').hidden && img.complete && img.naturalWidth > 0;
"""


def upload_and_wait(driver, base_url: str | None, image: Path, timeout: float = 180.0) -> None:
    """Open the page (unless `base_url` is None: the page already open), upload `image` through its file input
    and wait until the overlay has loaded."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    if base_url is not None:
        driver.get(f"{base_url}/demo")
        WebDriverWait(driver, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#legend li"))
    driver.find_element(By.ID, "file").send_keys(str(image.resolve()))
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script(OVERLAY_READY_JS))
