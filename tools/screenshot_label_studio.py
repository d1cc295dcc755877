"""Makes docs/img/prelabels.png: a Label Studio task with the backend's pre-labels drawn, for the README.

    .venv/bin/python -m tools.screenshot_label_studio                    # starts LS + backend, random-weight model
    .venv/bin/python -m tools.screenshot_label_studio --model /path/to/real/model --image photo.jpg
    .venv/bin/python -m tools.screenshot_label_studio --ls-url http://127.0.0.1:8080 --token T \\
        --username me@x.org --password P --backend-url http://127.0.0.1:9090          # reuse running servers

What a user does, scripted: create a project (PolygonLabels, one label per CIHP part, coloured with the
backend's fixed palette), import the image, connect the backend, run "Retrieve Predictions", then log in with
headless Chromium (Debian's chromium + chromedriver through selenium) and capture the labeling view of the task.
Servers this tool starts are stopped at the end. Needs the Label Studio venv (`make ls-venv`).
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from backend.visualise import PALETTE
from testing import label_studio as lsfix
from testing.browser import headless_chromium

ROOT = Path(__file__).resolve().parents[1]

MAX_BYTES = 300_000


def label_config(score_threshold: float) -> str:
    labels = "\n".join(f'    <Label value="{name}" background="#{r:02x}{g:02x}{b:02x}"/>'
                       for name, (r, g, b) in PALETTE.items())
    return f"""<View>
  <Image name="image" value="$image" zoom="true"/>
  <PolygonLabels name="parts" toName="image" strokeWidth="2" opacity="0.45"
                 model_score_threshold="{score_threshold}">
{labels}
  </PolygonLabels>
</View>"""


def capture(url: str, username: str, password: str, project_id: int, task_id: int, out: Path,
            width: int = 1440, height: int = 900, timeout: float = 180.0) -> None:
    """Log in, open the task in the labeling view, wait for the regions, save a compact PNG."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    with headless_chromium(width, height, extra_flags=("--hide-scrollbars",)) as driver:
        driver.set_page_load_timeout(timeout)
        driver.set_window_size(width, height)  # old headless mode counts the window frame in --window-size
        wait = WebDriverWait(driver, timeout)
        driver.get(f"{url}/user/login/")
        wait.until(ec.presence_of_element_located((By.NAME, "email"))).send_keys(username)
        driver.find_element(By.NAME, "password").send_keys(password)
        driver.find_element(By.CSS_SELECTOR, "button[type=submit], input[type=submit]").click()
        wait.until(lambda d: "/user/login" not in d.current_url)
        driver.get(f"{url}/projects/{project_id}/data?task={task_id}")
        # The editor draws the image and regions on Konva canvases; the region list names the labels.
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "canvas")))
        wait.until(lambda d: d.execute_script("return document.querySelectorAll('canvas').length >= 2"))
        time.sleep(10)  # image decode + Konva's first full draw of every region
        png = driver.get_screenshot_as_png()
    save_compact(png, out)


def save_compact(png: bytes, out: Path, max_bytes: int = MAX_BYTES) -> None:
    """A palette PNG (screenshots have few colours), shrunk until it is under `max_bytes`."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    out.parent.mkdir(parents=True, exist_ok=True)
    scale = 1.0
    while True:
        size = (round(image.width * scale), round(image.height * scale))
        small = image if scale == 1.0 else image.resize(size, Image.LANCZOS)
        buffer = io.BytesIO()
        small.quantize(colors=128, method=Image.MEDIANCUT, dither=Image.NONE).save(buffer, "PNG", optimize=True)
        if buffer.tell() <= max_bytes or scale < 0.4:
            out.write_bytes(buffer.getvalue())
            return
        scale *= 0.85


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "prelabels.png")
    ap.add_argument("--image", type=Path, help="photo to pre-label (default: a generated sample image)")
    ap.add_argument("--model", help="model folder or hub id for a backend this tool starts "
                                    "(default: the tests' shaped random-weight model)")
    ap.add_argument("--ls-url", help="use this running Label Studio instead of starting one")
    ap.add_argument("--token", help="its API token (legacy token)")
    ap.add_argument("--username", help="its user (browser login)")
    ap.add_argument("--password")
    ap.add_argument("--backend-url", help="use this running backend instead of starting one")
    ap.add_argument("--score-threshold", type=float, default=0.5,
                    help="the project's model_score_threshold: fewer, surer regions in the picture")
    args = ap.parse_args(argv)

    started: list = []
    with tempfile.TemporaryDirectory(prefix="m2fp-screenshot-") as tmp_dir:
        tmp = Path(tmp_dir)
        try:
            if args.ls_url:
                if not (args.token and args.username and args.password):
                    ap.error("--ls-url needs --token, --username and --password")
                ls = lsfix.LabelStudioServer(args.ls_url.rstrip("/"), args.token, args.username, args.password,
                                             tmp, tmp, tmp / "none.log", proc=None)  # type: ignore[arg-type]
            else:
                print("starting Label Studio ...", flush=True)
                ls = lsfix.start_label_studio(tmp / "label-studio", username="annotator@example.com")
                started.append(ls)
            if args.backend_url:
                backend_url = args.backend_url.rstrip("/")
            else:
                from testing.backend_server import start_backend
                from testing.random_model import cached_model

                model = args.model or str(cached_model("shaped"))
                print(f"starting the backend with {model} ...", flush=True)
                backend = start_backend({"M2FP_MODEL": model, "LABEL_STUDIO_URL": ls.url,
                                         "LABEL_STUDIO_API_KEY": ls.token}, tmp / "logs")
                started.append(backend)
                backend_url = backend.url

            image = args.image
            if image is None:
                from testing.random_model import make_sample_image

                image = tmp / "person.jpg"
                make_sample_image(960, 640, seed=1).save(image, quality=92)
            project = lsfix.create_project(ls, label_config(args.score_threshold), title="M2FP pre-labels")
            (task,) = lsfix.import_uploads(ls, project, [image])
            lsfix.connect_ml_backend(ls, project, backend_url)
            lsfix.retrieve_predictions(ls, project, ids=[task])
            regions = [r for p in lsfix.predictions_of(ls, task) for r in p["result"]]
            if not regions:
                raise SystemExit("the backend returned no regions for this image: nothing to show")
            print(f"task {task}: {len(regions)} regions; capturing ...", flush=True)
            capture(ls.url, ls.username, ls.password, project, task, args.out)
            print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")
        finally:
            for server in reversed(started):
                server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
