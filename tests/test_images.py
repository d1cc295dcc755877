"""Image fetching (real HTTP against a small local server) and decoding (real image files)."""
from __future__ import annotations

import base64
import io
import json
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from backend.images import (ImageAuthError, ImageDecodeError, ImageFetcher, ImageFetchError, ImageNotFound,
                            ImageTooLarge, decode_image)
from backend.settings import Settings
from testing.ports import free_port


def png_bytes(width: int = 40, height: int = 30, mode: str = "RGB", color=(200, 30, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


def jwt(payload: dict) -> str:
    enc = lambda obj: base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()  # noqa: E731
    return f"{enc({'alg': 'HS256', 'typ': 'JWT'})}.{enc(payload)}.c2lnbmF0dXJl"


IMAGE = png_bytes()
LEGACY_KEY = "0123456789abcdef0123456789abcdef01234567"
PAT = jwt({"token_type": "refresh", "exp": int(time.time()) + 86400, "user_id": 1})


class FakeLabelStudioFiles(BaseHTTPRequestHandler):
    """The few LS routes a backend uses for images: /data/..., /api/token/refresh/; plus failure modes."""

    state: dict = {}

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {"Content-Length": str(len(body))}).items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests): expected
            pass

    def do_POST(self):
        st = self.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/api/token/refresh/":
            st["refresh_calls"] += 1
            if body.get("refresh") != PAT:
                return self._send(401, b'{"detail": "Token is invalid or expired"}')
            exp = time.time() + st["access_lifetime"]
            access = jwt({"token_type": "access", "exp": int(exp), "n": st["refresh_calls"]})
            st["valid_access"] = access
            return self._send(200, json.dumps({"access": access}).encode())
        self._send(404, b"")

    def do_GET(self):
        st = self.state
        st["auth"].append((self.headers.get("Host"), self.path, self.headers.get("Authorization")))
        if self.path.startswith("/data/"):
            auth = self.headers.get("Authorization", "")
            if auth not in (f"Token {LEGACY_KEY}", f"Bearer {st.get('valid_access')}"):
                return self._send(401, b'{"detail": "Authentication credentials were not provided."}')
            if self.path.endswith("missing.png"):
                return self._send(404, b"")
            return self._send(200, IMAGE)
        if self.path == "/public.png":
            return self._send(200, IMAGE)
        if self.path == "/error":
            return self._send(500, b"oops")
        if self.path == "/slow":
            time.sleep(1.5)
            return self._send(200, IMAGE)
        if self.path == "/big-declared":
            return self._send(200, b"x" * 10, {"Content-Length": str(10**9)})
        if self.path == "/big-undeclared":
            self.send_response(200)
            self.end_headers()  # no Content-Length: read until close
            for _ in range(64):
                self.wfile.write(b"\0" * 4096)
            self.close_connection = True
            return
        self._send(404, b"")


@pytest.fixture(scope="module")
def fake_ls():
    FakeLabelStudioFiles.state = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeLabelStudioFiles)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def ls_state(fake_ls):
    FakeLabelStudioFiles.state.clear()
    FakeLabelStudioFiles.state.update(auth=[], refresh_calls=0, access_lifetime=300, valid_access=None)
    return FakeLabelStudioFiles.state


def fetcher(base: str = "", key: str = "", **kw) -> ImageFetcher:
    return ImageFetcher(Settings(label_studio_url=base, label_studio_api_key=key, **kw))


# ----- Label Studio URLs and auth -----

def test_legacy_token_on_relative_upload_url(fake_ls, ls_state):
    assert fetcher(fake_ls, LEGACY_KEY).fetch("/data/upload/3/a.png") == IMAGE
    assert ls_state["auth"][-1][2] == f"Token {LEGACY_KEY}"
    assert ls_state["refresh_calls"] == 0


def test_personal_access_token_is_exchanged_once_and_cached(fake_ls, ls_state):
    f = fetcher(fake_ls, PAT)
    assert f.fetch("/data/upload/3/a.png") == IMAGE
    assert f.fetch(f"{fake_ls}/data/upload/3/b.png") == IMAGE
    assert ls_state["refresh_calls"] == 1
    assert all(a[2] == f"Bearer {ls_state['valid_access']}" for a in ls_state["auth"])


def test_expiring_access_token_is_renewed_before_use(fake_ls, ls_state):
    ls_state["access_lifetime"] = 5  # inside the renewal margin: every fetch renews
    f = fetcher(fake_ls, PAT)
    f.fetch("/data/upload/1.png")
    f.fetch("/data/upload/2.png")
    assert ls_state["refresh_calls"] == 2


