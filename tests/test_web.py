"""The HTTP API and demo page with the real engine (random-weight model) and a real Redis cache behind them.

The app is the backend's own (backend.server.create_app) around the session's parser; one test goes through a
real HTTP server.
Uploads of the same bytes after the first are cache hits: the module runs two inferences in all.
"""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import requests
from flask import Flask, request
from flask.testing import FlaskClient
from PIL import Image

from backend.images import decode_image
from backend.runtime import build_runtime
from backend.server import create_app
from backend.settings import Settings
from testing.browser import serve

# Redis databases of the session's redis-server used here (see testing/redis_server.py).
WEB_DB = 6


def web_settings(redis_url: str) -> Settings:
    # Small limits so the tests can cross them cheaply: 3 MB per upload, 4 megapixels per image. A generous
    # Redis timeout: on a busy 2-core machine a cache read must not time out and turn a hit into a miss.
    return Settings(redis_url=redis_url, redis_timeout=5.0, max_upload_bytes=3_000_000, image_max_pixels=4_000_000)


def build_app(parser, settings: Settings) -> Flask:
    """The backend's own app around the session's parser, with a real cache."""
    return create_app(build_runtime(parser, settings))


@pytest.fixture(scope="module")
def settings(redis_server) -> Settings:
    redis_server.flushdb(WEB_DB)
    return web_settings(redis_server.url_for(WEB_DB))


@pytest.fixture(scope="module")
def app(parser, settings: Settings) -> Flask:
    return build_app(parser, settings)


@pytest.fixture(scope="module")
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture(scope="module")
def photo(sample_images: list[Path]) -> bytes:
    return next(p for p in sample_images if p.name.startswith("scene_640x480")).read_bytes()


@pytest.fixture(scope="module")
def parsed(client: FlaskClient, photo: bytes) -> dict:
    response = client.post("/api/parse", data={"file": (io.BytesIO(photo), "scene.jpg")},
                           content_type="multipart/form-data")
    assert response.status_code == 200, response.get_data(as_text=True)
    return response.get_json()


def _sideways_jpeg(photo: bytes) -> bytes:
    """The photo stored rotated with EXIF orientation 6 (display = rotate 90 CW back to the original)."""
    image = Image.open(io.BytesIO(photo)).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95, exif=exif)
    return buf.getvalue()


def _assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["error"] == code and body["message"]
    return body


def test_parse_json_shape(parsed: dict, parser, photo: bytes) -> None:
    width, height = Image.open(io.BytesIO(photo)).size
    assert (parsed["width"], parsed["height"]) == (width, height)
    assert parsed["model_version"] == parser.version
    assert parsed["cached"] is False
    assert parsed["parts"] and parsed["humans"], "the shaped random model finds people and parts here"
    assert "overlay_png" not in parsed
    classes = set(parser.classes)
    humans = parsed["humans"]
    assert [h["id"] for h in humans] == list(range(len(humans)))
    for item in parsed["parts"] + humans:
        assert item["label"] in classes
        assert item["class_id"] == parser.classes.index(item["label"])
        assert 0.0 <= item["score"] <= 1.0
        assert item["color"].startswith("#") and len(item["color"]) == 7
        x, y, w, h = item["bbox"]
        assert 0 <= x and 0 <= y and x + w <= width and y + h <= height
        assert 0 < item["area"] <= w * h
        for ring in item["polygons"]:
            pts = np.asarray(ring, float)
            assert pts.ndim == 2 and pts.shape[1] == 2 and len(pts) >= 3
            # Pixel-corner coordinates: within [0, width] x [0, height], around the instance's box.
            assert pts[:, 0].min() >= x - 1 and pts[:, 0].max() <= x + w + 1
            assert pts[:, 1].min() >= y - 1 and pts[:, 1].max() <= y + h + 1
    assert all(h["label"] == "Human" for h in humans)
    assert any(item["polygons"] for item in parsed["parts"])
    for part in parsed["parts"]:
        assert part["person"] is None or 0 <= part["person"] < len(humans)
    assert any(part["person"] is not None for part in parsed["parts"])


def test_raw_body_is_a_cache_hit_and_min_score_filters(client: FlaskClient, parsed: dict, photo: bytes) -> None:
    scores = sorted({p["score"] for p in parsed["parts"]})
    assert len(scores) >= 2
    middle = len(scores) // 2
    cut = (scores[middle - 1] + scores[middle]) / 2  # between two rounded scores: no rounding ties
    response = client.post(f"/api/parse?min_score={cut}", data=photo, content_type="image/jpeg")
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    assert body["cached"] is True
    assert [p for p in parsed["parts"] if p["score"] >= cut] == body["parts"]
    assert body["humans"] == parsed["humans"]


