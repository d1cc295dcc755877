"""Image fetching and decoding: a task's image URL -> bytes -> a PIL RGB image, with limits.

URLs a Label Studio task can carry:
- `/data/upload/...` and other LS-relative paths: fetched from `LABEL_STUDIO_URL` with the API key;
- cloud-storage URIs (`s3://`, `gs://`, `azure-blob://`) and LS's `/tasks/<id>/resolve/?fileuri=...` form: resolved
  by Label Studio for the task (backend/storage_uris.py); a presigned redirect target gets no token;
- absolute URLs on `LABEL_STUDIO_HOST` (LS's public origin): fetched through `LABEL_STUDIO_URL` like relative ones;
- `/data/local-files/?d=<path>`: read from disk under `LOCAL_FILES_DOCUMENT_ROOT` when set (no HTTP round trip,
  same path rules as LS's own view), else fetched from Label Studio like any LS-relative URL;
- absolute `http(s)://` URLs: fetched directly; the API key is sent only when the host is Label Studio's;
- `data:image/...;base64,...` URIs (small inline images).

Every failure is an `ImageError` subclass whose message names the URL and the reason, so one bad task can be
reported precisely while the others go on. Nothing is cached on disk: the parsing cache (backend/cache.py) keys
on the image bytes, so re-downloading a known image costs one transfer and no inference.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import posixpath
import re
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, unquote_to_bytes, urljoin, urlparse

import numpy as np
import requests
from PIL import Image, ImageOps, UnidentifiedImageError

from backend import storage_uris
from backend.errors import InputError
from backend.settings import Settings

logger = logging.getLogger(__name__)

_CHUNK = 256 * 1024
# An access token is renewed this long before it expires, so a download never starts with a dying token.
_TOKEN_MARGIN_S = 30.0


class ImageError(InputError):
    """An image could not be obtained or decoded; `reason` is a short stable tag for metrics and logs."""

    reason = "fetch"


class ImageNotFound(ImageError):
    reason = "not_found"


class ImageAuthError(ImageError):
    reason = "auth"


class ImageTooLarge(ImageError):
    reason = "too_large"


class ImageDecodeError(ImageError):
    reason = "decode"


class ImageFetchError(ImageError):
    """Timeouts, refused connections, unexpected HTTP statuses, unsupported or unresolvable URLs."""

    reason = "fetch"


def _is_jwt(token: str) -> bool:
    """True for a JWT (LS personal access tokens are JWT refresh tokens); legacy tokens are 40 hex chars."""
    parts = token.split(".")
    if len(parts) != 3:
        return False
    try:
        header = json.loads(_b64url(parts[0]))
    except (ValueError, binascii.Error):
        return False
    return isinstance(header, dict) and "alg" in header


def _b64url(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _jwt_expiry(token: str) -> float | None:
    """The `exp` claim (unverified: we only use it to renew early; LS is the one that verifies)."""
    try:
        exp = json.loads(_b64url(token.split(".")[1])).get("exp")
    except (ValueError, IndexError, binascii.Error, AttributeError):
        return None
    return float(exp) if isinstance(exp, (int, float)) else None


@dataclass
class _AccessToken:
    value: str
    expires_at: float | None  # unix time, None when the token does not say


class ImageFetcher:
    """Fetches image bytes for task URLs. Thread-safe: one per process is enough."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._ls_url = settings.label_studio_url.rstrip("/")
        self._ls_netloc = urlparse(self._ls_url).netloc if self._ls_url else ""
        self._api_key = settings.label_studio_api_key.strip()
        self._is_pat = _is_jwt(self._api_key) if self._api_key else False
        self._token: _AccessToken | None = None
        self._token_lock = threading.Lock()
        # requests.Session is not documented as thread-safe; one per thread keeps connection reuse safe.
        self._local = threading.local()

    # ----- public -----

    def fetch(self, url: str, task_id: object = None) -> bytes:
        """The bytes behind a task's image URL, at most `image_max_bytes` of them. `task_id` (the Label Studio
        task the URL comes from) is what lets Label Studio resolve a cloud-storage URI."""
        if not isinstance(url, str) or not url.strip():
            raise ImageFetchError(f"task has no image URL (got {url!r})")
        url = url.strip()
        if url.startswith("data:"):
            return self._from_data_uri(url)
        url = storage_uris.rebase_on_label_studio(url, self._ls_url, self.settings.label_studio_host)
        resolve = storage_uris.ls_resolve_target(url, task_id, self._ls_url, self.settings.label_studio_host)
        if resolve is not None:
            return self._from_ls_resolve(resolve)
        parsed = urlparse(url)
        if parsed.scheme in ("http", "https"):
            if self._is_ls_url(parsed) and self._local_file_path(parsed) is not None:
                return self._read_local(self._local_file_path(parsed), url)
            return self._http_get(url, auth=self._is_ls_url(parsed))
        if parsed.scheme:
            raise ImageFetchError(f"{url}: unsupported URL scheme {parsed.scheme!r} (expected http(s), "
                                  "an LS-relative /data/... URL, s3:// gs:// azure-blob:// or a data: URI)")
        local = self._local_file_path(parsed)
        if local is not None:
            return self._read_local(local, url)
        if not self._ls_url:
            raise ImageFetchError(f"{url}: a Label Studio relative URL needs LABEL_STUDIO_URL to be set")
        return self._http_get(urljoin(self._ls_url + "/", url.lstrip("/")), auth=True)

    # ----- local files -----

    def _local_file_path(self, parsed) -> Path | None:
        """The disk path of a /data/local-files/ URL when LOCAL_FILES_DOCUMENT_ROOT is set, else None."""
        if not self.settings.local_files_root or parsed.path.rstrip("/") != "/data/local-files":
            return None
        values = parse_qs(parsed.query, keep_blank_values=True).get("d")
        relative = values[-1] if values else ""
        if not relative:
            raise ImageNotFound(f"{parsed.geturl()}: local-files URL has no ?d= path")
        root = Path(self.settings.local_files_root).resolve()
        # Same rule as LS's /data/local-files/ view: ?d= is relative to the root, even with a leading slash.
        candidate = (root / posixpath.normpath(relative).lstrip("/")).resolve()
        if candidate != root and root not in candidate.parents:
            raise ImageAuthError(f"{parsed.geturl()}: path escapes LOCAL_FILES_DOCUMENT_ROOT")
        return candidate

    def _read_local(self, path: Path, url: str) -> bytes:
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ImageNotFound(f"{url}: no such file under LOCAL_FILES_DOCUMENT_ROOT ({path})") from None
        except OSError as exc:
            raise ImageFetchError(f"{url}: cannot read {path}: {exc.strerror or exc}") from None
        if not path.is_file():
            raise ImageNotFound(f"{url}: {path} is not a file")
        self._check_size(size, url)
        try:
            with open(path, "rb") as f:
                data = f.read(self.settings.image_max_bytes + 1)
        except OSError as exc:
            raise ImageFetchError(f"{url}: cannot read {path}: {exc.strerror or exc}") from None
        self._check_size(len(data), url)
        return data

    # ----- data: URIs -----

    def _from_data_uri(self, url: str) -> bytes:
        header, sep, payload = url.partition(",")
        if not sep:
            raise ImageDecodeError("data: URI without a comma")
        # base64 is 4/3 of the payload: refuse before decoding a huge string
        self._check_size(len(payload) * 3 // 4, "data: URI")
        try:
            data = base64.b64decode(payload, validate=False) if header.endswith(";base64") \
                else unquote_to_bytes(payload)
        except (binascii.Error, ValueError) as exc:
            raise ImageDecodeError(f"data: URI is not valid base64: {exc}") from None
        self._check_size(len(data), "data: URI")
        return data

    # ----- cloud storage, through Label Studio -----

    def _from_ls_resolve(self, target: storage_uris.LsResolve) -> bytes:
        """Label Studio's resolve endpoint: the bytes it proxies, or its 303 to a presigned URL, followed here
        (not by requests) so that the token never goes to the storage host."""
        headers = {"User-Agent": "m2fp-prelabel"}
        if self._api_key:
            headers["Authorization"] = self._auth_header(force_refresh=False)
        response = self._request(target.url, headers, allow_redirects=False)
        if response.status_code == 401 and self._is_pat:
            response.close()
            headers["Authorization"] = self._auth_header(force_refresh=True)
            response = self._request(target.url, headers, allow_redirects=False)
        with response:
            if response.status_code in storage_uris.REDIRECT_STATUSES:
                presigned = storage_uris.presigned_target(target, response.headers.get("Location"))
            else:
                error = storage_uris.resolve_error(target, response.status_code, bool(self._api_key))
                if error is not None:
                    raise error
                return self._read_body(response, target.url)
        return self._from_presigned(presigned)

    def _from_presigned(self, presigned: storage_uris.PresignedUrl) -> bytes:
        """The storage's own URL that Label Studio redirected to: no token, and never the signed URL in a message."""
        try:
            response = self._request(presigned.url, {"User-Agent": "m2fp-prelabel"})
            with response:
                if response.status_code >= 300:
                    raise storage_uris.presigned_error(presigned, response.status_code,
                                                       storage_uris.storage_error_code(_error_body(response)))
                return self._read_body(response, presigned.url)
        except InputError as exc:
            if presigned.url not in str(exc):
                raise
            raise type(exc)(str(exc).replace(presigned.url, presigned.shown), reason=exc.reason) from None

    # ----- HTTP -----

    def _is_ls_url(self, parsed) -> bool:
        return bool(self._ls_netloc) and parsed.netloc == self._ls_netloc

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            # Tokens come from settings only: never from ~/.netrc or proxy env surprises for the LS host.
            session.trust_env = False
            self._local.session = session
        return session

    def _http_get(self, url: str, auth: bool) -> bytes:
        headers = {"User-Agent": "m2fp-prelabel"}
        if auth and self._api_key:
            headers["Authorization"] = self._auth_header(force_refresh=False)
        response = self._request(url, headers)
        if response.status_code == 401 and auth and self._is_pat:
            # The cached access token may have been revoked or expired early: renew once, then give up.
            response.close()
            headers["Authorization"] = self._auth_header(force_refresh=True)
            response = self._request(url, headers)
        with response:
            status = response.status_code
            if status == 404:
                raise ImageNotFound(f"{url}: HTTP 404 not found")
            if status in (401, 403):
                hint = "" if self._api_key or not auth else " (LABEL_STUDIO_API_KEY is not set)"
                raise ImageAuthError(f"{url}: HTTP {status} {response.reason or ''}".rstrip() + hint)
            if status >= 400:
                raise ImageFetchError(f"{url}: HTTP {status} {response.reason or ''}".rstrip())
            return self._read_body(response, url)

    def _request(self, url: str, headers: dict[str, str], allow_redirects: bool = True) -> requests.Response:
        try:
            return self._session().get(
                url, headers=headers, stream=True, allow_redirects=allow_redirects,
                timeout=(self.settings.image_connect_timeout, self.settings.image_read_timeout))
        except requests.Timeout as exc:
            raise ImageFetchError(f"{url}: timed out ({type(exc).__name__})") from None
        except requests.ConnectionError as exc:
            raise ImageFetchError(f"{url}: connection failed: {_short(exc)}") from None
        except requests.RequestException as exc:
            raise ImageFetchError(f"{url}: {_short(exc)}") from None

    def _read_body(self, response: requests.Response, url: str) -> bytes:
        length = response.headers.get("Content-Length")
        if length and length.isdigit():
            self._check_size(int(length), url)
        limit = self.settings.image_max_bytes
        # requests' read timeout bounds each socket read; this bounds the whole body against slow drips.
        deadline = time.monotonic() + self.settings.image_connect_timeout + self.settings.image_read_timeout
        buf = bytearray()
        try:
            for chunk in response.iter_content(_CHUNK):
                buf += chunk
                if len(buf) > limit:
                    raise ImageTooLarge(f"{url}: more than IMAGE_MAX_BYTES={limit} bytes")
                if time.monotonic() > deadline:
                    raise ImageFetchError(f"{url}: download took longer than "
                                          f"{self.settings.image_connect_timeout + self.settings.image_read_timeout:g} s")
        except requests.RequestException as exc:
            raise ImageFetchError(f"{url}: download interrupted: {_short(exc)}") from None
        return bytes(buf)

    def _check_size(self, size: int, what: str) -> None:
        if size > self.settings.image_max_bytes:
            raise ImageTooLarge(f"{what}: {size} bytes is more than IMAGE_MAX_BYTES={self.settings.image_max_bytes}")

    # ----- Label Studio auth -----

    def _auth_header(self, force_refresh: bool) -> str:
        if not self._is_pat:
            return f"Token {self._api_key}"
        return f"Bearer {self._access_token(force_refresh)}"

    def _access_token(self, force_refresh: bool) -> str:
        """A personal access token is a JWT refresh token: LS wants a short-lived access token from it."""
        with self._token_lock:
            token = self._token
            fresh = token is not None and (token.expires_at is None
                                           or token.expires_at - _TOKEN_MARGIN_S > time.time())
            if fresh and not force_refresh:
                return token.value
            refresh_url = f"{self._ls_url}/api/token/refresh/"
            try:
                response = self._session().post(
                    refresh_url, json={"refresh": self._api_key},
                    timeout=(self.settings.image_connect_timeout, self.settings.image_read_timeout))
            except requests.RequestException as exc:
                raise ImageFetchError(f"{refresh_url}: cannot exchange the personal access token: {_short(exc)}") \
                    from None
            if response.status_code in (400, 401, 403):
                raise ImageAuthError(f"{refresh_url}: Label Studio refused LABEL_STUDIO_API_KEY "
                                     f"(HTTP {response.status_code}: {response.text[:200]})")
            if response.status_code != 200:
                raise ImageFetchError(f"{refresh_url}: HTTP {response.status_code} exchanging the personal access token")
            try:
                access = response.json()["access"]
            except (ValueError, KeyError, TypeError):
                raise ImageFetchError(f"{refresh_url}: unexpected answer {response.text[:200]!r}") from None
            self._token = _AccessToken(access, _jwt_expiry(access))
            return access


def _error_body(response: requests.Response, limit: int = 4096) -> bytes:
    """The start of an error answer (for its error code); nothing when even that cannot be read."""
    try:
        return next(response.iter_content(limit), b"")
    except requests.RequestException:
        return b""


def _short(exc: BaseException) -> str:
    """The useful part of a requests/urllib3 error ("[Errno 111] Connection refused"), not its wrappers."""
    text = str(exc)
    found = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    if found:
        return found.group(0).strip()
    return text if len(text) <= 300 else text[:300] + "..."


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes -> RGB PIL image with EXIF orientation applied; refuses non-images, corrupt data and pixel bombs.

    The pixel count is read from the header before any pixel is decoded, so a 50 kB PNG claiming 100k x 100k
    never allocates anything.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own limit below is the one that applies; PIL's global one would only warn or raise differently.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not an image: unrecognised format (first bytes {data[:8]!r})") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image is too large: {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"corrupt image header: {exc}") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise ImageTooLarge(f"{width}x{height} = {width * height} pixels is more than IMAGE_MAX_PIXELS={max_pixels}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image is too large: {exc}") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError(f"corrupt or truncated {image.format or 'image'} data: {exc}") from None
    return _to_rgb(image)


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels over white, as an image viewer (and Label Studio) shows them.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I;16"):
        # 16-bit greyscale: keep the high byte instead of clipping everything above 255 to white.
        high = (np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8)
        return Image.fromarray(high).convert("RGB")
    return image.convert("RGB")


__all__ = [
    "ImageError", "ImageNotFound", "ImageAuthError", "ImageTooLarge", "ImageDecodeError", "ImageFetchError",
    "ImageFetcher", "decode_image",
]