def test_revoked_access_token_is_renewed_on_401(fake_ls, ls_state):
    f = fetcher(fake_ls, PAT)
    f.fetch("/data/upload/1.png")
    ls_state["valid_access"] = "revoked-server-side"
    assert f.fetch("/data/upload/2.png") == IMAGE
    assert ls_state["refresh_calls"] == 2


def test_refused_personal_access_token_is_an_auth_error(fake_ls, ls_state):
    bad = jwt({"token_type": "refresh", "exp": int(time.time()) + 60, "user_id": 999})
    with pytest.raises(ImageAuthError, match="refused LABEL_STUDIO_API_KEY"):
        fetcher(fake_ls, bad).fetch("/data/upload/1.png")


def test_wrong_or_missing_key_is_an_auth_error(fake_ls, ls_state):
    with pytest.raises(ImageAuthError, match="401"):
        fetcher(fake_ls, "f" * 40).fetch("/data/upload/1.png")
    with pytest.raises(ImageAuthError, match="LABEL_STUDIO_API_KEY is not set"):
        fetcher(fake_ls, "").fetch("/data/upload/1.png")


def test_key_is_sent_only_to_the_label_studio_host(fake_ls, ls_state):
    port = fake_ls.rsplit(":", 1)[1]
    other_host = f"http://localhost:{port}/public.png"  # same server, different host name: not LS
    # localhost is loopback: reachable only because it is allowed explicitly (backend/net_guard.py)
    assert fetcher(fake_ls, LEGACY_KEY, image_url_allow="localhost").fetch(other_host) == IMAGE
    assert ls_state["auth"][-1][2] is None


def test_relative_url_without_label_studio_url(ls_state):
    with pytest.raises(ImageFetchError, match="LABEL_STUDIO_URL"):
        fetcher("", LEGACY_KEY).fetch("/data/upload/1.png")


def test_http_statuses(fake_ls, ls_state):
    f = fetcher(fake_ls, LEGACY_KEY)
    with pytest.raises(ImageNotFound, match="404"):
        f.fetch("/data/upload/missing.png")
    with pytest.raises(ImageNotFound):
        f.fetch(f"{fake_ls}/nothing-here.jpg")
    with pytest.raises(ImageFetchError, match="HTTP 500"):
        f.fetch(f"{fake_ls}/error")


def test_read_timeout(fake_ls, ls_state):
    with pytest.raises(ImageFetchError, match="timed out"):
        fetcher(fake_ls, image_read_timeout=0.3).fetch(f"{fake_ls}/slow")


def test_connection_refused():
    with pytest.raises(ImageFetchError, match="connection failed"):
        fetcher(image_url_allow="127.0.0.1").fetch(f"http://127.0.0.1:{free_port()}/a.png")


def test_size_limit_declared_and_streamed(fake_ls, ls_state):
    f = fetcher(fake_ls, image_max_bytes=100_000)
    with pytest.raises(ImageTooLarge, match="IMAGE_MAX_BYTES"):
        f.fetch(f"{fake_ls}/big-declared")
    with pytest.raises(ImageTooLarge, match="IMAGE_MAX_BYTES"):
        f.fetch(f"{fake_ls}/big-undeclared")
    assert fetcher(fake_ls, image_max_bytes=300_000).fetch(f"{fake_ls}/big-undeclared") == b"\0" * 4096 * 64


def test_unsupported_scheme_and_empty_url():
    with pytest.raises(ImageFetchError, match="unsupported URL scheme"):
        fetcher().fetch("ftp://host/a.png")
    with pytest.raises(ImageFetchError, match="no image URL"):
        fetcher().fetch("")


def test_data_uri():
    uri = "data:image/png;base64," + base64.b64encode(IMAGE).decode()
    assert fetcher().fetch(uri) == IMAGE
    with pytest.raises(ImageTooLarge):
        fetcher(image_max_bytes=100).fetch(uri)


# ----- local files -----