def test_overlay_png_follows_exif_and_parameters(client: FlaskClient, photo: bytes, parser) -> None:
    sideways = _sideways_jpeg(photo)
    stored = Image.open(io.BytesIO(sideways))
    oriented = decode_image(sideways, 10**8)
    assert stored.size[::-1] == oriented.size

    response = client.post("/api/overlay", data={"file": (io.BytesIO(sideways), "s.jpg")},
                           content_type="multipart/form-data")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.mimetype == "image/png"
    assert response.headers["X-Model-Version"] == parser.version
    assert response.headers["X-Cached"] == "0"
    coloured = Image.open(io.BytesIO(response.data))
    assert coloured.format == "PNG" and coloured.mode == "RGB"
    assert coloured.size == oriented.size
    changed = (np.asarray(coloured).astype(int) - np.asarray(oriented)).any(-1).mean()
    assert changed > 0.05, "parts are painted over a good share of the photo"

    # alpha 0 and no outline: exactly the (EXIF-oriented) photo.
    response = client.post("/api/overlay?alpha=0&outline=off", data=sideways, content_type="application/octet-stream")
    assert response.status_code == 200, response.get_data(as_text=True)
    assert response.headers["X-Cached"] == "1"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(response.data))), np.asarray(oriented))


def test_parse_with_overlay_data_url(client: FlaskClient, photo: bytes, parsed: dict) -> None:
    response = client.post("/api/parse?overlay=1&alpha=0.8&outline=0",
                           data={"file": (io.BytesIO(photo), "scene.jpg")}, content_type="multipart/form-data")
    assert response.status_code == 200, response.get_data(as_text=True)
    body = response.get_json()
    prefix = "data:image/png;base64,"
    assert body["overlay_png"].startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(body["overlay_png"][len(prefix):])))
    assert image.size == (parsed["width"], parsed["height"])
    assert body["parts"] == parsed["parts"]


def test_info_and_demo_page(client: FlaskClient, parser, settings: Settings) -> None:
    info = client.get("/api/info").get_json()
    assert info["model_version"] == parser.version
    assert info["max_upload_bytes"] == settings.max_upload_bytes
    assert [e["label"] for e in info["legend"]] == [c for c in parser.classes if c != "Background"]
    page = client.get("/demo")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert 'type="file"' in html and 'id="overlay"' in html and 'id="legend"' in html
    for asset in ("demo/static/demo.js", "demo/static/demo.css"):
        assert asset in html
        assert client.get("/" + asset).status_code == 200


def test_bad_uploads_get_clear_errors_and_the_server_keeps_serving(client: FlaskClient, photo: bytes,
                                                                   parsed: dict, settings: Settings) -> None:
    multipart = "multipart/form-data"
    _assert_error(client.post("/api/parse", data={}, content_type=multipart), 400, "no_file")
    _assert_error(client.post("/api/parse", data=b"", content_type="image/jpeg"), 400, "no_file")
    body = _assert_error(client.post("/api/parse", data={"file": (io.BytesIO(b"name,age\nada,36\n"), "people.csv")},
                                     content_type=multipart), 400, "decode")
    assert "not an image" in body["message"]
    body = _assert_error(client.post("/api/overlay", data=photo[: len(photo) // 3], content_type="image/jpeg"),
                         400, "decode")
    assert "truncated" in body["message"] or "corrupt" in body["message"]
    # 2,500 x 2,000 = 5 Mpx > 4 Mpx, yet a tiny file: refused from the header, before decoding.
    bomb = io.BytesIO()
    Image.new("RGB", (2500, 2000)).save(bomb, format="PNG")
    assert len(bomb.getvalue()) < settings.max_upload_bytes
    body = _assert_error(client.post("/api/parse", data=bomb.getvalue(), content_type="image/png"), 400, "too_large")
    assert "IMAGE_MAX_PIXELS" in body["message"]
    big = b"\xff\xd8" + bytes(settings.max_upload_bytes)
    _assert_error(client.post("/api/parse", data={"file": (io.BytesIO(big), "big.jpg")}, content_type=multipart),
                  413, "upload_too_large")
    _assert_error(client.post("/api/overlay", data=big, content_type="image/jpeg"), 413, "upload_too_large")
    _assert_error(client.post("/api/overlay?alpha=2", data=photo, content_type="image/jpeg"), 400, "bad_parameter")
    _assert_error(client.post("/api/parse?outline=maybe", data=photo, content_type="image/jpeg"),
                  400, "bad_parameter")

    after = client.post("/api/parse", data=photo, content_type="image/jpeg")
    assert after.status_code == 200
    assert after.get_json()["parts"] == parsed["parts"]


def test_real_http_limits_leave_label_studio_routes_alone(parser, photo: bytes, settings: Settings) -> None:
    """Over a real socket: 413 reaches the client (no reset), the limit does not apply to the app's other routes."""
    app = build_app(parser, settings)

    @app.post("/echo-size")
    def echo_size() -> dict:  # stands in for label-studio-ml's /predict on the same app
        return {"size": len(request.get_data())}

    with serve(app) as base:
        big = bytes(settings.max_upload_bytes + 1)
        response = requests.post(f"{base}/api/overlay", data=big, timeout=60)
        assert response.status_code == 413 and response.json()["error"] == "upload_too_large"
        response = requests.post(f"{base}/api/parse", files={"file": ("big.jpg", big)}, timeout=60)
        assert response.status_code == 413
        assert requests.post(f"{base}/echo-size", data=big, timeout=60).json() == {"size": len(big)}
        response = requests.post(f"{base}/api/overlay", files={"file": ("scene.jpg", photo)}, timeout=600)
        assert response.status_code == 200
        assert response.headers["X-Cached"] == "1"
        assert Image.open(io.BytesIO(response.content)).size == Image.open(io.BytesIO(photo)).size
