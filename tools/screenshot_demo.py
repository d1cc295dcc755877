"""Screenshot of the demo page after an upload, for the README (docs/img/demo.png).

Serves the web layer (backend.web, the same page and API the backend process serves) on a free local port, opens
/demo in headless Chromium, uploads an image through the page's file input, waits for the overlay and saves the
window. Without --model it uses the test suite's random-weight model (tools/make_random_model.py), so the colours
show what the page looks like, not what real weights find; without --image a synthetic test scene.

    .venv/bin/python tools/screenshot_demo.py [--model DIR_OR_ID] [--image PHOTO] [--out docs/img/demo.png]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder or hub id (default: the random test model)")
    ap.add_argument("--image", type=Path, default=None, help="photo to upload (default: a synthetic scene)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "demo.png")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    from flask import Flask
    from PIL import Image

    from backend.engine import HumanParser
    from backend.predict import Predictor
    from backend.settings import Settings
    from backend.web import register_web

    model = args.model
    if model is None:
        from tools.make_random_model import cached_model

        model = cached_model("shaped")
    parser = HumanParser.from_pretrained(model, device="cpu", threads=args.threads)
    settings = Settings(redis_url="")
    predictor = Predictor(parser, settings)
    app = Flask("m2fp-demo-screenshot")
    register_web(app, lambda: predictor, settings)

    with tempfile.TemporaryDirectory() as tmp:
        image = args.image
        if image is None:
            from tests.fixtures.model import make_sample_image

            image = Path(tmp) / "scene.jpg"
            make_sample_image(960, 640, seed=3).save(image, quality=92)
        with serve(app) as base, headless_chromium(1400, 1100) as driver:
            upload_and_wait(driver, base, image)
            shot = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # 256 colours: a third of the bytes in the repository, no visible change for a UI screenshot.
    shot.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(args.out, optimize=True)
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