def test_local_files_are_read_from_disk(tmp_path: Path, fake_ls, ls_state):
    (tmp_path / "sub dir").mkdir()
    (tmp_path / "sub dir" / "a.png").write_bytes(IMAGE)
    f = fetcher(fake_ls, "", local_files_root=str(tmp_path))
    assert f.fetch("/data/local-files/?d=sub%20dir/a.png") == IMAGE
    assert f.fetch(f"{fake_ls}/data/local-files/?d=sub%20dir/a.png") == IMAGE
    assert f.fetch("/data/local-files/?d=/sub%20dir/a.png") == IMAGE  # LS treats d= as relative to the root
    assert ls_state["auth"] == []  # nothing went over HTTP
    with pytest.raises(ImageNotFound, match="no such file"):
        f.fetch("/data/local-files/?d=sub%20dir/none.png")
    with pytest.raises(ImageAuthError, match="escapes"):
        f.fetch("/data/local-files/?d=../../../etc/passwd")
    with pytest.raises(ImageNotFound, match="no \\?d= path"):
        f.fetch("/data/local-files/?x=1")
    with pytest.raises(ImageTooLarge):
        fetcher(local_files_root=str(tmp_path), image_max_bytes=10).fetch("/data/local-files/?d=sub%20dir/a.png")


def test_local_files_go_through_label_studio_without_a_root(fake_ls, ls_state):
    assert fetcher(fake_ls, LEGACY_KEY).fetch("/data/local-files/?d=x/a.png") == IMAGE
    assert ls_state["auth"][-1][1] == "/data/local-files/?d=x/a.png"


# ----- decoding -----

def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_decode_common_formats_to_rgb():
    for mode, fmt in [("RGB", "JPEG"), ("RGBA", "PNG"), ("L", "PNG"), ("P", "GIF"), ("RGB", "WEBP"),
                      ("I;16", "PNG"), ("CMYK", "JPEG")]:
        image = decode_image(encoded(Image.new(mode, (31, 17)), fmt), max_pixels=10**6)
        assert image.mode == "RGB" and image.size == (31, 17), (mode, fmt)


def test_decode_transparent_pixels_become_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert decode_image(encoded(rgba, "PNG"), 100).getpixel((0, 0)) == (255, 255, 255)


def test_decode_applies_exif_orientation():
    arr = np.zeros((20, 60, 3), np.uint8)
    arr[:, :10] = 255  # white band on the left
    image = Image.fromarray(arr)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 CW to display
    decoded = decode_image(encoded(image, "JPEG", exif=exif.tobytes(), quality=95), 10**6)
    assert decoded.size == (20, 60)
    top = np.asarray(decoded)[:8].mean()
    bottom = np.asarray(decoded)[-8:].mean()
    assert top > 200 and bottom < 50  # the left band is now on top


def test_decode_refuses_non_images_and_corrupt_data():
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode_image(b"<html>not found</html>", 10**6)
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"", 10**6)
    jpeg = encoded(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), "JPEG")
    with pytest.raises(ImageDecodeError, match="corrupt or truncated"):
        decode_image(jpeg[: len(jpeg) // 2], 10**6)


def test_decode_refuses_pixel_bombs_before_decoding():
    with pytest.raises(ImageTooLarge, match="IMAGE_MAX_PIXELS"):
        decode_image(png_bytes(2000, 1000), max_pixels=1_000_000)
    # A 60 byte PNG whose header claims 40000 x 40000 pixels: refused from the header, whatever PIL's own limit.
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 40000, 40000, 8, 0, 0, 0, 0)) \
        + chunk(b"IEND", b"")
    with pytest.raises(ImageTooLarge):
        decode_image(bomb, max_pixels=80_000_000)
    with pytest.raises(ImageTooLarge):
        decode_image(bomb, max_pixels=10**10)  # PIL's own bomb check is mapped to the same error


# ----- against a real Label Studio -----

def test_personal_access_token_with_a_real_label_studio(label_studio, sample_images):
    """LS 1.23: a PAT is a JWT refresh token; uploads are readable with the access token it is exchanged for."""
    from testing.label_studio import create_project, import_uploads

    ls = label_studio
    project = create_project(ls, '<View><Image name="image" value="$image"/><PolygonLabels name="p" '
                                 'toName="image"><Label value="Hair"/></PolygonLabels></View>', title="pat")
    task_id = import_uploads(ls, project, sample_images[:1])[0]
    url = ls.api("GET", f"/api/tasks/{task_id}/").json()["data"]["image"]
    assert url.startswith("/data/upload/")
    pat = ls.api("POST", "/api/token/").json()["token"]
    fetched = fetcher(ls.url, pat).fetch(url)
    assert fetched == sample_images[0].read_bytes()
    assert fetcher(ls.url, ls.token).fetch(url) == fetched   # the legacy token too (enabled in the fixture)
    header, payload, signature = pat.split(".")
    forged = ".".join([header, payload, signature[:-4] + ("AAAA" if not signature.endswith("AAAA") else "BBBB")])
    with pytest.raises(ImageAuthError, match="refused LABEL_STUDIO_API_KEY"):
        fetcher(ls.url, forged).fetch(url)
