"""Screenshot of the demo page after an upload, for the README (docs/img/demo.png).

Serves the web layer (backend.web, the same page and API the backend process serves) on a free local port, opens
/demo in headless Chromium, uploads an image through the page's file input, waits for the overlay and saves the
window. Without --model it uses the test suite's random-weight model (testing/random_model.py), so the colours
show what the page looks like, not what real weights find; without --image a synthetic test scene.

    .venv/bin/python -m tools.screenshot_demo [--model DIR_OR_ID] [--image PHOTO] [--out docs/img/demo.png]
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

from testing.browser import headless_chromium, serve, upload_and_wait

ROOT = Path(__file__).resolve().parents[1]

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="model folder or hub id (default: the random test model)")
    ap.add_argument("--image", type=Path, default=None, help="photo to upload (default: a synthetic scene)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "img" / "demo.png")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    from PIL import Image

    from backend.engine import HumanParser
    from backend.runtime import build_runtime
    from backend.server import create_app
    from backend.settings import Settings

    model = args.model
    if model is None:
        from testing.random_model import cached_model

        model = cached_model("shaped")
    parser = HumanParser.from_pretrained(model, device="cpu", threads=args.threads)
    app = create_app(build_runtime(parser, Settings(redis_url="")))

    with tempfile.TemporaryDirectory() as tmp:
        image = args.image
        if image is None:
            from testing.random_model import make_sample_image

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
